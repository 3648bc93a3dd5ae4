"""Tests of formats/: exact round trips through every format, Gemma Scope files encoding exactly as
the tutorial's reference JumpReLUSAE, SAELens folders, the run-folder layout, and bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gemmascope.architectures import BatchTopKSAE, JumpReLUSAE
from gemmascope.cli import main
from gemmascope.errors import FormatError
from gemmascope.formats import (
    find_saes,
    load_log10_density,
    load_sae,
    sae_dir,
    sae_id,
    save_params_npz,
    save_params_safetensors,
    save_sae,
)
from gemmascope.sae import SAE, SAEConfig, build_sae

PARAMS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


def random_sae(architecture: str = "jumprelu", d_in: int = 16, d_sae: int = 32, k: int | None = None) -> SAE:
    g = torch.Generator().manual_seed(0)
    cfg = SAEConfig(
        architecture,
        d_in=d_in,
        d_sae=d_sae,
        k=k,
        model_name="tiny-gemma3",
        site="resid_post.2",
        hook_name="blocks.2.hook_resid_post",
        context_size=64,
        dataset="wiki",
        extra={"l0": 12.5, "published": {"lr": 7e-5}},
    )
    sae = build_sae(cfg)
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec):
            p.copy_(torch.randn(p.shape, generator=g))
        if isinstance(sae, JumpReLUSAE):
            sae.threshold.copy_(torch.rand(d_sae, generator=g))
        if isinstance(sae, BatchTopKSAE):
            sae.threshold.fill_(0.7)
    return sae


def params(sae: SAE) -> dict[str, torch.Tensor]:
    return {n: getattr(sae, n).detach() for n in PARAMS if hasattr(sae, n)}


def assert_same_weights(a: SAE, b: SAE) -> None:
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name].expand_as(pb[name]), pb[name]), name


class ReferenceJumpReLUSAE(torch.nn.Module):
    """The Gemma Scope tutorial's JumpReLUSAE (Colab 'Tutorial: Gemma Scope from scratch')."""

    def __init__(self, d_model: int, d_sae: int) -> None:
        super().__init__()
        self.W_enc = torch.nn.Parameter(torch.zeros(d_model, d_sae))
        self.W_dec = torch.nn.Parameter(torch.zeros(d_sae, d_model))
        self.threshold = torch.nn.Parameter(torch.zeros(d_sae))
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_model))

    def encode(self, input_acts: torch.Tensor) -> torch.Tensor:
        pre_acts = input_acts @ self.W_enc + self.b_enc
        mask = pre_acts > self.threshold
        acts = mask * torch.nn.functional.relu(pre_acts)
        return acts

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        return acts @ self.W_dec + self.b_dec

    def forward(self, acts: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(acts))


def gemma_scope_npz(folder: Path, d_in: int = 16, d_sae: int = 32, seed: int = 3) -> Path:
    """A params.npz laid out as Gemma Scope releases it, with realistic (mostly positive) thresholds."""
    rng = np.random.default_rng(seed)
    path = folder / "gemma-scope-2b-pt-res" / "layer_12" / "width_16k" / "average_l0_82" / "params.npz"
    path.parent.mkdir(parents=True)
    np.savez(
        path,
        W_enc=rng.standard_normal((d_in, d_sae), dtype=np.float32),
        W_dec=rng.standard_normal((d_sae, d_in), dtype=np.float32),
        b_enc=rng.standard_normal(d_sae, dtype=np.float32),
        b_dec=rng.standard_normal(d_in, dtype=np.float32),
        threshold=np.abs(rng.standard_normal(d_sae, dtype=np.float32)),
    )
    return path


# ---------------------------------------------------------------------------------------------
# Loading official files


