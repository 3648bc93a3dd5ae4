"""Shared fixtures: the tiny random Gemma 3 (fast) and the real Gemma 3 270M (converted once, cached)."""

from __future__ import annotations

import pytest

from gemmascope.models import LanguageModel, load_model


@pytest.fixture(scope="session")
def tiny_model() -> LanguageModel:
    return load_model("tiny-gemma3")


@pytest.fixture(scope="session")
def real_model() -> LanguageModel:
    return load_model("gemma-3-270m")
