"""Tests for models.py and sites.py: sites, capture, edits, loading errors (tiny model) and the real
Gemma 3 270M."""

from __future__ import annotations

import pytest
import torch

from gemmascope.errors import ConfigError, ModelError
from gemmascope.models import LanguageModel, load_model, output_head, reading_dtype, token_texts
from gemmascope.sites import (
    Site,
    capture,
    capture_batches,
    edit_site,
    parse_site,
    site_d_in,
    transcoder_sites,
)


@pytest.mark.parametrize(
    "spec, site",
    [
        ("resid_post.6", Site("resid_post", 6)),
        ("resid_post/layer_6", Site("resid_post", 6)),
        ("attn_out/3", Site("attn_out", 3)),
        ("blocks.6.hook_resid_post", Site("resid_post", 6)),
        ("blocks.2.attn.hook_z", Site("attn_out", 2)),
        ("blocks.11.hook_mlp_out", Site("mlp_out", 11)),
        ("blocks.1.hook_mlp_in", Site("mlp_in", 1)),
    ],
)
def test_parse_site_accepts_our_names_and_transformerlens_aliases(spec: str, site: Site) -> None:
    assert parse_site(spec) == site
    assert parse_site(site.hook_name) == site
    assert parse_site(str(site)) == site


def test_parse_site_errors_name_the_value_and_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"'resid_pre.3'.*resid_post, attn_out, mlp_out, mlp_in"):
        parse_site("resid_pre.3")
    with pytest.raises(ConfigError, match=r"layer 18 .* valid layers are 0..17"):
        parse_site("resid_post.18", n_layers=18)


def test_unknown_model_name_is_a_clear_error() -> None:
    with pytest.raises(ModelError, match=r"unknown model 'gemma-9000'.*gemma-3-270m"):
        load_model("gemma-9000")


def _plain_hooks(
    model: LanguageModel, input_ids: torch.Tensor, sites: list[Site]
) -> dict[Site, torch.Tensor]:
    """Reference capture with ordinary transformers forward hooks and a full forward pass."""
    out: dict[Site, torch.Tensor] = {}
    handles = []
    for site in sites:
        block = model.hf.model.layers[site.layer]
        if site.kind == "resid_post":
            handles.append(
                block.register_forward_hook(
                    lambda m, a, o, s=site: out.__setitem__(s, o[0] if isinstance(o, tuple) else o)
                )
            )
        elif site.kind == "attn_out":
            handles.append(
                block.self_attn.o_proj.register_forward_pre_hook(
                    lambda m, a, s=site: out.__setitem__(s, a[0])
                )
            )
        elif site.kind == "mlp_out":
            handles.append(
                block.post_feedforward_layernorm.register_forward_hook(
                    lambda m, a, o, s=site: out.__setitem__(s, o)
                )
            )
        else:
            handles.append(
                block.pre_feedforward_layernorm.register_forward_hook(
                    lambda m, a, o, s=site: out.__setitem__(s, o)
                )
            )
    with torch.no_grad():
        model.hf(input_ids=input_ids)
    for h in handles:
        h.remove()
    return out


