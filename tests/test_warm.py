"""Tests of the warm start (warm.py, server/commands.py): a running server of a run folder is found
through its record, `gemmascope inspect`, `steer` and `contrast` are run by it instead of loading the
model and print exactly what they print alone (relative paths meant from where they were typed, bad
input the same one-line error), and a dead server's record, a refused request (a wrong secret) or no
server leave the command to run the model here."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from test_server import PROMPT, tiny_run_dir

from gemmascope import models, warm
from gemmascope.cli import build_parser, main, run_line
from gemmascope.cli.options import PATH_OPTIONS, absolute_paths
from gemmascope.models import LanguageModel
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


def first_sae(run_dir: Path) -> str:
    return sae_id(sorted(find_saes(run_dir))[0])


def inspect_argv(run_dir: Path, k: int) -> list[str]:
    """`gemmascope inspect` of the run's first SAE on PROMPT, `k` features per token."""
    return [
        "inspect",
        "--run",
        str(run_dir),
        "--sae",
        first_sae(run_dir),
        PROMPT,
        "--color",
        "never",
        "-k",
        str(k),
    ]


@contextmanager
def served(run_dir: Path, model: LanguageModel, token: str | None = None) -> Iterator[str]:
    """A server of `run_dir` on a thread, announced in the registry (with a wrong secret when
    `token` is given), for the block."""
    app = create_app(run_dir, model=model, run_line=run_line)
    with serving(app) as url:
        record = warm.announce(run_dir, url, token or app.state.command_token)
        try:
            yield url
        finally:
            warm.withdraw(record)


