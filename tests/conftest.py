"""Shared fixtures: the tiny random Gemma 3 (fast) and the real Gemma 3 270M (converted once, cached)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from gemmascope.models import LanguageModel, load_model


@pytest.fixture(scope="session")
def tiny_model() -> LanguageModel:
    return load_model("tiny-gemma3")


@pytest.fixture(scope="session")
def real_model() -> LanguageModel:
    return load_model("gemma-3-270m")


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Small matrices on a shared 2-core machine run far faster on one thread (no OpenMP spinning);
    a test module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