def test_reading_dtype_by_name_and_cast_rounds_a_copy(
    tiny_model: LanguageModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gemmascope import models

    assert reading_dtype("float32") == torch.float32
    assert reading_dtype("bfloat16") == torch.bfloat16
    for native, want in ((True, torch.bfloat16), (False, torch.float32)):  # auto: the CPU's flags
        monkeypatch.setattr(models, "_cpu_has_bf16", lambda native=native: native)
        assert reading_dtype("auto") == want
    with pytest.raises(ConfigError, match="model dtype 'float64': expected one of auto, float32, bfloat16"):
        reading_dtype("float64")
    fast = tiny_model.cast(torch.bfloat16)
    assert tiny_model.cast(torch.float32) is tiny_model
    assert fast.hf.dtype == torch.bfloat16 and tiny_model.hf.dtype == torch.float32  # the original kept
    w, v = tiny_model.layers[0].mlp.up_proj.weight, fast.layers[0].mlp.up_proj.weight
    assert torch.equal(v, w.to(torch.bfloat16))
    assert fast.hf.get_output_embeddings().weight is fast.hf.get_input_embeddings().weight  # still tied
    assert {b.dtype for b in fast.hf.buffers()} == {b.dtype for b in tiny_model.hf.buffers()}  # e.g. RoPE
    ids = tiny_model.to_tokens("Sparse autoencoders read the residual stream.")
    got = capture(fast, ids, [Site("resid_post", 1)])[Site("resid_post", 1)]
    want = capture(tiny_model, ids, [Site("resid_post", 1)])[Site("resid_post", 1)]
    assert got.dtype == torch.float32  # capture gives float32 whatever the model's dtype
    assert float((got - want).norm() / want.norm()) < 0.03


def test_capture_equals_plain_forward_hooks(tiny_model: LanguageModel) -> None:
    every = [
        Site(kind, layer)
        for layer in range(tiny_model.n_layers)
        for kind in ("resid_post", "attn_out", "mlp_out")
    ]
    sites = [*every, *transcoder_sites(1)]
    ids = torch.randint(3, 1000, (2, 20))
    ids[:, 0] = tiny_model.tokenizer.bos_token_id
    got = capture(tiny_model, ids, sites)
    want = _plain_hooks(tiny_model, ids, sites)
    for site in sites:
        assert got[site].shape == (2, 20, site_d_in(tiny_model, site))
        torch.testing.assert_close(got[site], want[site], rtol=0, atol=0)


def test_capture_stops_after_the_deepest_layer(tiny_model: LanguageModel) -> None:
    ran: list[int] = []
    handles = [
        layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
        for i, layer in enumerate(tiny_model.layers)
    ]
    try:
        capture(tiny_model, tiny_model.to_tokens("hello there"), [Site("mlp_out", 1), Site("attn_out", 0)])
    finally:
        for h in handles:
            h.remove()
    assert ran == [0, 1]


def test_capture_rejects_a_layer_out_of_range(tiny_model: LanguageModel) -> None:
    with pytest.raises(ConfigError, match="layer 9 is out of range"):
        capture(tiny_model, tiny_model.to_tokens("hi"), [Site("resid_post", 9)])


@pytest.mark.parametrize("kind", ["resid_post", "attn_out", "mlp_out", "mlp_in"])
def test_edit_site_changes_the_forward_pass_and_is_removed_afterwards(
    tiny_model: LanguageModel, kind: str
) -> None:
    ids = tiny_model.to_tokens("The quick brown fox")
    site = Site(kind, 1)
    with torch.no_grad():
        clean = tiny_model.hf(ids).logits
        with edit_site(tiny_model, site, lambda act: act):
            same = tiny_model.hf(ids).logits
        with edit_site(tiny_model, site, lambda act: act * 0):
            zeroed = tiny_model.hf(ids).logits
        with pytest.raises(RuntimeError), edit_site(tiny_model, site, lambda act: act * 0):
            raise RuntimeError("boom")
        after = tiny_model.hf(ids).logits
    assert torch.equal(clean, same)
    assert not torch.allclose(clean, zeroed)
    assert torch.equal(clean, after)


@pytest.mark.real
def test_real_gemma_loads_from_cache_and_predicts_sensibly(real_model: LanguageModel) -> None:
    cfg = real_model.config
    assert (real_model.n_layers, real_model.d_model, cfg.num_attention_heads, cfg.head_dim) == (
        18,
        640,
        4,
        256,
    )
    assert site_d_in(real_model, Site("attn_out", 0)) == 1024
    ids = real_model.to_tokens("The capital of France is Paris, and the capital of Germany is")
    with torch.no_grad():
        logits = real_model.hf(ids).logits[0, -1]
    assert real_model.tokenizer.decode(int(logits.argmax())).strip() == "Berlin"


@pytest.mark.real
def test_real_capture_equals_plain_forward_hooks(real_model: LanguageModel) -> None:
    sites = [Site("resid_post", 6), Site("attn_out", 6), Site("mlp_out", 6), Site("mlp_in", 3)]
    ids = real_model.to_tokens("Gemma Scope is a suite of sparse autoencoders trained on every layer.")
    got = capture(real_model, ids, sites)
    want = _plain_hooks(real_model, ids, sites)
    for site in sites:
        torch.testing.assert_close(got[site], want[site], rtol=0, atol=0)


def test_token_texts_join_characters_split_over_byte_tokens(tiny_model: LanguageModel) -> None:
    """A narrow no-break space is three byte-fallback tokens, each "\ufffd" alone: its text goes on
    the last of them; every other token keeps its own text, and the texts join to the text."""
    text = "1,855,000\u202fkm2 café"
    ids = tiny_model.tokenizer(text, add_special_tokens=False)["input_ids"]
    alone = [tiny_model.tokenizer.decode([i]) for i in ids]
    assert alone.count("\ufffd") == 3  # the premise: three byte tokens
    texts = token_texts(tiny_model.tokenizer, ids)
    first = alone.index("\ufffd")
    assert texts[first : first + 3] == ["", "", "\u202f"]
    assert [t for j, t in enumerate(texts) if not first <= j < first + 3] == [
        t for j, t in enumerate(alone) if not first <= j < first + 3
    ]
    assert "".join(texts) == text
    # A character cut off at the end of a window stays as it was.
    assert token_texts(tiny_model.tokenizer, ids[: first + 2]) == alone[: first + 2]


def test_capture_with_the_trunk_runs_to_the_output_layer(tiny_model: LanguageModel) -> None:
    ids = torch.randint(3, 1000, (2, 12))
    sites = [Site("resid_post", 1), Site("mlp_out", 2)]
    acts, trunk = capture(tiny_model, ids, sites, trunk=True)
    with torch.no_grad():
        out = tiny_model.hf(input_ids=ids, use_cache=False, output_hidden_states=True)
    # the output layer's input, what the logits are made of, and every layer's output
    head = output_head(tiny_model)
    torch.testing.assert_close(head.logits(trunk.final), out.logits, rtol=0, atol=1e-5)
    assert len(trunk.outputs) == tiny_model.n_layers
    torch.testing.assert_close(trunk.outputs[1], acts[Site("resid_post", 1)], rtol=0, atol=0)
    # hidden_states[i + 1] is what layer i returned (the last one is after the final norm)
    for i in range(tiny_model.n_layers - 1):
        torch.testing.assert_close(trunk.outputs[i], out.hidden_states[i + 1], rtol=0, atol=0)
    stopped = capture(tiny_model, ids, sites)
    for site in sites:
        torch.testing.assert_close(acts[site], stopped[site], rtol=0, atol=0)


def test_output_head_is_the_models_own_logits_or_an_error() -> None:
    model = load_model("tiny-gemma3")  # its own: the head is checked once per loaded model
    ids = torch.randint(3, 1000, (2, 12))
    model.hf.config.final_logit_softcapping = 0.5  # Gemma 2's soft-capping, read at every forward
    head = output_head(model)
    assert head.softcap == 0.5 and head.vocab == model.hf.config.vocab_size
    _, trunk = capture(model, ids, [], trunk=True)
    with torch.no_grad():
        want = model.hf(input_ids=ids, use_cache=False).logits
    assert float(want.abs().max()) <= 0.5
    torch.testing.assert_close(head.logits(trunk.final), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(head.logits(trunk.final, 100, 200), want[..., 100:200], rtol=0, atol=1e-6)
    assert output_head(model) is head  # checked once
    other = load_model("tiny-gemma3")
    other.hf.register_forward_hook(lambda _m, _a, out: out.__setitem__("logits", out.logits * 2) or out)
    with pytest.raises(ModelError, match="not its output layer's linear map"):
        output_head(other)


def test_capture_batches_walks_rows_in_order_and_cuts_padding(tiny_model: LanguageModel) -> None:
    rows = torch.randint(3, 1000, (5, 10))
    site = Site("resid_post", 1)
    batches = list(capture_batches(tiny_model, rows, [site], 2, start=1, trunk=True))
    assert [(b.start, b.stop) for b in batches] == [(1, 3), (3, 5)]
    for b in batches:
        acts, trunk = capture(tiny_model, rows[b.start : b.stop], [site], trunk=True)
        assert b.trunk is not None and torch.equal(b.trunk.final, trunk.final)
        assert torch.equal(b.acts[site], acts[site])
    lengths = [10, 4, 6, 3, 2]
    mask = (torch.arange(10) < torch.tensor(lengths)[:, None]).long()
    cut = list(capture_batches(tiny_model, rows, [site], 2, attention_mask=mask))
    assert [tuple(b.ids.shape) for b in cut] == [(2, 10), (2, 6), (1, 2)]
    assert cut[1].attention_mask is not None and cut[1].attention_mask.tolist() == mask[2:4, :6].tolist()
    with pytest.raises(ConfigError, match="batch_rows=0"):
        next(capture_batches(tiny_model, rows, [site], 0))
