"""`gemmascope train` under torchrun (train/distributed.py, `Parallel`): two CPU processes with gloo on
the tiny model's activations. Data-parallel must end where one process ends when it trains on the
same global batches (the two ranks' batches concatenated); SAE-parallel must end exactly where one
process ends."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from gemmascope.activations import ActivationStore, harvest
from gemmascope.errors import ConfigError
from gemmascope.formats import load_sae
from gemmascope.models import LanguageModel
from gemmascope.train import TrainConfig, TrainSpec, train_saes

PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
SITES = ["resid_post.2", "mlp_out.1"]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """As torchrun's workers run (OMP_NUM_THREADS=1), and fast for small matrices on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def store_dir(tiny_model: LanguageModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4,096 tokens of the tiny model at two sites, in 8 shards (4 for each of two ranks)."""
    run_dir = tmp_path_factory.mktemp("store")
    harvest(tiny_model, SITES, run_dir, n_tokens=4096, context_len=64, shard_rows=8, progress=False)
    return run_dir


def fresh_run(store_dir: Path, dest: Path) -> Path:
    shutil.copytree(store_dir / "activations", dest / "activations")
    return dest


def torchrun(run_dir: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    """`torchrun --nproc_per_node 2 -m gemmascope.cli ARGS`, each worker's stderr in its own file under
    `RUN-logs-*/` (with Python's stack of every thread should one die of a signal); when it fails, the
    assertion shows the tail of each worker's stderr beside torchrun's, which a failing rank's own
    lines would otherwise drown in."""
    logs = Path(tempfile.mkdtemp(prefix=f"{run_dir.name}-logs-", dir=run_dir.parent))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["--log-dir", str(logs), "--redirects", "2", "-m", "gemmascope.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        tails = [
            f"--- {f.relative_to(logs)}:\n{f.read_text()[-3000:]}" for f in sorted(logs.rglob("stderr.log"))
        ]
        raise AssertionError(
            "\n".join([f"torchrun exit status {done.returncode}", done.stderr[-2000:], *tails])
        )
    return done


def torchrun_train(run_dir: Path, args: list[str]) -> list[Path]:
    """`torchrun --nproc_per_node 2 -m gemmascope.cli train RUN ARGS`; the SAE folders it prints."""
    done = torchrun(run_dir, ["train", str(run_dir), *args])
    lines = [line for line in done.stdout.splitlines() if line.split() and line.split()[-1].startswith("/")]
    assert sum(line.startswith("site ") for line in done.stdout.splitlines()) == 1  # rank 0 prints alone
    return [Path(line.split()[-1]) for line in lines]


def concatenated_rank_batches(world: int) -> Any:
    """An `ActivationStore.batches` that gives one process what `world` data-parallel ranks read
    together: at each step, the ranks' batches concatenated in rank order."""
    original = ActivationStore.batches

    def batches(
        self: ActivationStore,
        sites: Any,
        batch_size: int,
        seed: int = 0,
        buffer_tokens: int = 2**18,
        epochs: int = 1,
        rank: int = 0,
        world_size: int = 1,
        scaled: bool = False,
    ) -> Iterator[dict[Any, torch.Tensor]]:
        assert (rank, world_size) == (0, 1)
        streams = [
            original(self, sites, batch_size // world, seed, buffer_tokens, 10**6, r, world, scaled)
            for r in range(world)
        ]
        for parts in zip(*streams, strict=False):
            yield {site: torch.cat([part[site] for part in parts]) for site in parts[0]}

    return batches


def test_data_parallel_equals_one_process_on_the_same_global_batches(
    store_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["--sites", "resid_post.2", "--widths", "128,256", "--target-l0", "20", "--batch-size", "256"]
    # the decoder refit reads the store outside the training stream (tested in test_train_refit.py)
    args += ["--tokens", str(256 * 10), "--lr", "1e-3", "--fast", "--parallel", "data", "--refit-tokens", "0"]
    parallel = torchrun_train(fresh_run(store_dir, tmp_path / "two"), args)

    monkeypatch.setattr(ActivationStore, "batches", concatenated_rank_batches(2))
    specs = [TrainSpec("resid_post.2", width, target_l0=20) for width in (128, 256)]
    config = TrainConfig(batch_size=256, lr=1e-3, fast=True, refit_tokens=0)
    single = train_saes(fresh_run(store_dir, tmp_path / "one"), specs, 256 * 10, config, progress=False)

    assert len(parallel) == len(single) == 2
    for p_folder, s_folder in zip(parallel, single, strict=True):
        p, s = load_sae(p_folder), load_sae(s_folder)
        assert (p.d_sae, p.cfg.site) == (s.d_sae, s.cfg.site)
        # Adam (β1 = 0) moves each weight about ±lr a step whatever its gradient's size, so a weight
        # whose gradient is rounding noise may end a step or so apart; nearly all must agree to a
        # fifth of one step (lr = 1e-3, in the training-time scale, so b_enc, b_dec and θ / C).
        scale = s.cfg.extra["scale"]
        for name in PARAMS:
            unit = scale if name in ("b_enc", "b_dec", "threshold") else 1.0
            diff = (getattr(p, name) - getattr(s, name)).abs() / unit
            assert float((diff <= 2e-4).float().mean()) >= 0.99, f"{name}: {int((diff > 2e-4).sum())} apart"
        for figure in ("l0", "fvu", "dead_fraction"):  # measured over the whole global batches
            assert p.cfg.extra[figure] == pytest.approx(s.cfg.extra[figure], rel=1e-3, abs=1e-6), figure
    assert (tmp_path / "two" / "report" / "train_log.jsonl").exists()  # written by rank 0 alone


def test_sae_parallel_equals_one_process(store_dir: Path, tmp_path: Path) -> None:
    args = ["--sites", ",".join(SITES), "--widths", "64,128", "--l0-coeffs", "1e-3", "--batch-size", "128"]
    args += ["--tokens", str(128 * 8), "--lr", "1e-3", "--parallel", "sae", "--checkpoint-every", "3"]
    run_two = fresh_run(store_dir, tmp_path / "two")
    parallel = torchrun_train(run_two, args)

    specs = [TrainSpec(site, width, l0_coeff=1e-3) for site in SITES for width in (64, 128)]
    config = TrainConfig(batch_size=128, lr=1e-3, checkpoint_every=3)
    single = train_saes(fresh_run(store_dir, tmp_path / "one"), specs, 128 * 8, config, progress=False)

    assert [p.relative_to(run_two) for p in parallel] == [s.relative_to(tmp_path / "one") for s in single]
    for p_folder, s_folder in zip(parallel, single, strict=True):
        p, s = load_sae(p_folder), load_sae(s_folder)
        for name in PARAMS:
            torch.testing.assert_close(getattr(p, name), getattr(s, name))
    # each rank kept its own checkpoint and log; the SAEs were balanced by d_in x width
    for rank in (0, 1):
        assert (run_two / "checkpoints" / f"train.rank{rank}of2" / "done.json").exists()
        assert (run_two / "report" / f"train.rank{rank}of2_log.jsonl").exists()


def test_unknown_parallel_mode_is_a_clear_error(store_dir: Path, tmp_path: Path) -> None:
    run_dir = fresh_run(store_dir, tmp_path / "run")
    with pytest.raises(ConfigError, match="parallel mode 'model'"):
        train_saes(
            run_dir,
            [TrainSpec("resid_post.2", 64, l0_coeff=1e-3)],
            256,
            TrainConfig(batch_size=128, parallel="model"),
        )
    with pytest.raises(ConfigError, match="device 'cuda'"):  # this CPU-only test machine
        if torch.cuda.is_available():
            raise ConfigError("device 'cuda' is available here; nothing to check")
        train_saes(
            run_dir,
            [TrainSpec("resid_post.2", 64, l0_coeff=1e-3)],
            256,
            TrainConfig(batch_size=128, device="cuda"),
        )


def torchrun_harvest(run_dir: Path, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    args = [
        "harvest",
        str(run_dir),
        "--model",
        "tiny-gemma3",
        "--sites",
        ",".join(SITES),
        "--model-dtype",
        "float32",
    ]
    return torchrun(run_dir, [*args, "--tokens", "4096", "--context-len", "64", "--shard-rows", "8", *extra])


def test_harvest_under_torchrun_writes_the_single_process_store_and_resumes_per_rank(
    store_dir: Path, tmp_path: Path
) -> None:
    """Two gloo ranks harvest alternate shards into one store; rank 0 merges their lists: the
    manifests and every shard's bytes equal one process's. A store missing some shards (a killed
    rank) is finished by running the same command again, again byte for byte."""
    run = tmp_path / "two"
    done = torchrun_harvest(run)
    assert sum(line.startswith(tuple(SITES)) for line in done.stdout.splitlines()) == len(
        SITES
    )  # rank 0 reports
    one, two = ActivationStore(store_dir), ActivationStore(run)
    for site in one.sites:
        a, b = one.manifest(site), two.manifest(site)
        assert a["shards"] == b["shards"] and a["scale"] == b["scale"] and b["complete"]
        assert not list((run / "activations" / site.folder).glob("manifest.rank*.json"))
    # a rank killed after its first shard: the manifest lists no shard yet, its list one
    folder = run / "activations" / one.sites[0].folder
    manifest = json.loads((folder / "manifest.json").read_text())
    entries = manifest["shards"]
    manifest["shards"] = []
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "manifest.rank1.json").write_text(json.dumps([{**entries[1], "index": 1}]))
    for entry in entries[2:]:
        (folder / entry["file"]).unlink()
    torchrun_harvest(run)
    assert ActivationStore(run).manifest(one.sites[0])["shards"] == one.manifest(one.sites[0])["shards"]
