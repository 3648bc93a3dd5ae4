"""Tests for the cli package: every subcommand is wired, `harvest` works end to end, user errors are
one line on stderr with exit status 2 (never a traceback), bad arguments are refused before the model
loads, and every command given a damaged file of each kind a run folder holds fails in one line and
leaves every other file as it was."""

from __future__ import annotations

import json
import os
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
    elif kind == "suite.json type":  # well-formed JSON, a value of the wrong type
        key = {"tokens": 2048, "dtype": "float32"}
        path.write_text(json.dumps({"done": {"harvest": {"key": key, "value": 5}}}))
    elif kind == "run.json value":  # a plan no command can have asked for
        path.write_text(path.read_text().replace('"target_l0s": [\n    8.0\n  ]', '"target_l0s": [NaN]'))
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
        ("suite.json type", "suite.json", ["suite", "RUN", *SUITE]),
        ("run.json value", "run.json", ["suite", "RUN", *SUITE]),
        ("run.json", "run.json", ["attribute", "RUN", "Hi"]),
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


BIAS_FILES = ["--a-file", "DOCS", "--b-file", "DOCS", "--heldout-a", "DOCS", "--heldout-b", "DOCS"]
BIAS_FILES += ["--watch", " a", "--watch", " b"]


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
        # every file the user names is read only up to a bound (/dev/zero never ends)
        (
            [
                "steer",
                "Hi",
                "--sae",
                "SAE_DIR",
                "--feature",
                "0",
                "--watch",
                " he",
                "--prompts-file",
                "/dev/zero",
            ],
            "--prompts-file '/dev/zero' is larger than 8 MiB",
        ),
        (["bias", "RUN", *BIAS_FILES, "--a-file", "/dev/zero"], "--a-file '/dev/zero' is larger than"),
        (["bias", "RUN", *BIAS_FILES[:6], "--heldout-b", "/dev/zero"], "--heldout-b '/dev/zero' is larger"),
        (
            ["inspect", "--sae", "SAE_DIR", "--documents", "/dev/zero"],
            "--documents '/dev/zero' is larger than",
        ),
        (
            ["inspect", "--sae", "SAE_DIR", "--documents", "LINES"],
            "lines.txt' has 100001 lines: expected at most 100000",
        ),
        # --documents takes the checks of every other mode
        (
            ["inspect", "--sae", "SAE_DIR", "--documents", "DOCS", "--dense", "2"],
            "--dense 2.0 is out of range",
        ),
        (
            ["inspect", "--sae", "SAE_DIR", "--documents", "DOCS", "--limit", "0"],
            "--limit 0 must be at least 1",
        ),
        (["attribute", "TC_RUN", "Hi", "--max-tokens", "-1"], "--max-tokens -1: expected 1..512"),
        (
            ["steer", "Hi", "--sae", "SAE_DIR", "--feature", "0", "--watch", " a", "--sweep", "1,1e39"],
            "'1e39'",
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
    (tmp_path / "docs.txt").write_text("one document\nanother one\n")
    (tmp_path / "lines.txt").write_text("x\n" * 100_001)
    (tmp_path / "tc" / "saes").mkdir(parents=True)
    subs = {"RUN": str(tmp_path / "run"), "SAE_DIR": str(folder), "DOCS": str(tmp_path / "docs.txt")}
    subs |= {"LINES": str(tmp_path / "lines.txt"), "TC_RUN": str(tmp_path / "tc")}
    assert main([subs.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["steer", "Hi", "--sae", "SAE", "--feature", "0", "--strength", "1e39"],
        ["steer", "Hi", "--sae", "SAE", "--feature", "0", "--mode", "clamp", "--strength=-1e39"],
        ["attribute", "RUN", "Hi", "--ablate", "1/1/1", "--value", "1e39"],
        ["finetune", "SAE", "--lr", "nan"],
        ["train", "RUN", "--l0-coeffs", "1", "--dense-coeff", "inf"],
    ],
)
def test_a_number_beyond_float32_is_refused_where_it_is_parsed(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """1e39 is inf in a float32 tensor (a clamp to it crashed, an add to it gave NaN): every
    real-valued option takes only finite float32 numbers, refused by the parser in one line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(r"is (out of range|not finite): expected a finite number within", err)
    assert (
        "Traceback" not in err and err.count("\n") == 1 and err.startswith(f"gemmascope {argv[0]}: error: ")
    )


def test_a_command_line_argparse_refuses_is_one_line_too(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["harvest", "R", "--tokens", "10"]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == "gemmascope harvest: error: the following arguments are required: --sites (see gemmascope harvest --help)\n"
    )


def test_serve_on_an_address_that_is_not_this_machines_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", str(tmp_path), "--host", "203.0.113.7", "--port", "8123"]) == 2  # TEST-NET-3
    err = capsys.readouterr().err
    assert "--host '203.0.113.7'" in err and "expected an address of this machine" in err
    assert "choose another port" not in err


# ---------------------------------------------------------------------------------------------
# Every writing command on a full disk: one line, exit 2, no leftovers, earlier results intact

# Runs a command in a process of its own: a full disk must not kill it (a memory-mapped spill file
# dies of SIGBUS), and with a file-size limit of 0 (where no tmpfs can be mounted, as in CI) every
# write fails as on a full disk: with EFBIG from the OS, a short write in torch.save, an I/O error
# in SQLite. The limit is set after the imports (Python probes its temporary folder by writing).
_FULL_DISK_RUNNER = """
import resource, sys, tempfile
tempfile.gettempdir()
from gemmascope.cli import main
if sys.argv[1] != "none":
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
sys.exit(main(sys.argv[2:]))
"""


def _writing_commands() -> list[list[str]]:
    """A command of each kind that writes: RUN (an SAE run), SAE (its SAE), TC (a run of random
    transcoders), OUT (a new path on the disk), P (a file of prompts off the disk)."""
    bias = ["--a-file", "P", "--b-file", "P", "--heldout-a", "P", "--heldout-b", "P", "--watch", " a"]
    return [
        ["harvest", "RUN", "--model", "tiny-gemma3", "--sites", "resid_post.1", "--tokens", "2560"],
        ["train", "RUN", "--widths", "16", "--l0-coeffs", "1", "--tokens", "1024", "--name", "other"],
        ["convert", "SAE", "OUT"],
        ["convert", "SAE", "OUT", "--to", "safetensors"],
        ["convert", "SAE", "OUT", "--to", "npz"],
        ["eval", "RUN", "--no-probe", "--n-tokens", "127", "--min-tokens", "64"],
        ["index", "RUN", "--tokens", "256"],
        ["suite", "RUN", *SUITE[:7], "32,16", *SUITE[8:], "--extend"],
        ["bias", "RUN", *bias, "--watch", " b", "--side-effects", "0"],
        ["attribute", "TC", "The cat", "--model", "tiny-gemma3"],
        ["finetune", "SAE", "--tokens", "128", "--eval-tokens", "0"],
    ]


def _mount_tmpfs(where: Path, size: int) -> bool:
    import subprocess

    where.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
        )
    except OSError:  # no mount command here
        return False
    return done.returncode == 0


def _fill(disk: Path) -> None:
    """Write a file until the disk refuses more."""
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


@pytest.mark.parametrize("disk", ["tmpfs", "size-limit"])
@pytest.mark.parametrize(
    "argv", _writing_commands(), ids=lambda a: a[0] + ("-" + a[-1] if "--to" in a else "")
)
def test_every_writing_command_on_a_full_disk_is_one_line_and_leaves_nothing(
    finished_run: Path, tmp_path: Path, disk: str, argv: list[str]
) -> None:
    import shutil
    import subprocess
    import sys

    import gemmascope
    from gemmascope.attribution import transcoder_set  # noqa: F401 (the run below is one)
    from gemmascope.formats import save_sae
    from gemmascope.runs import find_saes
    from gemmascope.sae import SAEConfig, build_sae

    root = tmp_path / "disk"
    size = sum(p.stat().st_blocks * 512 for p in finished_run.rglob("*")) + (16 << 20)
    if disk == "tmpfs" and not _mount_tmpfs(root, size):
        pytest.skip("cannot mount a tmpfs here (not root, or in a container without the right)")
    root.mkdir(exist_ok=True)
    try:
        run_dir = root / "run"
        shutil.copytree(finished_run, run_dir)
        for layer in range(4):  # a transcoder per layer of the tiny model, for `attribute`
            cfg = SAEConfig("jumprelu", 64, 32, model_name="tiny-gemma3", site=f"mlp_in.{layer}",
                            out_site=f"mlp_out.{layer}")  # fmt: skip
            save_sae(
                build_sae(cfg),
                root / "tc" / "saes" / "mlp_in" / f"layer_{layer}" / "width_32" / "l0_5_transcoder",
            )
        (root / "tc" / ".lock").touch()
        (tmp_path / "prompts.txt").write_text("a cat\nthe dog\na bird\n")
        before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != ".lock"}
        (folder,) = find_saes(run_dir)
        subs = {
            "RUN": run_dir,
            "SAE": folder,
            "TC": root / "tc",
            "OUT": root / "out",
            "P": tmp_path / "prompts.txt",
        }
        limit = "none"
        if disk == "tmpfs":
            _fill(root)
        else:
            limit = "0"
        env = {**os.environ, "PYTHONPATH": str(Path(gemmascope.__file__).parents[1])}
        done = subprocess.run(
            [sys.executable, "-c", _FULL_DISK_RUNNER, limit, *[str(subs.get(a, a)) for a in argv]],
            capture_output=True, text=True, env=env, timeout=600,
        )  # fmt: skip
        bar = re.compile(r"%\||\[\d\d:\d\d")  # progress bars
        lines = [line for line in re.split(r"[\r\n]", done.stderr) if line.strip() and not bar.search(line)]
        assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
        assert lines[0].startswith(f"gemmascope {argv[0]}: error: cannot "), lines[0]
        left = [p for p in root.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".index-spill-")]
        assert not left and not (root / "out").exists()
        assert {p: p.read_bytes() for p in before} == before  # every earlier file as it was
    finally:
        if disk == "tmpfs":
            subprocess.run(["umount", str(root)], check=False)


def test_eval_of_some_saes_merges_into_the_runs_report(finished_run: Path, tmp_path: Path) -> None:
    """`eval` of one SAE of a run replaces that SAE's results in report/evals.json, summary.txt and
    the plots, and keeps every other SAE's (it used to leave a report of that one SAE)."""
    import shutil

    from gemmascope.runs import find_saes, sae_id
    from gemmascope.suite import write_suite_report

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    (first,) = find_saes(run_dir)
    second = first.with_name("l0_9")
    shutil.copytree(first, second)
    result = json.loads((second / "eval.json").read_text())
    result["sae_id"] = sae_id(second)
    (second / "eval.json").write_text(json.dumps(result))
    write_suite_report(run_dir, [first, second])
    argv = ["eval", str(first), "--no-probe", "--n-tokens", "127", "--min-tokens", "64"]
    assert main(argv) == 0
    report = json.loads((run_dir / "report" / "evals.json").read_text())
    assert [r["sae_id"] for r in report["summary"]] == [sae_id(first), sae_id(second)]
    assert (
        report["summary"][0]["n_tokens"] < 127 < report["summary"][1]["n_tokens"]
    )  # the new one, the old one
    summary = (run_dir / "report" / "summary.txt").read_text()
    assert sae_id(first) in summary and sae_id(second) in summary


def test_eval_and_bias_wait_for_no_other_writer(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`eval` and `bias` write into the run folder (eval.json, report/): they take its lock first,
    so while another command holds it they stop at once, before any work."""
    import subprocess
    import sys
    import time

    (tmp_path / "p.txt").write_text("a cat\nthe dog\n")
    code = (
        "import sys, time; from gemmascope import runs\n"
        f"with runs.lock({str(finished_run)!r}, 'index RUN'):\n"
        "    print('held', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        bias = [f.replace("DOCS", str(tmp_path / "p.txt")) for f in BIAS_FILES]
        for argv in (["eval", str(finished_run), "--no-probe"], ["bias", str(finished_run), *bias]):
            started = time.monotonic()
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert f"in use by process {holder.pid} (index RUN)" in err and err.count("\n") == 1
            assert time.monotonic() - started < 10
    finally:
        holder.kill()
        holder.wait()
