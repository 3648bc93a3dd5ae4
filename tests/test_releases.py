"""Tests for releases.py: official Gemma Scope / Gemma Scope 2 names resolve to the right repository,
file, model and site, and load offline from a local folder of the hub's layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gemmascope.architectures import JumpReLUSAE
from gemmascope.errors import ConfigError, FormatError
from gemmascope.formats import save_params_npz, save_params_safetensors
from gemmascope.releases import load_release, release_file, resolve
from gemmascope.sae import SAEConfig


def _random_jumprelu(d_in: int = 16, d_sae: int = 32) -> JumpReLUSAE:
    sae = JumpReLUSAE(SAEConfig("jumprelu", d_in=d_in, d_sae=d_sae))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec):
            p.copy_(torch.randn(p.shape, generator=gen))
        sae.threshold.copy_(torch.rand(d_sae, generator=gen))
    return sae


def test_gemma_scope_names_resolve_like_the_hub() -> None:
    where = resolve("gemma-scope-2b-pt-res", "layer_20/width_16k/average_l0_71")
    assert where.repo_id == "google/gemma-scope-2b-pt-res"
    assert where.filename == "layer_20/width_16k/average_l0_71/params.npz"
    assert (where.model_name, where.site) == ("google/gemma-2-2b", "resid_post.20")
    assert resolve("gemma-scope-9b-it-att", "layer_3/width_131k/average_l0_12").site == "attn_out.3"
    assert (
        resolve("gemma-scope-9b-it-mlp", "layer_3/width_16k/average_l0_12").model_name
        == "google/gemma-2-9b-it"
    )


def test_gemma_scope_2_names_resolve_and_270m_uses_the_bundled_model() -> None:
    where = resolve("gemma-scope-2-270m-pt", "resid_post/layer_6_width_16k_l0_small")
    assert where.filename == "resid_post/layer_6_width_16k_l0_small/params.safetensors"
    assert (where.model_name, where.site) == ("gemma-3-270m", "resid_post.6")
    assert (
        resolve("gemma-scope-2-1b-pt", "resid_post_all/layer_12_width_16k_l0_big").model_name
        == "google/gemma-3-1b-pt"
    )


@pytest.mark.parametrize(
    "release, sae_id, message",
    [
        (
            "gemma-scope-3b-pt-res",
            "layer_1/width_16k/average_l0_5",
            "unknown release 'gemma-scope-3b-pt-res'",
        ),
        ("gemma-scope-2b-pt-res", "layer_20/width_16k/canonical", "average_l0"),
        ("gemma-scope-2-270m-pt", "layer_6_width_16k", "KIND/layer_L_width_W_l0_SIZE"),
    ],
)
def test_bad_names_are_clear_errors(release: str, sae_id: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve(release, sae_id)


def test_load_release_offline_from_a_local_copy_of_the_hub_layout(tmp_path: Path) -> None:
    sae = _random_jumprelu()
    save_params_npz(
        sae, tmp_path / "gemma-scope-2b-pt-res" / "layer_3/width_16k/average_l0_71" / "params.npz"
    )
    save_params_safetensors(
        sae, tmp_path / "gemma-scope-2-270m-pt" / "mlp_out/layer_5_width_16k_l0_medium" / "params.safetensors"
    )
    x = torch.randn(7, 16)
    pre = x @ sae.W_enc.detach() + sae.b_enc.detach()
    reference = (pre > sae.threshold.detach()) * torch.relu(pre)  # the Gemma Scope tutorial's JumpReLUSAE

    gs1 = load_release("gemma-scope-2b-pt-res", "layer_3/width_16k/average_l0_71", root=tmp_path)
    assert (gs1.cfg.model_name, gs1.cfg.site, gs1.cfg.hook_name) == (
        "google/gemma-2-2b",
        "resid_post.3",
        "blocks.3.hook_resid_post",
    )
    gs2 = load_release("gemma-scope-2-270m-pt", "mlp_out/layer_5_width_16k_l0_medium", root=tmp_path)
    assert (gs2.cfg.model_name, gs2.cfg.site) == ("gemma-3-270m", "mlp_out.5")
    with torch.no_grad():
        assert torch.equal(gs1.encode(x), reference)
        assert torch.equal(gs2.encode(x), reference)


def test_a_missing_local_file_names_the_expected_path(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="gemma-scope-2b-pt-res/layer_1/width_16k/average_l0_9/params.npz"):
        release_file("gemma-scope-2b-pt-res", "layer_1/width_16k/average_l0_9", root=tmp_path)


def test_without_a_local_copy_the_hub_is_asked_for_the_right_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[tuple[str, str]] = []
    path = tmp_path / "params.npz"
    np.savez(path, **{k: v.detach().numpy() for k, v in _random_jumprelu().state_dict().items()})

    def fake_download(repo_id: str, filename: str, **_: object) -> str:
        asked.append((repo_id, filename))
        return str(path)

    import huggingface_hub

    monkeypatch.delenv("GEMMASCOPE_RELEASES", raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    sae = load_release("gemma-scope-2b-pt-res", "layer_20/width_16k/average_l0_71")
    assert asked == [("google/gemma-scope-2b-pt-res", "layer_20/width_16k/average_l0_71/params.npz")]
    assert sae.cfg.site == "resid_post.20"


def test_hub_offline_fails_at_once_with_the_way_out(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from huggingface_hub import constants

    monkeypatch.delenv("GEMMASCOPE_RELEASES", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    started = time.monotonic()
    with pytest.raises(FormatError, match="HF_HUB_OFFLINE is set.*GEMMASCOPE_RELEASES"):
        release_file("gemma-scope-2-270m-pt", "resid_post/layer_6_width_16k_l0_small")
    assert time.monotonic() - started < 5


def test_a_release_transcoder_and_release_ids_on_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Gemma Scope 2 transcoder folder (with affine_skip_connection, no config.json of ours) loads
    as MLP input -> output; `--sae RELEASE/ID` resolves through $GEMMASCOPE_RELEASES."""
    from gemmascope.opening import open_sae, resolve_sae
    from gemmascope.sae import SAEConfig

    tc = JumpReLUSAE(SAEConfig("jumprelu", 16, 32, site="mlp_in.5", out_site="mlp_out.5", affine_skip=True))
    with torch.no_grad():
        for _, p in tc.named_parameters():
            p.normal_(0, 0.1)
    ident = "transcoder_all/layer_5_width_16k_l0_small"
    path = save_params_safetensors(tc, tmp_path / "gemma-scope-2-270m-pt" / ident / "params.safetensors")
    (path.parent / "config.json").unlink()  # the release's own files only
    got = load_release("gemma-scope-2-270m-pt", ident, root=tmp_path)
    assert (got.cfg.site, got.cfg.out_site, got.cfg.affine_skip) == ("mlp_in.5", "mlp_out.5", True)
    x = torch.randn(3, 16)
    assert torch.allclose(got(x), tc(x), atol=1e-6)
    monkeypatch.setenv("GEMMASCOPE_RELEASES", str(tmp_path))
    key, folder = resolve_sae(f"gemma-scope-2-270m-pt/{ident}", None)
    assert key == f"gemma-scope-2-270m-pt/{ident}" and folder == path.parent
    key, folder, opened = open_sae(f"gemma-scope-2-270m-pt/{ident}", None)  # what steer, inspect, serve load
    assert (opened.cfg.site, opened.cfg.out_site, opened.cfg.model_name) == (
        "mlp_in.5",
        "mlp_out.5",
        "gemma-3-270m",
    )