def test_gemma_scope_npz_encodes_exactly_as_the_reference(tmp_path: Path) -> None:
    path = gemma_scope_npz(tmp_path)
    sae = load_sae(path)
    ref = ReferenceJumpReLUSAE(16, 32)
    with np.load(path) as data:
        ref.load_state_dict({k: torch.from_numpy(data[k]) for k in data.files})
    x = torch.randn(100, 16) * 3
    with torch.no_grad():
        assert torch.equal(sae.encode(x), ref.encode(x))
        assert torch.equal(sae(x), ref(x))
    assert sae.cfg.site == "resid_post.12"
    assert sae.cfg.extra["average_l0"] == 82 and sae.cfg.extra["source"] == "gemma-scope"
    assert load_sae(path.parent).d_sae == 32  # the folder holding it loads too


def test_gemma_scope_2_safetensors_loads_lower_case_keys(tmp_path: Path) -> None:
    npz = gemma_scope_npz(tmp_path)
    folder = tmp_path / "resid_post" / "layer_9_width_16k_l0_medium"
    folder.mkdir(parents=True)
    with np.load(npz) as data:
        save_file(
            {k.lower(): torch.from_numpy(data[k]) for k in data.files}, str(folder / "params.safetensors")
        )
    sae = load_sae(folder / "params.safetensors")
    assert_same_weights(sae, load_sae(npz))
    assert sae.cfg.site == "resid_post.9"
    assert sae.cfg.extra["l0_size"] == "medium" and sae.cfg.extra["width"] == "16k"
    ref = ReferenceJumpReLUSAE(16, 32)
    ref.load_state_dict({n: getattr(sae, n).detach() for n in PARAMS})
    x = torch.randn(20, 16)
    with torch.no_grad():
        assert torch.equal(sae.encode(x), ref.encode(x))


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("arch,k", [("jumprelu", None), ("topk", 4), ("relu", None)])
def test_native_round_trip_is_exact(tmp_path: Path, arch: str, k: int | None) -> None:
    sae = random_sae(arch, k=k)
    density = torch.log10(torch.rand(32) + 1e-3)
    folder = save_sae(sae, tmp_path / "sae", log10_density=density)
    assert sorted(p.name for p in folder.iterdir()) == [
        "cfg.json",
        "sae_weights.safetensors",
        "sparsity.safetensors",
    ]
    back = load_sae(folder)
    assert type(back) is type(sae)
    assert back.cfg == sae.cfg
    assert_same_weights(sae, back)
    assert torch.equal(load_log10_density(folder), density)


def test_batchtopk_is_saved_as_jumprelu_with_one_threshold(tmp_path: Path) -> None:
    sae = random_sae("batchtopk", k=4)
    back = load_sae(save_sae(sae, tmp_path / "sae"))
    assert isinstance(back, JumpReLUSAE)
    assert torch.equal(back.threshold, torch.full((32,), 0.7))
    x = torch.randn(10, 16)
    with torch.no_grad():
        assert torch.equal(back.encode(x), sae.encode(x))


