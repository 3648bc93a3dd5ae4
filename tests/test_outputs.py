"""A latent's measured output effects (outputs.py) on a copy of the tiny run of test_server: measured
once and kept in the run folder (RUN/effects/SAE_ID/LATENT.json), read back without the model, measured
again when what they were measured with changed or the file is damaged, still answered when the run
folder cannot be written (another process holds its lock), and refused without a feature index; the
CLI's `inspect --feature N`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from test_runs import _hold_lock
from test_server import tiny_run_dir

from gemmascope import outputs
from gemmascope.cli import main
from gemmascope.effects import OUTPUT_PROMPTS
from gemmascope.errors import ConfigError, StoreError
from gemmascope.models import LanguageModel
from gemmascope.opening import OpenRun, open_run
from gemmascope.runs import EFFECTS, FEATURES_DB

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def run(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, tiny_model: LanguageModel) -> Path:
    """A copy of the shared tiny run (this test writes into it), without the effects other tests'
    servers measured and cached in the shared run (the browser's feature pages do)."""
    copy = tmp_path / "run"
    shutil.copytree(tiny_run_dir(tmp_path_factory, tiny_model), copy, ignore=shutil.ignore_patterns(EFFECTS))
    return copy


def _opened(run: Path, model: LanguageModel) -> tuple[OpenRun, str, int]:
    """The open run, its first SAE and a latent that fired on the index corpus."""
    opened = open_run(run, model=model)
    key = next(iter(opened.saes))
    max_acts = opened.column(key, "max_act")
    assert max_acts is not None
    return opened, key, int(max_acts.argmax())


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the measurements `latent_outputs` makes (each runs the model)."""
    calls: list[int] = []
    measure = outputs.output_effects

    def counted(*args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(1)
        return measure(*args, **kwargs)

    monkeypatch.setattr(outputs, "output_effects", counted)
    return calls


def test_output_effects_are_measured_once_and_kept_in_the_run_folder(
    run: Path, tiny_model: LanguageModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened, key, latent = _opened(run, tiny_model)
    calls = _counting(monkeypatch)
    first = outputs.latent_outputs(opened, key, latent)
    path = run / EFFECTS / key / f"{latent}.json"
    assert first["cached"] is False and "not_cached" not in first and path.is_file()
    strength = float(opened.column(key, "max_act")[latent])  # type: ignore[index]
    assert first["strength"] == strength and first["prompts"] == list(OUTPUT_PROMPTS)
    assert len(first["rose"]) == 10 and first["rose"][0]["log_ratio"] > 0
    assert not list(path.parent.glob("*.tmp"))  # written whole, under its final name

    again = outputs.latent_outputs(open_run(run, model=tiny_model), key, latent)  # another process, later
    assert again["cached"] is True and calls == [1]
    assert {k: v for k, v in again.items() if k != "cached"} == {
        k: v for k, v in first.items() if k != "cached"
    }
    outputs.latent_outputs(opened, key, latent, refresh=True)
    assert calls == [1, 1]

    # measured with something else (another strength: a rebuilt index), or damaged: measured again
    entry = json.loads(path.read_text())
    entry["measured_with"]["strength"] = strength + 1
    path.write_text(json.dumps(entry))
    assert outputs.latent_outputs(opened, key, latent)["cached"] is False and len(calls) == 3
    path.write_text("{not json")
    assert outputs.latent_outputs(opened, key, latent)["cached"] is False and len(calls) == 4
    assert json.loads(path.read_text())["measured_with"]["strength"] == strength  # replaced


def test_a_run_folder_another_process_writes_still_answers_without_keeping_it(
    run: Path, tiny_model: LanguageModel
) -> None:
    opened, key, latent = _opened(run, tiny_model)
    holder = _hold_lock(run)
    try:
        got = outputs.latent_outputs(opened, key, latent)
    finally:
        holder.kill()
        holder.wait()
    assert got["cached"] is False and f"in use by process {holder.pid}" in got["not_cached"]
    assert got["rose"] and not (run / EFFECTS).exists()
    assert outputs.latent_outputs(opened, key, latent)["cached"] is False  # now kept
    assert outputs.latent_outputs(opened, key, latent)["cached"] is True


def test_bad_latents_and_runs_without_an_index(
    run: Path, tiny_model: LanguageModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened, key, _ = _opened(run, tiny_model)
    d_sae = opened.saes[key].d_sae
    with pytest.raises(ConfigError, match=rf"expected 0..{d_sae - 1}"):
        outputs.latent_outputs(opened, key, d_sae)
    with pytest.raises(ConfigError, match="no SAE 'nope'"):
        outputs.latent_outputs(opened, "nope", 0)
    never = [i for i, m in enumerate(opened.column(key, "max_act").tolist()) if m <= 0]  # type: ignore[union-attr]
    if never:  # a latent that never fired has no strength: answered without the model
        calls = _counting(monkeypatch)
        got = outputs.latent_outputs(opened, key, never[0])
        assert "never fired" in got["note"] and got["rose"] == [] and calls == []
    (run / FEATURES_DB).unlink()
    with pytest.raises(StoreError, match="max activation in the feature index"):
        outputs.latent_outputs(open_run(run, model=tiny_model), key, 0)


def test_cli_inspect_feature_prints_the_page_and_the_measured_effects(
    run: Path, tiny_model: LanguageModel, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from gemmascope import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: tiny_model)
    opened, key, latent = _opened(run, tiny_model)
    assert main(["inspect", "--run", str(run), "--sae", key, "--feature", str(latent)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{key} #{latent}: fires on ") and "top activations:" in out
    assert "logit lens (the weights): promotes" in out and "turned up (measured now)" in out
    assert "  rises: " in out and "  falls: " in out
    assert main(["inspect", "--run", str(run), "--sae", key, "--feature", str(latent)]) == 0
    assert "measured earlier, kept in the run folder" in capsys.readouterr().out
    assert main(["inspect", "--run", str(run), "--sae", key, "--feature", "99999"]) == 2
    assert "--feature 99999 is out of range" in capsys.readouterr().err
