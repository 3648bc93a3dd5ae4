"""Tests of the warm start (warm.py): a running server of a run folder is found through its record,
`gemmascope inspect` asks it instead of loading the model and prints exactly what it prints alone,
and a dead server's record, a refused request or no server leave the command to run the model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_server import PROMPT, tiny_run_dir

from gemmascope import warm
from gemmascope.cli import main
from gemmascope.models import LanguageModel
from gemmascope.opening import OpenRun
from gemmascope.runs import find_saes, sae_id
from gemmascope.server import create_app, serving


@pytest.fixture
def run_dir(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model: LanguageModel,
    monkeypatch: pytest.MonkeyPatch,
) -> Path:
    monkeypatch.setattr(warm, "cache_root", lambda: tmp_path / "cache")  # the registry of this test only
    monkeypatch.delenv("GEMMASCOPE_NO_SERVER", raising=False)
    return tiny_run_dir(tmp_path_factory, tiny_model)


def inspect_argv(run_dir: Path, k: int) -> list[str]:
    """`gemmascope inspect` of the run's first SAE on PROMPT, `k` features per token."""
    first = sae_id(sorted(find_saes(run_dir))[0])
    return ["inspect", "--run", str(run_dir), "--sae", first, PROMPT, "--color", "never", "-k", str(k)]


def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on, loading the model in this process fails the test."""
    monkeypatch.setattr(OpenRun, "model", property(lambda self: pytest.fail("the command loaded the model")))


def test_inspect_asks_the_running_server_and_prints_what_it_prints_alone(
    run_dir: Path,
    tiny_model: LanguageModel,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = inspect_argv(run_dir, k=3)
    assert main(argv) == 0
    alone = capsys.readouterr()
    assert "answered by the running" not in alone.err and "top 3 features" in alone.out
    with serving(create_app(run_dir, model=tiny_model)) as url:
        record = warm.announce(run_dir, url)
        assert record is not None and warm.running_server(run_dir) == url
        with monkeypatch.context() as m:
            no_model(m)
            assert main(argv) == 0
            served = capsys.readouterr()
        warm.withdraw(record)
    assert served.out == alone.out
    assert f"answered by the running gemmascope serve at {url}" in served.err
    assert not record.exists() and warm.running_server(run_dir) is None


def test_a_refused_request_runs_the_model_here(
    run_dir: Path, tiny_model: LanguageModel, capsys: pytest.CaptureFixture[str]
) -> None:
    # 25 features per token: more than the server lists (MAX_TOP_PER_TOKEN), so it refuses
    argv = inspect_argv(run_dir, k=25)
    assert main(argv) == 0
    alone = capsys.readouterr()
    with serving(create_app(run_dir, model=tiny_model)) as url:
        record = warm.announce(run_dir, url)
        assert main(argv) == 0
        served = capsys.readouterr()
        warm.withdraw(record)
    assert served.out == alone.out and "answered by the running" not in served.err


def test_a_dead_servers_record_is_ignored_and_removed(run_dir: Path) -> None:
    record = warm.announce(run_dir, "http://127.0.0.1:9")
    assert record is not None
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    record.write_text(json.dumps({**json.loads(record.read_text()), "pid": int(done.stdout)}))
    assert warm.running_server(run_dir) is None and not record.exists()


def test_a_live_process_that_does_not_answer_is_not_used(run_dir: Path) -> None:
    record = warm.announce(run_dir, "http://127.0.0.1:9")  # this process, alive, but nothing listens
    assert warm.running_server(run_dir) is None
    warm.withdraw(record)
    assert record is not None and not record.exists()
