"""Tests for cli.py: every subcommand is wired, `harvest` works end to end, and user errors are one
line on stderr with exit status 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from gemmascope.cli import SUBCOMMANDS, build_parser, main


def test_every_subcommand_has_a_runner() -> None:
    parser = build_parser()
    for name in SUBCOMMANDS:
        with pytest.raises(SystemExit) as done:
            parser.parse_args([name, "--help"])
        assert done.value.code == 0


def test_harvest_command_writes_a_store_and_reports_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    argv = [
        "harvest",
        str(run_dir),
        "--model",
        "tiny-gemma3",
        "--sites",
        "resid_post.1,blocks.2.hook_mlp_out",
    ]
    assert main([*argv, "--tokens", "600"]) == 0
    out = capsys.readouterr().out
    assert "resid_post.1: 640 tokens, d_in 64" in out and "mlp_out.2: 640 tokens" in out
    assert (run_dir / "activations" / "mlp_out" / "layer_2" / "manifest.json").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--sites", "resid_post.9", "--tokens", "100"],
            "layer 9 of site 'resid_post.9' is out of range: valid layers are 0..3",
        ),
        (["--sites", "resid_pre.1", "--tokens", "100"], "unknown site 'resid_pre.1'"),
        (["--sites", "resid_post.1", "--tokens", "0"], "n_tokens 0 must be at least 1"),
        (["--sites", "resid_post.1", "--tokens", "100", "--context-len", "100000"], "100000"),
    ],
)
def test_harvest_bad_input_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(["harvest", str(tmp_path / "run"), "--model", "tiny-gemma3", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "activations").exists() or not any(
        (tmp_path / "run" / "activations").rglob("*.safetensors")
    )