def test_native_cfg_is_saelens_v6_shaped(tmp_path: Path) -> None:
    cfg = json.loads((save_sae(random_sae("topk", k=4), tmp_path / "sae") / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 4
    assert cfg["apply_b_dec_to_input"] is False and cfg["normalize_activations"] == "none"
    meta = cfg["metadata"]
    for key in (
        "model_name",
        "hook_name",
        "context_size",
        "prepend_bos",
        "dataset_path",
        "exclude_special_tokens",
    ):
        assert key in meta
    assert meta["hook_name"] == "blocks.2.hook_resid_post"
    weights = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    assert sorted(weights) == ["W_dec", "W_enc", "b_dec", "b_enc"]


def test_every_format_round_trips_exactly(tmp_path: Path) -> None:
    sae = random_sae("jumprelu")
    native = load_sae(save_sae(sae, tmp_path / "native"))
    npz = load_sae(save_params_npz(native, tmp_path / "npz" / "params.npz"))
    gs2 = load_sae(save_params_safetensors(npz, tmp_path / "gs2" / "params.safetensors"))
    again = load_sae(save_sae(gs2, tmp_path / "native2"))
    for other in (native, npz, gs2, again):
        assert_same_weights(sae, other)
    with np.load(tmp_path / "npz" / "params.npz") as data:
        assert sorted(data.files) == sorted(PARAMS)
        assert all(data[k].dtype == np.float32 for k in data.files)
    assert sorted(load_file(str(tmp_path / "gs2" / "params.safetensors"))) == sorted(
        p.lower() for p in PARAMS
    )


def test_topk_cannot_be_exported_to_gemma_scope_files(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="JumpReLU SAEs only"):
        save_params_npz(random_sae("topk", k=4), tmp_path / "params.npz")


# ---------------------------------------------------------------------------------------------
# SAELens folders written by SAELens


def test_saelens_pre_v6_folder_with_b_dec_applied_to_input(tmp_path: Path) -> None:
    sae = random_sae("relu")
    folder = tmp_path / "saelens"
    folder.mkdir()
    save_file(
        {n: getattr(sae, n).detach().clone() for n in ("W_enc", "W_dec", "b_enc", "b_dec")},
        str(folder / "sae_weights.safetensors"),
    )
    cfg = {
        "d_in": 16,
        "d_sae": 32,
        "architecture": "standard",
        "activation_fn_str": "relu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "hook_name": "blocks.3.hook_mlp_out",
        "model_name": "gemma-2-2b",
        "context_size": 1024,
        "dataset_path": "monology/pile-uncopyrighted",
    }
    (folder / "cfg.json").write_text(json.dumps(cfg))
    loaded = load_sae(folder)
    assert loaded.cfg.architecture == "relu" and loaded.cfg.site == "mlp_out.3"
    x = torch.randn(30, 16)
    with torch.no_grad():  # SAELens encodes (x - b_dec); the loaded SAE takes raw x
        expected = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
        assert torch.allclose(loaded.encode(x), expected, atol=1e-5)


def test_saelens_topk_from_activation_fn_kwargs(tmp_path: Path) -> None:
    folder = save_sae(random_sae("topk", k=4), tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg["k"]
    cfg.update(architecture="standard", activation_fn="topk", activation_fn_kwargs={"k": 6})
    (folder / "cfg.json").write_text(json.dumps(cfg))
    assert load_sae(folder).cfg.k == 6


def test_saelens_runtime_normalisation_is_refused(tmp_path: Path) -> None:
    folder = save_sae(random_sae(), tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["normalize_activations"] = "expected_average_only_in"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="normalizes activations"):
        load_sae(folder)


# ---------------------------------------------------------------------------------------------
# Bad files


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def good_arrays() -> dict[str, np.ndarray]:
    sae = random_sae()
    return {n: getattr(sae, n).detach().numpy() for n in PARAMS}


def test_missing_key_is_a_format_error(tmp_path: Path) -> None:
    arrays = good_arrays()
    del arrays["threshold"]
    with pytest.raises(FormatError, match=r"missing keys \['threshold'\]"):
        load_sae(write_npz(tmp_path / "params.npz", **arrays))


def test_unexpected_key_is_a_format_error(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="unexpected keys"):
        load_sae(write_npz(tmp_path / "params.npz", **good_arrays(), log_feature_sparsity=np.zeros(16)))


def test_misshaped_key_is_a_format_error(tmp_path: Path) -> None:
    arrays = good_arrays()
    arrays["b_dec"] = np.zeros(15, dtype=np.float32)
    with pytest.raises(FormatError, match=r"b_dec has shape \[15\], expected \[16\]"):
        load_sae(write_npz(tmp_path / "params.npz", **arrays))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights_are_a_format_error(tmp_path: Path, bad: float) -> None:
    arrays = good_arrays()
    arrays["W_dec"][3, 4] = bad
    with pytest.raises(FormatError, match="W_dec contain NaN or inf"):
        load_sae(write_npz(tmp_path / "params.npz", **arrays))


def test_non_finite_weights_are_not_saved(tmp_path: Path) -> None:
    sae = random_sae()
    with torch.no_grad():
        sae.threshold[0] = float("nan")
    with pytest.raises(FormatError, match="threshold contain NaN"):
        save_sae(sae, tmp_path / "sae")
    assert not (tmp_path / "sae").exists()


def test_d_in_that_does_not_match_the_site_is_a_format_error(tmp_path: Path) -> None:
    folder = save_sae(random_sae(), tmp_path / "sae")
    assert load_sae(folder, d_in=16).d_in == 16
    with pytest.raises(
        FormatError, match="has d_in 16, but the site of site resid_post.2 it should read has d_in 640"
    ):
        load_sae(folder, d_in=640)


def test_unreadable_or_missing_files_are_format_errors(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="does not exist"):
        load_sae(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match="no SAE in folder"):
        load_sae(tmp_path / "empty")
    (tmp_path / "params.npz").write_bytes(b"not a zip file")
    with pytest.raises(FormatError, match="cannot read"):
        load_sae(tmp_path / "params.npz")
    folder = save_sae(random_sae(), tmp_path / "sae")
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(FormatError, match="cannot read"):
        load_sae(folder)


def test_saving_never_overwrites_an_sae(tmp_path: Path) -> None:
    folder = save_sae(random_sae(), tmp_path / "sae")
    before = (folder / "sae_weights.safetensors").read_bytes()
    with pytest.raises(FormatError, match="refusing to overwrite"):
        save_sae(random_sae("relu"), folder)
    assert (folder / "sae_weights.safetensors").read_bytes() == before
    save_sae(random_sae("relu"), folder, overwrite=True)
    assert load_sae(folder).cfg.architecture == "relu"
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.old"))


# ---------------------------------------------------------------------------------------------
# Run-folder layout


def test_sae_dir_id_and_find(tmp_path: Path) -> None:
    folder = sae_dir(tmp_path, "resid_post.6", 4096, 51.6)
    assert folder == tmp_path / "saes" / "resid_post" / "layer_6" / "width_4096" / "l0_52"
    assert sae_id(folder) == "resid_post.6.w4096.l0_52"
    topk = sae_dir(tmp_path, "blocks.6.hook_resid_post", 4096, 52, kind="topk")
    assert topk.name == "l0_52_topk" and sae_id(topk) == "resid_post.6.w4096.l0_52_topk"
    save_sae(random_sae(), folder)
    save_sae(random_sae("topk", k=4), topk)
    (tmp_path / "saes" / "resid_post" / "layer_6" / "width_4096" / "l0_9.tmp").mkdir()
    assert find_saes(tmp_path) == [folder, topk]


# ---------------------------------------------------------------------------------------------
# gemmascope convert


def test_convert_command_between_formats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = gemma_scope_npz(tmp_path)
    assert main(["convert", str(src), str(tmp_path / "native")]) == 0
    assert "jumprelu SAE d_in 16 d_sae 32 (resid_post.12)" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "native"), str(tmp_path / "out"), "--to", "npz"]) == 0
    assert (
        main(["convert", str(tmp_path / "out" / "params.npz"), str(tmp_path / "gs2"), "--to", "safetensors"])
        == 0
    )
    assert_same_weights(load_sae(src), load_sae(tmp_path / "gs2" / "params.safetensors"))
    assert_same_weights(load_sae(src), load_sae(tmp_path / "native"))
    assert main(["convert", str(src), str(tmp_path / "native")]) == 2  # never overwrites
    assert "refusing to overwrite" in capsys.readouterr().err


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` but the writer lock (which a writer leaves, empty, when it is done)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def test_convert_overwrite_replaces_only_an_sae_folder_never_src(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = save_sae(random_sae(), tmp_path / "run" / "saes" / "resid_post" / "layer_1" / "width_32" / "l0_5")
    (src / "eval.json").write_text('{"mine": 1}')
    report = tmp_path / "report"  # a folder that is not an SAE: `cp -a RUN/report /tmp/x`
    report.mkdir()
    (report / "evals.json").write_text("{}")
    (report / "plot.png").write_bytes(b"png")
    before = _snapshot(tmp_path)
    assert main(["convert", "--overwrite", str(src), str(report)]) == 2
    err = capsys.readouterr().err
    assert "is not an SAE folder" in err and "evals.json" in err and err.count("\n") == 1
    assert main(["convert", "--overwrite", str(src), str(src)]) == 2  # onto itself
    assert "is the source itself" in capsys.readouterr().err
    assert main(["convert", "--overwrite", str(src), str(src.parent / "." / src.name)]) == 2
    assert _snapshot(tmp_path) == before  # eval.json and the report untouched
    other = save_sae(random_sae("relu"), tmp_path / "other")
    assert main(["convert", "--overwrite", str(src), str(other)]) == 0  # an SAE folder is replaced
    assert load_sae(other).cfg.architecture == "jumprelu"
    assert not list(tmp_path.glob("*.old")) and not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("to, name", [("npz", "params.npz"), ("safetensors", "params.safetensors")])
def test_convert_to_a_file_never_overwrites_without_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], to: str, name: str
) -> None:
    src = save_sae(random_sae(), tmp_path / "sae")
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_bytes(b"someone else's file")
    assert main(["convert", str(src), str(out), "--to", to]) == 2
    err = capsys.readouterr().err
    assert "already exists; refusing to overwrite it (pass --overwrite)" in err
    assert (out / name).read_bytes() == b"someone else's file"
    assert main(["convert", str(src), str(out / name), "--to", to, "--overwrite"]) == 0
    assert_same_weights(load_sae(src), load_sae(out / name))
    beside = (
        ["config.json"] if name == "params.safetensors" else []
    )  # Gemma Scope 2's layout: the sites beside it
    assert sorted(p.name for p in out.iterdir()) == sorted([name, *beside])


def test_convert_writes_no_config_json_it_was_not_asked_to(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An export to Gemma Scope 2's layout writes a config.json beside its file: never over one
    that exists without --overwrite, and never over one that is not an SAE's (a model folder's)."""
    src = save_sae(random_sae(), tmp_path / "sae")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "gemma3_text"}')
    for flags in ([], ["--overwrite"]):
        assert (
            main(["convert", str(src), str(model / "params.safetensors"), "--to", "safetensors", *flags]) == 2
        )
        err = capsys.readouterr().err
        assert "config.json" in err and err.count("\n") == 1
        assert sorted(p.name for p in model.iterdir()) == ["config.json"]
        assert (model / "config.json").read_text() == '{"model_type": "gemma3_text"}'
    out = tmp_path / "export"
    assert main(["convert", str(src), str(out), "--to", "safetensors"]) == 0
    assert (
        main(["convert", str(src), str(out), "--to", "safetensors", "--overwrite"]) == 0
    )  # its own: replaced
    assert_same_weights(load_sae(src), load_sae(out / "params.safetensors"))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_convert_never_replaces_any_part_of_its_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = save_sae(random_sae(), tmp_path / "sae")
    assert main(["convert", str(src), str(tmp_path / "gs2"), "--to", "safetensors"]) == 0
    gs2 = tmp_path / "gs2" / "params.safetensors"
    before = _files(tmp_path)
    cases = [
        [str(src), str(src / "sae_weights.safetensors"), "--to", "safetensors"],  # a file of the source
        [str(src), str(src / "inner"), "--to", "npz"],  # inside the source folder
        [str(gs2), str(gs2.with_name("other.safetensors")), "--to", "safetensors"],  # its config.json
        [str(gs2), str(tmp_path / "gs2"), "--to", "native"],  # a folder holding the source
    ]
    for argv in cases:
        assert main(["convert", "--overwrite", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert "source" in err and err.count("\n") == 1, err
        assert _files(tmp_path) == before, argv
