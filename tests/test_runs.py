"""Tests for runs/ (layout.py, writes.py, reading.py): the one atomic write (nothing left behind, a full disk is one clear error), the
one-writer lock (a second writer fails at once naming the first), name checks, SAE ids, and the CLI's
one comma-list parser."""

from __future__ import annotations

import errno
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gemmascope import runs
from gemmascope.cli import main
from gemmascope.cli.options import parse_list
from gemmascope.errors import ConfigError, StoreError
from gemmascope.runs import writes


def test_write_atomic_replaces_whole_and_leaves_nothing_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "a.json"
    runs.write_atomic(path, "old")
    runs.write_atomic(path, b"new")
    assert path.read_text() == "new"

    real_open = open

    class FullDisk:
        def __init__(self, *args: Any) -> None:
            self.f = real_open(*args)

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

        def write(self, data: bytes) -> int:
            self.f.write(data[:3])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writes, "open", FullDisk, raising=False)  # where the atomic write lives
    with pytest.raises(StoreError, match=r"cannot write .*a.json.*No space left on device; free some disk"):
        runs.write_atomic(path, "newer")
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]

    with pytest.raises(RuntimeError), runs.writing(tmp_path / "b.pt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def _hold_lock(run_dir: Path) -> subprocess.Popen[str]:
    code = (
        "import sys, time; from gemmascope import runs\n"
        f"with runs.lock({str(run_dir)!r}, 'train R --name dup'):\n"
        "    print('held', flush=True); time.sleep(600)\n"  # killed by the test
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_writer_fails_at_once_naming_the_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    with runs.lock(run_dir), runs.lock(run_dir):  # re-entrant within a process
        pass
    holder = _hold_lock(run_dir)
    try:
        with pytest.raises(StoreError, match=rf"in use by process {holder.pid} \(train R --name dup\)"):
            with runs.lock(run_dir):
                pass
        started = time.monotonic()
        argv = ["train", str(run_dir), "--widths", "32", "--l0-coeffs", "1", "--name", "dup"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"process {holder.pid}" in err and err.count("\n") == 1 and "Traceback" not in err
        assert time.monotonic() - started < 5  # at once, not after waiting
    finally:
        holder.kill()
        holder.wait()
    with runs.lock(run_dir):  # the OS dropped the dead holder's lock
        pass


@pytest.mark.parametrize("name", ["../../x", "../../../../tmp/x", "/tmp/x", "a/b", "..", ""])
def test_names_that_leave_the_run_folder_are_refused(name: str) -> None:
    with pytest.raises(ConfigError, match="is not a plain name"):
        runs.check_name(name)


def test_train_name_outside_the_run_folder_is_refused_before_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", str(tmp_path / "run"), "--widths", "32", "--l0-coeffs", "1"]
    assert main([*argv, "--name", "../../../../tmp/x"]) == 2
    err = capsys.readouterr().err
    assert "--name '../../../../tmp/x' is not a plain name" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_sae_ids_and_folders() -> None:
    folder = runs.sae_dir("R", "resid_post.6", 4096, 51.6)
    assert folder == Path("R/saes/resid_post/layer_6/width_4096/l0_52")
    assert runs.sae_id(folder) == "resid_post.6.w4096.l0_52"
    assert runs.sae_dir("R", "mlp_out.2", 64, 8, "topk").name == "l0_8_topk"


def test_one_list_parser_names_the_flag_and_the_bad_item() -> None:
    assert parse_list(" 1, 2,,3 ", "--widths", int) == [1, 2, 3]
    assert parse_list("a,b", "--sites") == ["a", "b"]
    with pytest.raises(
        ConfigError, match=r"--l0-coeffs '1e-3,x': item 'x' is not valid: expected comma-separated numbers"
    ):
        parse_list("1e-3,x", "--l0-coeffs", float)


def test_suite_l0_coeffs_bad_item_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["suite", str(tmp_path / "r"), "--model", "tiny-gemma3", "--l0-coeffs", "0.1,abc"]) == 2
    err = capsys.readouterr().err
    assert "--l0-coeffs '0.1,abc'" in err and "'abc'" in err and "Traceback" not in err


def test_training_refuses_a_name_outside_the_run_folder_at_its_source(tmp_path: Path) -> None:
    from gemmascope.activations import harvest
    from gemmascope.models import load_model
    from gemmascope.train import TrainConfig, TrainSpec, train_saes

    harvest(load_model("tiny-gemma3"), ["resid_post.1"], tmp_path, 256, context_len=32, progress=False)
    spec = TrainSpec(site="resid_post.1", width=16, l0_coeff=1.0)
    with pytest.raises(ConfigError, match="is not a plain name"):
        train_saes(tmp_path, [spec], 256, TrainConfig(name="../../../../tmp/x", batch_size=64))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "activations"]


def test_a_failing_disk_is_a_store_error_whichever_library_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.save says only that a write came up short, safetensors names the OS error, SQLite says
    it in words: each is one StoreError naming the file; anything else is not a disk's failure."""
    import sqlite3

    path = tmp_path / "new" / "deeper" / "state.pt"
    monkeypatch.setattr(writes, "_free_bytes", lambda p: 0)  # the disk is full
    failures = [
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
        Exception("Error while serializing: I/O error: No space left on device (os error 28)"),
        sqlite3.OperationalError("database or disk is full"),
    ]
    for err in failures:
        with pytest.raises(StoreError, match=r"cannot write .*state.pt.*No space left on device; free some"):
            with runs.writing(path) as tmp:
                tmp.write_bytes(b"part")
                raise err
        assert sorted(p.name for p in tmp_path.iterdir()) == []  # the part and the folders made for it
    with pytest.raises(RuntimeError, match="a bug"), runs.writing(path):
        raise RuntimeError("a bug")
    monkeypatch.setattr(writes, "_free_bytes", lambda p: 1 << 40)  # room on the disk: a failing one
    with (
        pytest.raises(StoreError, match=r"the write failed \(disk I/O error\)"),
        runs.disk_errors(tmp_path / "x.db"),
    ):
        raise sqlite3.OperationalError("disk I/O error")
    with pytest.raises(StoreError, match="database or disk is full"), runs.disk_errors(tmp_path / "x.db"):
        raise sqlite3.OperationalError("database or disk is full")


def test_every_write_into_a_run_folder_waits_for_no_one_else(tmp_path: Path) -> None:
    """A write into a run folder another process holds fails at once, whoever writes (a library
    call, a server route), not only the commands that take the lock themselves."""
    run_dir = tmp_path / "run"
    runs.write_atomic(run_dir / "run.json", "{}")
    holder = _hold_lock(run_dir)
    try:
        with pytest.raises(StoreError, match=rf"in use by process {holder.pid}"):
            runs.write_atomic(run_dir / "report" / "bias.json", "{}")
        assert not (run_dir / "report").exists()
        runs.write_atomic(tmp_path / "elsewhere.json", "{}")  # outside any run folder: no lock
    finally:
        holder.kill()
        holder.wait()
    runs.write_atomic(run_dir / "report" / "bias.json", "{}")


def test_paths_a_run_records_are_its_own(tmp_path: Path) -> None:
    run_dir = tmp_path / "copy"
    folder = run_dir / "saes" / "resid_post" / "layer_1" / "width_32" / "l0_8"
    assert runs.stored_path(run_dir, folder) == "saes/resid_post/layer_1/width_32/l0_8"
    assert runs.run_path(run_dir, "saes/resid_post/layer_1/width_32/l0_8") == folder
    # an absolute path an older version recorded in the original, read in a copy: the copy's
    assert runs.run_path(run_dir, "/old/place/run/saes/resid_post/layer_1/width_32/l0_8") == folder
    assert (
        runs.run_path(run_dir, "/old/run/heldout/activations/x") == run_dir / "heldout" / "activations" / "x"
    )
    assert runs.run_path(run_dir, "/somewhere/else.json") == Path("/somewhere/else.json")


def test_a_name_over_the_file_name_limit_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert runs.check_name("a" * runs.MAX_NAME) == "a" * runs.MAX_NAME
    with pytest.raises(ConfigError, match=f"is {runs.MAX_NAME + 1} characters long: expected at most"):
        runs.check_name("a" * (runs.MAX_NAME + 1))
    argv = ["train", str(tmp_path / "run"), "--widths", "32", "--l0-coeffs", "1", "--name", "n" * 300]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "300 characters long" in err and err.count("\n") == 1 and "Traceback" not in err


def test_saes_are_listed_by_site_layer_width_and_l0_with_numbers_as_numbers(tmp_path: Path) -> None:
    """Layer 6 before layer 10, width 4096 before 16384, L0 45 before 100: not text order."""
    made = ["resid_post/layer_10/width_4096/l0_45", "resid_post/layer_6/width_16384/l0_45",
            "resid_post/layer_6/width_4096/l0_100", "resid_post/layer_6/width_4096/l0_45",
            "mlp_out/layer_6/width_4096/l0_45", "resid_post/layer_2/width_4096/l0_45"]  # fmt: skip
    for folder in made:
        (tmp_path / runs.SAES / folder).mkdir(parents=True)
        for name in (runs.CFG_FILE, runs.WEIGHTS_FILE):
            (tmp_path / runs.SAES / folder / name).write_text("{}")
    found = [str(p.relative_to(tmp_path / runs.SAES)) for p in runs.find_saes(tmp_path)]
    assert found == [
        "mlp_out/layer_6/width_4096/l0_45",
        "resid_post/layer_2/width_4096/l0_45",
        "resid_post/layer_6/width_4096/l0_45",
        "resid_post/layer_6/width_4096/l0_100",
        "resid_post/layer_6/width_16384/l0_45",
        "resid_post/layer_10/width_4096/l0_45",
    ]
    ids = ["resid_post.10.w4096.l0_45", "resid_post.6.w16384.l0_45", "resid_post.6.w4096.l0_45"]
    assert sorted(ids, key=runs.sae_order) == [ids[2], ids[1], ids[0]]
