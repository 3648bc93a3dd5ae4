"""Tests for the activations package (activations/): harvesting (tiny model; one test on the real
Gemma 3 270M), the manifest and scale, resume after SIGKILL, bad input, and reading back in order and
as batches."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor

from gemmascope import activations
from gemmascope.activations import ActivationStore, harvest, harvesting
from gemmascope.corpus import load_corpus, pack, special_mask
from gemmascope.errors import ConfigError, CorpusError, StoreError
from gemmascope.models import LanguageModel
from gemmascope.sites import Site, capture

SITES = [Site("resid_post", 1), Site("attn_out", 1), Site("mlp_out", 0)]
CTX = 32
SMALL = {"context_len": CTX, "shard_rows": 5, "batch_rows": 3, "progress": False}


@pytest.fixture(scope="module")
def store(tiny_model: LanguageModel, tmp_path_factory: pytest.TempPathFactory) -> ActivationStore:
    # 1000 tokens -> 32 rows of 32 -> shards of 5 rows: 6 full and one of 2.
    return harvest(tiny_model, SITES, tmp_path_factory.mktemp("run"), 1000, **SMALL)


def plain_hook_acts(model: LanguageModel, input_ids: Tensor, sites: list[Site]) -> dict[Site, Tensor]:
    """Reference: a full transformers forward with hand-written hooks, independent of sites.capture."""
    acts: dict[Site, Tensor] = {}
    handles = []
    for site in sites:
        block = model.hf.model.layers[site.layer]
        if site.kind == "resid_post":
            handles.append(
                block.register_forward_hook(lambda m, a, out, s=site: acts.__setitem__(s, _hidden(out)))
            )
        elif site.kind == "attn_out":
            handles.append(
                block.self_attn.o_proj.register_forward_pre_hook(
                    lambda m, a, s=site: acts.__setitem__(s, a[0])
                )
            )
        else:
            handles.append(
                block.post_feedforward_layernorm.register_forward_hook(
                    lambda m, a, out, s=site: acts.__setitem__(s, out)
                )
            )
    try:
        with torch.no_grad():
            model.hf(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return acts


def _hidden(output: Any) -> Tensor:
    return (
        output[0] if isinstance(output, tuple) else output
    )  # decoder layers return a tuple in older transformers


def store_acts(store: ActivationStore, site: Site) -> Tensor:
    return torch.cat([acts for acts, _ in store.rows(site)])


def store_bytes(run_dir: Path) -> dict[str, bytes]:
    root = run_dir / "activations"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- what a harvest writes


def test_manifest_records_model_site_dtype_tokens_and_scale(store: ActivationStore) -> None:
    m = store.manifest(Site("resid_post", 1))
    assert (m["model"], m["site"], m["layer"], m["dtype"], m["d_in"]) == (
        "tiny-gemma3",
        "resid_post.1",
        1,
        "float32",
        64,
    )
    assert (m["n_tokens_requested"], m["n_rows"], m["n_tokens"]) == (1000, 32, 1024)  # rounded up to rows
    assert m["complete"] and m["corpus"] == "wiki" and m["split"] == "train" and m["context_len"] == CTX
    assert [s["rows"] for s in m["shards"]] == [
        [0, 5],
        [5, 10],
        [10, 15],
        [15, 20],
        [20, 25],
        [25, 30],
        [30, 32],
    ]
    assert set(m["special_ids"]) == {0, 1, 2}
    assert store.model_name == "tiny-gemma3" and store.context_len == CTX and store.sites == sorted(SITES)


def test_shards_hold_acts_in_dtype_and_int32_token_ids(store: ActivationStore) -> None:
    folder = store.root / "attn_out" / "layer_1"
    shard = load_file(str(folder / "shard-00000.safetensors"))
    assert shard["acts"].shape == (5, CTX, 64) and shard["acts"].dtype == torch.float32
    assert shard["token_ids"].dtype == torch.int32 and shard["token_ids"].shape == (5, CTX)
    assert not list(folder.glob("*.tmp"))


def test_rows_are_the_packed_corpus_with_bos_first(store: ActivationStore, tiny_model: LanguageModel) -> None:
    expected = pack(tiny_model.tokenizer, load_corpus("wiki", "train"), CTX, max_rows=32)
    assert torch.equal(store.token_ids(), expected)
    assert (expected[:, 0] == tiny_model.tokenizer.bos_token_id).all()
    for site in SITES:
        assert torch.equal(torch.cat([ids for _, ids in store.rows(site)]), expected)


def test_stored_acts_equal_plain_forward_hooks(store: ActivationStore, tiny_model: LanguageModel) -> None:
    ids = store.token_ids()
    reference = plain_hook_acts(tiny_model, ids, SITES)
    for site in SITES:
        torch.testing.assert_close(store_acts(store, site), reference[site], rtol=1e-5, atol=1e-5)


def test_scale_is_the_root_mean_square_norm_over_non_special_tokens(store: ActivationStore) -> None:
    keep = ~special_mask(store.token_ids(), store.special_ids)
    assert keep[:, 0].logical_not().all() and keep.sum() == store.manifest(SITES[0])["n_tokens_non_special"]
    for site in SITES:
        x = store_acts(store, site)[keep]
        scale = store.scale(site)
        assert scale == pytest.approx(x.double().pow(2).sum(-1).mean().sqrt().item(), rel=1e-9)
        assert (x / scale).pow(2).sum(-1).mean().item() == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("dtype, torch_dtype", [("fp16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_half_precision_stores(
    tiny_model: LanguageModel, tmp_path: Path, dtype: str, torch_dtype: torch.dtype
) -> None:
    store = harvest(tiny_model, ["resid_post.0"], tmp_path, 160, **SMALL | {"dtype": dtype})
    site = Site("resid_post", 0)
    assert load_file(str(store.root / site.folder / "shard-00000.safetensors"))["acts"].dtype == torch_dtype
    acts = store_acts(store, site)
    assert acts.dtype == torch.float32
    reference = capture(tiny_model, store.token_ids(), [site])[site]
    assert torch.equal(acts, reference.to(torch_dtype).float())
    assert store.manifest(site)["dtype"] == {"fp16": "float16"}.get(dtype, dtype)


# -- reading batches


def test_batches_give_the_same_positions_for_every_site_and_skip_special(store: ActivationStore) -> None:
    keep = ~special_mask(store.token_ids(), store.special_ids).reshape(-1)
    flat = {site: store_acts(store, site).reshape(-1, 64)[keep] for site in SITES}

    def key(vectors: dict[Site, Tensor], i: int) -> tuple[bytes, ...]:
        return tuple(vectors[site][i].numpy().tobytes() for site in SITES)

    # A token is the tuple of its vectors at every site; equal tuples (same prefix) are counted.
    available = Counter(key(flat, i) for i in range(int(keep.sum())))
    served: Counter[tuple[bytes, ...]] = Counter()
    order = []
    batches = list(store.batches(SITES, batch_size=64, buffer_tokens=300))
    assert len(batches) == int(keep.sum()) // 64
    for batch in batches:
        assert all(batch[site].shape == (64, 64) and batch[site].dtype == torch.float32 for site in SITES)
        for i in range(64):
            served[key(batch, i)] += 1
            order.append(key(batch, i))
    assert not served - available  # every served token is a non-special token, none served twice
    assert order != [key(flat, i) for i in range(len(order))]  # shuffled


def test_batches_are_deterministic_per_seed_and_scaled_on_request(store: ActivationStore) -> None:
    def first(seed: int, **kw: Any) -> Tensor:
        return next(iter(store.batches(SITES[:1], 32, seed=seed, buffer_tokens=200, **kw)))[SITES[0]]

    assert torch.equal(first(0), first(0))
    assert not torch.equal(first(0), first(1))
    torch.testing.assert_close(first(3, scaled=True), first(3) / store.scale(SITES[0]))
    two = list(store.batches(SITES[:1], 32, epochs=2))
    assert len(two) == 2 * len(list(store.batches(SITES[:1], 32)))


def test_data_parallel_ranks_read_only_their_shards_and_yield_equal_counts(store: ActivationStore) -> None:
    site = SITES[0]
    shards = list(store.rows(site))  # shard by shard

    def own_tokens(rank: int) -> Counter[bytes]:
        out: Counter[bytes] = Counter()
        for acts, ids in shards[rank::2]:
            out.update(
                v.numpy().tobytes()
                for v in acts.reshape(-1, 64)[~special_mask(ids, store.special_ids).reshape(-1)]
            )
        return out

    counts = []
    for rank in (0, 1):
        served: Counter[bytes] = Counter()
        batches = list(store.batches([site], 16, rank=rank, world_size=2))
        for batch in batches:
            served.update(v.numpy().tobytes() for v in batch[site])
        assert not served - own_tokens(rank)  # shards rank, rank + 2, ... and nothing else
        counts.append(len(batches))
    assert counts[0] == counts[1] > 0
    with pytest.raises(StoreError, match="fewer than world_size 9"):
        next(iter(store.batches([site], 16, rank=0, world_size=9)))
    with pytest.raises(ConfigError, match="rank 2"):
        next(iter(store.batches([site], 16, rank=2, world_size=2)))


def test_store_errors_name_what_is_missing(store: ActivationStore, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no activation store"):
        ActivationStore(tmp_path)
    with pytest.raises(StoreError, match="mlp_out.3.*resid_post.1"):
        store.manifest("mlp_out.3")


# -- resume


def test_harvest_again_is_a_no_op_and_extending_equals_one_run(
    tiny_model: LanguageModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    harvest(tiny_model, SITES[:2], tmp_path / "one", 1024, **SMALL)
    harvest(tiny_model, SITES[:2], tmp_path / "grown", 500, **SMALL)  # 16 rows: last shard has 1 row
    harvest(tiny_model, SITES[:2], tmp_path / "grown", 1024, **SMALL)
    assert store_bytes(tmp_path / "one") == store_bytes(tmp_path / "grown")

    def no_forward(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a complete store must not run the model again")

    monkeypatch.setattr(harvesting, "capture_batches", no_forward)
    harvest(tiny_model, SITES[:2], tmp_path / "one", 1024, **SMALL)
    with pytest.raises(StoreError, match="already holds 32 rows"):
        harvest(tiny_model, SITES[:2], tmp_path / "one", 500, **SMALL)


_KILLED_HARVEST = """
import sys, time
import gemmascope.activations as act
import gemmascope.sites as sites
from gemmascope.models import load_model
from gemmascope.sites import capture