def alone_and_served(
    argv: list[str], run_dir: Path, model: LanguageModel, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> tuple[tuple[int, Any], tuple[int, Any]]:  # fmt: skip
    """`main(argv)` run here, then with a server of the run up and the model unloadable here."""
    code = main(argv)
    alone = capsys.readouterr()
    with served(run_dir, model), monkeypatch.context() as m:
        no_model(m)
        served_code = main(argv)
        answer = capsys.readouterr()
    return (code, alone), (served_code, answer)


def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on, loading a model afresh in this process fails the test (the server's lent one,
    `models.resident`, is still found)."""
    monkeypatch.setattr(models, "_tiny_gemma3", lambda *a: pytest.fail("the command loaded the model"))


def test_inspect_asks_the_running_server_and_prints_what_it_prints_alone(
    run_dir: Path,
    tiny_model: LanguageModel,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = inspect_argv(run_dir, k=3)
    assert main(argv) == 0
    alone = capsys.readouterr()
    assert "run by the running" not in alone.err and "top 3 features" in alone.out
    app = create_app(run_dir, model=tiny_model, run_line=run_line)
    with serving(app) as url:
        record = warm.announce(run_dir, url, app.state.command_token)
        assert record is not None and warm.running_server(run_dir) == warm.Server(
            url, app.state.command_token
        )
        assert record.stat().st_mode & 0o077 == 0  # the secret is its owner's only
        with monkeypatch.context() as m:
            no_model(m)
            assert main(argv) == 0
            answer = capsys.readouterr()
        warm.withdraw(record)
    assert answer.out == alone.out
    assert f"run by the running gemmascope serve at {url}" in answer.err
    assert not record.exists() and warm.running_server(run_dir) is None


def test_steer_and_contrast_are_run_by_the_server_with_paths_from_where_they_were_typed(
    run_dir: Path,
    tiny_model: LanguageModel,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    monkeypatch.chdir(run_dir.parent)  # the run folder and a prompt file named relative to here
    (tmp_path / "b.txt").write_text("The dog ran home.\nA cat sat down.\n")
    prompts = os.path.relpath(tmp_path / "b.txt", run_dir.parent)
    steer = [
        "steer", "--run", run_dir.name, "--sae", first_sae(run_dir), "--feature", "3", "--strength", "4",
        PROMPT, "--max-new-tokens", "6", "--top-k", "3", "--json",
    ]  # fmt: skip
    contrast = [
        "contrast",
        run_dir.name,
        "--a",
        "Paris is in France.",
        "--a",
        "Rome is in Italy.",
        "--b-file",
        prompts,
    ]
    for argv in (steer, contrast):
        (code, alone), (served_code, answer) = alone_and_served(
            argv, run_dir, tiny_model, monkeypatch, capsys
        )
        assert code == served_code == 0 and "run by the running" in answer.err, (alone.err, answer.err)
        assert answer.out == alone.out, argv[0]


def test_bad_input_gets_the_same_one_line_error_from_the_server(
    run_dir: Path,
    tiny_model: LanguageModel,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["steer", "--run", str(run_dir), "--sae", first_sae(run_dir), "--feature", "99999", PROMPT]
    (code, alone), (served_code, answer) = alone_and_served(argv, run_dir, tiny_model, monkeypatch, capsys)
    assert code == served_code == 2
    assert "latent 99999 is out of range" in alone.err and alone.err in answer.err


def test_a_refused_request_runs_the_model_here(
    run_dir: Path, tiny_model: LanguageModel, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = inspect_argv(run_dir, k=3)
    assert main(argv) == 0
    alone = capsys.readouterr()
    with served(run_dir, tiny_model, token="not-the-secret"):  # the server answers 403
        assert main(argv) == 0
        answer = capsys.readouterr()
    assert answer.out == alone.out and "run by the running" not in answer.err


def test_every_file_option_of_a_served_command_is_made_absolute() -> None:
    """A file option missing from PATH_OPTIONS would be read from the server's directory."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in warm.WARM_COMMANDS:
        for action in sub.choices[name]._actions:  # text options whose help names a file or folder
            text = (action.help or "").lower()
            if action.type not in (None, str) or action.nargs == 0 or action.dest in ("sae", "model", "slug"):
                continue
            if "file" in text or "folder" in text or "sqlite" in text:
                assert action.dest in PATH_OPTIONS, (name, action.dest, action.help)
    args = argparse.Namespace(
        run_dir="runs/x", db=None, sae="runs/x", steps=[("sae", "runs/x"), ("feature", 3)]
    )
    out = absolute_paths(args, Path("/somewhere"))
    assert out.run_dir == "/somewhere/runs/x" and out.db is None
    assert out.sae == "runs/x" and out.steps == [("sae", "runs/x"), ("feature", 3)]  # not a path there: an id


def test_a_dead_servers_record_is_ignored_and_removed(run_dir: Path) -> None:
    record = warm.announce(run_dir, "http://127.0.0.1:9", "secret")
    assert record is not None
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    record.write_text(json.dumps({**json.loads(record.read_text()), "pid": int(done.stdout)}))
    assert warm.running_server(run_dir) is None and not record.exists()


def test_a_live_process_that_does_not_answer_is_not_used(run_dir: Path) -> None:
    record = warm.announce(
        run_dir, "http://127.0.0.1:9", "secret"
    )  # this process, alive, but nothing listens
    assert warm.running_server(run_dir) is None
    warm.withdraw(record)
    assert record is not None and not record.exists()


def test_the_registry_is_its_owners_only(run_dir: Path, tmp_path: Path, tiny_model: LanguageModel) -> None:
    folder = tmp_path / "cache" / warm.REGISTRY
    folder.mkdir(parents=True, mode=0o755)  # made by an older version, readable by others
    folder.chmod(0o755)
    with served(run_dir, tiny_model) as url:
        record = warm._entry(run_dir)
        assert folder.stat().st_mode & 0o777 == 0o700 and record.stat().st_mode & 0o777 == 0o600
        assert warm.running_server(run_dir) is not None and warm.running_server(run_dir).url == url  # type: ignore[union-attr]
        record.chmod(0o644)  # a record others can read is not trusted (nor is its secret)
        assert warm.running_server(run_dir) is None
        record.chmod(0o600)
        assert warm.running_server(run_dir) is not None
