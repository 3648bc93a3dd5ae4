"""Tests for the cli package: every subcommand is wired, `harvest` works end to end, user errors are
one line on stderr with exit status 2 (never a traceback), bad arguments are refused before the model
loads, and every command given a damaged file of each kind a run folder holds fails in one line and
leaves every other file as it was."""

from __future__ import annotations

import re
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


# ---------------------------------------------------------------------------------------------
# Every command given a damaged file of each kind the run folder holds: one line, exit 2, nothing else touched

SUITE = [
    "--model", "tiny-gemma3", "--sites", "resid_post", "--layers", "1", "--widths", "32", "--l0", "8",
    "--tokens", "2048", "--eval-tokens", "1200", "--index-tokens", "1024",
]  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert main(["suite", str(run_dir), *SUITE]) == 0
    return run_dir


def _damage(path: Path, kind: str) -> None:
    if kind == "shard":  # a flipped byte of the right size
        data = bytearray(path.read_bytes())
        data[-5] ^= 0x10
        path.write_bytes(bytes(data))
    elif kind == "state.pt":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x80\x02not a checkpoint")
    elif kind == "features.sqlite":
        path.write_bytes(b"SQLite format 3\x00" + b"\x07" * 200)
    else:
        path.write_text('{"broken": ')


def _cases() -> list[tuple[str, str, list[str]]]:
    """(kind of file, its path in the run, a command that reads it); RUN and SAE stand for the folders."""
    sae = "saes/resid_post/layer_1/width_32"
    shard = "activations/resid_post/layer_1/shard-00000.safetensors"
    manifest = "activations/resid_post/layer_1/manifest.json"
    train = ["train", "RUN", "--widths", "16", "--l0-coeffs", "1", "--tokens", "512"]
    harvest = ["harvest", "RUN", "--model", "tiny-gemma3", "--sites", "resid_post.1", "--tokens", "2048"]
    return [
        ("run.json", "run.json", ["suite", "RUN", *SUITE]),
        ("suite.json", "suite.json", ["suite", "RUN", *SUITE]),
        ("eval.json", f"{sae}/SAE/eval.json", ["suite", "RUN", *SUITE]),
        ("manifest.json", manifest, harvest),
        ("manifest.json", manifest, [*train, "--name", "other"]),
        ("shard", shard, harvest),
        ("shard", shard, [*train, "--name", "other"]),
        ("done.json", "checkpoints/layer_1/done.json", [*train, "--name", "layer_1"]),
        ("state.pt", "checkpoints/half/state.pt", [*train, "--name", "half"]),
        ("cfg.json", f"{sae}/SAE/cfg.json", ["eval", "RUN", "--no-probe"]),
        ("cfg.json", f"{sae}/SAE/cfg.json", ["index", "RUN", "--no-build"]),
        ("cfg.json", f"{sae}/SAE/cfg.json", ["inspect", "a text", "--run", "RUN"]),
        ("cfg.json", f"{sae}/SAE/cfg.json", ["steer", "Hi", "--sae", "SAE_DIR", "--feature", "0"]),
        ("cfg.json", f"{sae}/SAE/cfg.json", ["convert", "SAE_DIR", "OUT"]),
        ("features.sqlite", "features.sqlite", ["index", "RUN", "--no-build"]),
        ("features.sqlite", "features.sqlite", ["inspect", "--run", "RUN", "--find", "word"]),
        (
            "features.sqlite",
            "features.sqlite",
            ["steer", "Hi", "--run", "RUN", "--sae", "SAE_ID", "--feature", "0"],
        ),
    ]


@pytest.mark.parametrize("kind, where, argv", _cases(), ids=lambda v: v if isinstance(v, str) else v[0])
def test_a_damaged_file_is_one_line_and_touches_nothing_else(
    finished_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    kind: str,
    where: str,
    argv: list[str],
) -> None:
    import shutil

    from gemmascope.activations import _VERIFIED
    from gemmascope.runs import find_saes, sae_id

    _VERIFIED.clear()  # as in a fresh process
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    (folder,) = find_saes(run_dir)
    path = run_dir / where.replace("SAE", folder.name)
    _damage(path, kind)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    subs = {
        "RUN": str(run_dir),
        "SAE_DIR": str(folder),
        "SAE_ID": sae_id(folder),
        "OUT": str(tmp_path / "out"),
    }
    capsys.readouterr()
    assert main([subs.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip() and "%|" not in line]  # no bars
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"gemmascope {argv[0]}: error: "), err
    assert {p: p.read_bytes() for p in before if p.exists()} == before  # every file as it was
    assert all(p.exists() for p in before)
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["harvest", "RUN", "--sites", "resid_post.1", "--tokens", "100", "--dtype", "int8"],
            "unknown dtype 'int8'",
        ),
        (["harvest", "RUN", "--sites", "resid_pre.1", "--tokens", "100"], "unknown site 'resid_pre.1'"),
        (
            ["harvest", "RUN", "--sites", "resid_post.1", "--tokens", "100", "--split", "dev"],
            "unknown split 'dev'",
        ),
        (["inspect", "text", "--sae", "SAE_DIR", "-k", "0"], "-k 0 must be at least 1"),
        (["inspect", "text", "--sae", "SAE_DIR", "--dense", "2"], "--dense 2.0 is out of range"),
        (
            ["steer", "Hi", "--sae", "SAE_DIR", "--feature", "99", "--strength", "1"],
            "latent 99 is out of range",
        ),
    ],
)
def test_arguments_are_checked_before_the_model_loads(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    from gemmascope import models
    from gemmascope.formats import save_sae
    from gemmascope.sae import SAEConfig, build_sae

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model must not load before the arguments are checked")

    monkeypatch.setattr(models, "load_model", no_model)
    cfg = SAEConfig("jumprelu", d_in=64, d_sae=32, site="resid_post.1", model_name="tiny-gemma3")
    folder = save_sae(build_sae(cfg), tmp_path / "sae")
    subs = {"RUN": str(tmp_path / "run"), "SAE_DIR": str(folder)}
    assert main([subs.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_serve_on_an_address_that_is_not_this_machines_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", str(tmp_path), "--host", "203.0.113.7", "--port", "8123"]) == 2  # TEST-NET-3
    err = capsys.readouterr().err
    assert "--host '203.0.113.7'" in err and "expected an address of this machine" in err
    assert "choose another port" not in err