def slow_capture(*args, **kwargs):
    time.sleep(0.1)  # slow enough for the test to kill it mid-run
    return capture(*args, **kwargs)

sites.capture = slow_capture  # looked up by sites.capture_batches, which harvest runs
act.harvest(load_model("tiny-gemma3"), ["resid_post.1", "mlp_out.0"], sys.argv[1], 1024,
            context_len=32, shard_rows=4, batch_rows=2, progress=False)
"""


def test_resume_after_sigkill_gives_the_same_store_as_an_uninterrupted_run(
    tiny_model: LanguageModel, tmp_path: Path
) -> None:
    killed = tmp_path / "killed"
    script = tmp_path / "harvest.py"
    script.write_text(_KILLED_HARVEST)
    proc = subprocess.Popen([sys.executable, str(script), str(killed)], stderr=subprocess.PIPE)
    manifest = killed / "activations" / "resid_post" / "layer_1" / "manifest.json"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if manifest.exists() and json.loads(manifest.read_text())["shards"]:
                break
            time.sleep(0.02)
        assert proc.poll() is None, (
            f"harvest ended before it was killed: {proc.stderr.read().decode()[-2000:]}"
        )  # type: ignore[union-attr]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    # Nothing half-written passes as complete: the store refuses to open, the manifest lists only
    # whole shards.
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore(killed)
    partial = ActivationStore(killed, allow_incomplete=True)
    assert 0 < len(partial.manifest("resid_post.1")["shards"]) < 8
    partial.verify()

    sites = ["resid_post.1", "mlp_out.0"]
    args = {"context_len": 32, "shard_rows": 4, "batch_rows": 2, "progress": False}
    resumed = harvest(tiny_model, sites, killed, 1024, **args)
    harvest(tiny_model, sites, tmp_path / "whole", 1024, **args)
    assert resumed.manifest("resid_post.1")["n_tokens"] == 1024
    assert store_bytes(killed) == store_bytes(tmp_path / "whole")


def test_truncated_shard_is_an_error_naming_its_path(tiny_model: LanguageModel, tmp_path: Path) -> None:
    store = harvest(tiny_model, ["resid_post.0"], tmp_path, 320, **SMALL)
    shard = store.root / "resid_post" / "layer_0" / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(StoreError, match="shard-00001.safetensors.*truncated"):
        list(ActivationStore(tmp_path).rows("resid_post.0"))
    with pytest.raises(StoreError, match="shard-00001.safetensors.*truncated"):
        harvest(tiny_model, ["mlp_out.0", "resid_post.0"], tmp_path, 320, **SMALL)
    assert not (store.root / "mlp_out").exists()  # checks pass for every site before anything is written


# -- bad input


def test_bad_sites_and_context_are_config_errors_naming_the_valid_values(
    tiny_model: LanguageModel, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="'resid_pre.1'.*resid_post, attn_out, mlp_out"):
        harvest(tiny_model, ["resid_pre.1"], tmp_path, 100, **SMALL)
    with pytest.raises(ConfigError, match="layer 9.*0..3"):
        harvest(tiny_model, ["resid_post.9"], tmp_path, 100, **SMALL)
    with pytest.raises(ConfigError, match="context length 1024.*2..512"):
        harvest(tiny_model, ["resid_post.1"], tmp_path, 100, **SMALL | {"context_len": 1024})
    with pytest.raises(ConfigError, match="'fp8'"):
        harvest(tiny_model, ["resid_post.1"], tmp_path, 100, **SMALL | {"dtype": "fp8"})
    assert not (tmp_path / "activations").exists()


def test_empty_or_too_small_corpus_is_a_corpus_error(tiny_model: LanguageModel, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(CorpusError, match="empty.txt"):
        harvest(tiny_model, ["resid_post.0"], tmp_path / "a", 100, corpus=str(empty), split="all", **SMALL)
    small = tmp_path / "small.txt"
    small.write_text("A short text. " * 30)
    with pytest.raises(CorpusError, match="fewer than the 100000 tokens"):
        harvest(
            tiny_model, ["resid_post.0"], tmp_path / "b", 100_000, corpus=str(small), split="all", **SMALL
        )


def test_run_folder_of_another_model_corpus_or_context_is_refused(
    tiny_model: LanguageModel, tmp_path: Path
) -> None:
    harvest(tiny_model, ["resid_post.0"], tmp_path, 160, **SMALL)
    other = dataclasses.replace(tiny_model, name="gemma-3-270m")
    with pytest.raises(StoreError, match="model 'tiny-gemma3'.*not 'gemma-3-270m'"):
        harvest(other, ["resid_post.0"], tmp_path, 160, **SMALL)
    with pytest.raises(StoreError, match="context_len 32.*not 16"):
        harvest(tiny_model, ["mlp_out.0"], tmp_path, 160, **SMALL | {"context_len": 16})
    with pytest.raises(StoreError, match="split 'train'.*not 'heldout'"):
        harvest(tiny_model, ["resid_post.0"], tmp_path, 160, split="heldout", **SMALL)
    with pytest.raises(StoreError, match="float32, not float16"):
        harvest(tiny_model, ["resid_post.0"], tmp_path, 160, **SMALL | {"dtype": "fp16"})
    assert ActivationStore(tmp_path).sites == [Site("resid_post", 0)]


def test_a_bfloat16_model_harvests_close_to_float32_and_is_not_mixed_with_it(
    tiny_model: LanguageModel, tmp_path: Path
) -> None:
    fast = tiny_model.cast(torch.bfloat16)
    exact = harvest(tiny_model, ["resid_post.1"], tmp_path / "f32", 160, **SMALL)
    store = harvest(fast, ["resid_post.1"], tmp_path / "bf16", 160, **SMALL)
    site = Site("resid_post", 1)
    assert (exact.manifest(site)["model_dtype"], store.manifest(site)["model_dtype"]) == (
        "float32",
        "bfloat16",
    )
    a, b = store_acts(exact, site), store_acts(store, site)
    assert b.dtype == torch.float32 and not torch.equal(a, b)  # rounded passes, stored as asked
    assert float((a - b).norm() / a.norm()) < 0.03
    with pytest.raises(
        StoreError, match="harvested with the model in bfloat16, not float32.*--model-dtype bfloat16"
    ):
        harvest(tiny_model, ["resid_post.1"], tmp_path / "bf16", 320, **SMALL)  # extending it in float32
    assert ActivationStore(tmp_path / "bf16").manifest(site)["n_tokens"] == 160  # nothing lost
    again = harvest(tiny_model, ["resid_post.1"], tmp_path / "bf16", 160, **SMALL)  # complete: a no-op
    assert again.manifest(site)["model_dtype"] == "bfloat16" and again.manifest(site)["n_tokens"] == 160
    assert torch.equal(store_acts(again, site), b)  # nothing rewritten


# -- the real model


@pytest.mark.real
def test_real_gemma_harvest_equals_plain_forward_hooks(real_model: LanguageModel, tmp_path: Path) -> None:
    sites = [Site("resid_post", 6), Site("attn_out", 3), Site("mlp_out", 3)]
    store = harvest(real_model, sites, tmp_path, 256, context_len=64, batch_rows=2, progress=False)
    ids = store.token_ids()
    assert ids.shape == (4, 64)
    reference = {site: [] for site in sites}  # type: dict[Site, list[Tensor]]
    for start in range(0, 4, 2):  # the same batches as the harvest
        for site, acts in plain_hook_acts(real_model, ids[start : start + 2], sites).items():
            reference[site].append(acts)
    for site in sites:
        assert store.manifest(site)["d_in"] == (1024 if site.kind == "attn_out" else 640)
        torch.testing.assert_close(store_acts(store, site), torch.cat(reference[site]), rtol=1e-5, atol=1e-4)
        assert store.scale(site) > 0


def test_a_manifest_missing_keys_is_one_clear_error(tiny_model: LanguageModel, tmp_path: Path) -> None:
    harvest(tiny_model, SITES[:1], tmp_path, 200, **SMALL)
    path = tmp_path / "activations" / "resid_post" / "layer_1" / "manifest.json"
    manifest = json.loads(path.read_text())
    for broken in (
        {k: v for k, v in manifest.items() if k not in ("complete", "special_ids")},
        {**manifest, "shards": [{"file": "shard-00000.safetensors"}]},
        {**manifest, "shards": "none"},
    ):
        path.write_text(json.dumps(broken))
        with pytest.raises(StoreError, match="manifest .* is damaged: it lacks"):
            ActivationStore(tmp_path)
        with pytest.raises(StoreError, match="is damaged"):
            harvest(tiny_model, SITES[:1], tmp_path, 200, **SMALL)


def test_disk_full_during_a_harvest_is_one_error_and_leaves_no_temp_file(
    tiny_model: LanguageModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from gemmascope.runs import writes

    real_open = open

    def full_disk(path: Any, mode: str = "r", *args: Any) -> Any:
        f = real_open(path, mode, *args)
        if "w" in mode and str(path).endswith(".safetensors.tmp") and "00001" in str(path):
            f.write(b"partial")
            f.close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return f

    monkeypatch.setattr(writes, "open", full_disk, raising=False)
    with pytest.raises(StoreError, match="No space left on device; free some disk space"):
        harvest(tiny_model, SITES[:1], tmp_path, 500, **SMALL)
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
    monkeypatch.undo()
    store = harvest(tiny_model, SITES[:1], tmp_path, 500, **SMALL)  # resumes from the shard that failed
    assert store.manifest(SITES[0])["complete"]


def test_a_flipped_byte_of_the_right_size_is_caught_when_read(
    tiny_model: LanguageModel, tmp_path: Path
) -> None:
    harvest(tiny_model, SITES[:1], tmp_path, 200, **SMALL)
    shard = tmp_path / "activations" / "resid_post" / "layer_1" / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0x40  # inside the activations: the file still parses, only the hash tells
    shard.write_bytes(bytes(data))
    activations._VERIFIED.clear()  # a fresh process
    store = ActivationStore(tmp_path)
    with pytest.raises(StoreError, match="is damaged: its SHA-256 differs from the manifest's"):
        next(store.rows(SITES[0]))
    with pytest.raises(StoreError, match="SHA-256"):
        next(store.batches([SITES[0]], 16))


def test_a_damaged_shard_is_named_and_harvest_recomputes_it_once_deleted(
    tiny_model: LanguageModel, tmp_path: Path
) -> None:
    """What the damaged-shard message says to do works: delete the shard and harvest again."""
    harvest(tiny_model, SITES[:1], tmp_path, 200, **SMALL)
    folder = tmp_path / "activations" / "resid_post" / "layer_1"
    good = {p.name: p.read_bytes() for p in folder.glob("shard-*.safetensors")}
    shard = folder / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0x40
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="shard-00000.safetensors.*delete it"):
        harvest(tiny_model, SITES[:1], tmp_path, 200, **SMALL)
    shard.unlink()
    harvest(tiny_model, SITES[:1], tmp_path, 200, **SMALL)
    assert {p.name: p.read_bytes() for p in folder.glob("shard-*.safetensors")} == good


def _safetensors_bytes(header: Any, data: bytes = bytes(range(16))) -> memoryview:
    text = json.dumps(header).encode()
    return memoryview(bytearray(len(text).to_bytes(8, "little") + text + data))


def test_a_shard_header_that_does_not_fit_its_data_is_an_error_naming_the_shard(tmp_path: Path) -> None:
    """The store reads a shard's tensors straight from its bytes (views, no copy); a header that is
    not one, or whose offsets do not match a tensor's shape or lie outside the data, is a StoreError
    naming the shard, not a wrong tensor."""
    from gemmascope.activations.shards import shard_tensors

    path = tmp_path / "shard-00000.safetensors"
    data = _safetensors_bytes({"acts": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}})
    acts = shard_tensors(path, data)["acts"]
    assert torch.equal(acts, torch.frombuffer(bytearray(range(16)), dtype=torch.float32).view(2, 2))
    data[-1] = 7  # a view of the bytes
    assert acts.view(torch.uint8)[-1, -1] == 7
    for header in (
        [1, 2],
        {"acts": {"dtype": "F32", "shape": [2, 2], "data_offsets": [4, 0]}},
        {"acts": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}},
        {"acts": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]}},
        {"acts": {"dtype": "Q9", "shape": [2, 2], "data_offsets": [0, 16]}},
    ):
        with pytest.raises(StoreError, match="cannot read shard .*shard-00000.safetensors"):
            shard_tensors(path, _safetensors_bytes(header))
