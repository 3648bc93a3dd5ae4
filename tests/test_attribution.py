"""Attribution graphs on the tiny Gemma 3 with random transcoders: the replacement model's edges add
up exactly to what each node reads (features: their pre-activation; logits: the demeaned logit),
the influence-ordered feature cap, pruning, the JSON and PNG files, interventions (predicted against
measured), the `attribute` command, and bad input."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from gemmascope.attribution import (
    attribute,
    capture_prompt,
    draw_graph,
    graph_name,
    graph_slug,
    intervene,
    prune,
    scores,
    transcoder_set,
)
from gemmascope.attribution.dictionary import dictionary_of
from gemmascope.attribution.files import (
    KEY_WIDTH,
    _key_label,
    _title,
    graph_json,
    plot_graph,
    read_graph,
    transcoder_digest,
    write_graph,
)
from gemmascope.attribution.intervene import measure, predict, strongest
from gemmascope.cli import main
from gemmascope.clt import CLTConfig, CrossLayerTranscoder
from gemmascope.errors import ConfigError, SiteError, StoreError
from gemmascope.formats import save_sae
from gemmascope.models import LanguageModel
from gemmascope.sae import JumpReLUSAE, SAEConfig

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "The cat sat on the mat and"


def random_transcoders(model: LanguageModel, skip: bool = True, seed: int = 0) -> list[JumpReLUSAE]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for layer in range(model.n_layers):
        cfg = SAEConfig(
            "jumprelu", model.d_model, 64, model_name=model.name, site=f"mlp_in.{layer}",
            out_site=f"mlp_out.{layer}", affine_skip=skip,
        )  # fmt: skip
        tc = JumpReLUSAE(cfg)
        with torch.no_grad():
            tc.W_enc.copy_(torch.randn(tc.W_enc.shape, generator=g) * 0.3)
            tc.W_dec.copy_(torch.randn(tc.W_dec.shape, generator=g) * 0.1)
            if tc.W_skip is not None:
                tc.W_skip.copy_(torch.randn(tc.W_skip.shape, generator=g) * 0.05)
            tc.threshold.fill_(0.5)
        out.append(tc)
    return out


@contextmanager
def uneven_mlp_inputs(model: LanguageModel) -> Iterator[None]:
    """Within the block, the tiny model's MLP-input norms have random gains, so the MLP inputs'
    norms differ from position to position (with unit gains every one is exactly √d_model), and a
    norm limit can leave some out as massive; the gains are put back on exit."""
    norms = [layer.pre_feedforward_layernorm.weight for layer in model.layers]  # type: ignore[union-attr]
    saved = [w.detach().clone() for w in norms]
    g = torch.Generator().manual_seed(5)
    try:
        with torch.no_grad():
            for w in norms:
                w.copy_(torch.randn(w.shape, generator=g))
        yield
    finally:
        with torch.no_grad():
            for w, old in zip(norms, saved, strict=True):
                w.copy_(old)


@pytest.fixture(scope="module")
def transcoders(tiny_model: LanguageModel) -> list[JumpReLUSAE]:
    return random_transcoders(tiny_model)


@pytest.mark.parametrize("skip", [True, False])
def test_edges_add_up_to_what_each_node_reads(tiny_model: LanguageModel, skip: bool) -> None:
    """With b_dec = 0 and the first position kept, every write into the residual stream is a node,
    so a feature's incoming edges sum to its pre-activation (without b_enc) and a logit's to the
    demeaned logit, exactly: the frozen linear model reproduces the real forward pass."""
    tcs = random_transcoders(tiny_model, skip)
    graph = attribute(tiny_model, tcs, PROMPT, first_position=0, progress=False)
    assert graph.n_features > 50 and graph.adjacency.shape[0] == graph.logit_start + len(graph.logit_ids)
    captured = capture_prompt(tiny_model, graph.ids)
    for j in range(0, graph.n_features, 17):
        layer, pos, latent = graph.features[j].tolist()
        read = float(captured.mlp_in[layer][pos] @ tcs[layer].W_enc[:, latent].detach())
        assert float(graph.adjacency[j].sum()) == pytest.approx(read, rel=1e-4, abs=1e-4)
        later = graph.features[:, 0] >= layer
        assert not graph.adjacency[j, : graph.n_features][later].any()  # only earlier layers feed it
    with torch.no_grad():  # no softcapping here: logit - mean logit = final hidden · (W_U[t] - mean W_U)
        logits = tiny_model.hf(input_ids=graph.ids[None], use_cache=False).logits[0, -1]
    for k, token in enumerate(graph.logit_ids.tolist()):
        read = float(logits[token] - logits.mean())
        assert float(graph.adjacency[graph.logit_start + k].sum()) == pytest.approx(read, rel=1e-4, abs=1e-4)
    assert graph.logit_probs.sum() <= 1 and len(graph.logit_ids) <= 10


def test_a_massive_input_has_no_feature_and_its_mlp_output_is_all_error(tiny_model: LanguageModel) -> None:
    """The per-SAE rule in the graph: where a transcoder's input is over its norm limit it has no
    feature node, writes no skip connection, and its error node carries the MLP's whole output; the
    edges still add up exactly to what each node reads."""
    from gemmascope.attribution.graph import _components
    from gemmascope.attribution.replacement import massive_positions

    tcs = random_transcoders(tiny_model, skip=True)
    with uneven_mlp_inputs(tiny_model):
        ids = attribute(tiny_model, tcs, PROMPT, first_position=0, progress=False).ids
        captured = capture_prompt(tiny_model, ids)
        for layer, tc in enumerate(tcs):  # about a third of the positions over the limit at each layer
            tc.cfg.max_norm = float(captured.mlp_in[layer].norm(dim=-1).quantile(0.66))
        massive = massive_positions(dictionary_of(tiny_model, tcs), captured)
        assert all(0 < int(m.sum()) < len(ids) for m in massive)
        graph = attribute(tiny_model, tcs, PROMPT, first_position=0, progress=False)
        with torch.no_grad():
            logits = tiny_model.hf(input_ids=graph.ids[None], use_cache=False).logits[0, -1]
    for layer, pos in zip(*torch.nonzero(torch.stack(massive), as_tuple=True), strict=True):
        at = (graph.features[:, 0] == layer) & (graph.features[:, 1] == pos)
        assert not at.any(), (int(layer), int(pos))
    _, _, errors = _components(dictionary_of(tiny_model, tcs), captured, 0)
    for layer in range(len(tcs)):
        assert torch.equal(errors[layer][massive[layer]], captured.mlp_out[layer][massive[layer]])
    for j in range(0, graph.n_features, 7):
        layer, pos, latent = graph.features[j].tolist()
        read = float(captured.mlp_in[layer][pos] @ tcs[layer].W_enc[:, latent].detach())
        assert float(graph.adjacency[j].sum()) == pytest.approx(read, rel=1e-4, abs=1e-4)
    for k, token in enumerate(graph.logit_ids.tolist()):
        read = float(logits[token] - logits.mean())
        assert float(graph.adjacency[graph.logit_start + k].sum()) == pytest.approx(read, rel=1e-4, abs=1e-4)


def test_bos_is_left_out_and_a_feature_cap_keeps_rows_exact(
    tiny_model: LanguageModel, transcoders: list[JumpReLUSAE]
) -> None:
    full = attribute(tiny_model, transcoders, PROMPT, progress=False)
    assert (full.features[:, 1] > 0).all()  # no feature node at BOS
    errors_at_bos = full.adjacency[:, full.error_start : full.token_start].view(
        -1, full.n_layers, full.n_pos
    )[..., 0]
    assert not errors_at_bos.any()
    capped = attribute(tiny_model, transcoders, PROMPT, max_feature_nodes=40, batch_size=8, progress=False)
    assert capped.n_features == 40
    rows = {tuple(f): i for i, f in enumerate(full.features.tolist())}
    pick = torch.tensor([rows[tuple(f)] for f in capped.features.tolist()])
    assert torch.allclose(capped.adjacency[:40, :40], full.adjacency[pick][:, pick], atol=1e-5)
    tail = full.error_start
    assert torch.allclose(capped.adjacency[:40, 40:], full.adjacency[pick][:, tail:], atol=1e-5)
    # the cap keeps the features most influential on the logits, not the first ones
    assert capped.features[:, 0].max() >= 2


def test_pruning_and_scores(tiny_model: LanguageModel, transcoders: list[JumpReLUSAE]) -> None:
    graph = attribute(tiny_model, transcoders, PROMPT, progress=False)
    pruned = prune(graph)
    assert pruned.nodes[graph.token_start :].all()  # tokens and logits are always kept
    kept = torch.nonzero(pruned.nodes[: graph.n_features]).squeeze(1)
    assert 0 < kept.numel() < graph.n_features
    assert pruned.edges[kept].any(1).all() and pruned.edges[:, kept].any(0).all()
    assert not pruned.edges[~pruned.nodes].any() and not pruned.edges[:, ~pruned.nodes].any()
    replacement, completeness = scores(graph)
    assert 0 < replacement < 1 and 0 < completeness < 1
    looser = prune(graph, 0.95, 0.99)
    assert looser.nodes.sum() > pruned.nodes.sum()
    with pytest.raises(ConfigError, match="node_threshold 1.5"):
        prune(graph, 1.5)


def test_graph_files(tiny_model: LanguageModel, transcoders: list[JumpReLUSAE], tmp_path: Path) -> None:
    graph = attribute(tiny_model, transcoders, PROMPT, progress=False)
    digest = transcoder_digest(transcoders)
    data = graph_json(graph, "cat", run="r", digest=digest, explanations={})
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    kinds = {n["feature_type"] for n in data["nodes"]}
    assert {"cross layer transcoder", "embedding", "logit"} <= kinds
    ids = {n["node_id"] for n in data["nodes"]}
    assert all(link["source"] in ids and link["target"] in ids for link in data["links"])
    logits = [n for n in data["nodes"] if n["feature_type"] == "logit"]
    assert sum(n["is_target_logit"] for n in logits) == 1 and logits[0]["layer"] == str(
        tiny_model.n_layers + 1
    )
    feature = next(n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder")
    layer, latent, pos = (int(v) for v in feature["node_id"].split("_"))
    assert feature["layer"] == str(layer) and feature["ctx_idx"] == pos
    path = write_graph(tmp_path / "cat.json", data)
    assert read_graph(path, digest)["metadata"]["prompt"] == PROMPT
    with pytest.raises(StoreError, match="another transcoder set"):
        read_graph(path, transcoder_digest(random_transcoders(tiny_model, seed=1)))
    assert plot_graph(data, tmp_path / "cat.png").stat().st_size > 20_000


def test_the_pictures_outputs_stand_apart_the_likeliest_rightmost() -> None:
    from gemmascope.attribution.files import _layout

    outputs = [
        {"node_id": f"19_{k}_5", "ctx_idx": 5, "layer": "19", "feature_type": "logit", "token_prob": p}
        for k, p in enumerate([0.05, 0.3, 0.01, 0.1, 0.02, 0.04, 0.03, 0.2, 0.06, 0.07])
    ]
    feature = {"node_id": "3_7_5", "ctx_idx": 5, "layer": "3", "feature_type": "cross layer transcoder"}
    xy = _layout([*outputs, feature])
    xs = sorted(xy[n["node_id"]][0] for n in outputs)
    assert min(b - a for a, b in zip(xs[:-1], xs[1:], strict=True)) >= 0.5  # a diamond and its label each
    assert xs[0] >= -0.5 and xy["19_1_5"][0] == xs[-1] == 5.0  # inside the plot; p = 0.3 rightmost
    assert xy["3_7_5"] == (5.0, 3.0)


def test_interventions_predicted_and_measured(
    tiny_model: LanguageModel, transcoders: list[JumpReLUSAE]
) -> None:
    graph = attribute(tiny_model, transcoders, PROMPT, progress=False)
    last_layer = graph.n_layers - 1
    at_end = [
        i for i, f in enumerate(graph.features.tolist()) if f[0] == last_layer and f[1] == graph.n_pos - 1
    ]
    node = tuple(graph.features[at_end[0]].tolist())
    # setting a node to its own activation changes nothing
    same = predict(graph, [node], float(graph.activations[at_end[0]]))
    assert torch.allclose(same["total"], torch.zeros_like(same["total"]))
    # a last-layer feature at the last position reaches the logits only through the final norm:
    # the graph's prediction (norm frozen) is close to the real change
    predicted = predict(graph, [node])
    assert torch.allclose(predicted["direct"], predicted["total"])
    assert torch.allclose(predicted["direct"], -graph.adjacency[graph.logit_start :, at_end[0]], atol=1e-6)
    measured = measure(tiny_model, transcoders, graph, [node])
    assert torch.allclose(measured["delta"], predicted["total"], rtol=0.2, atol=0.02)
    # an earlier node: its total effect goes through downstream features too
    early = next(i for i, f in enumerate(graph.features.tolist()) if f[0] == 0)
    deep = predict(graph, [tuple(graph.features[early].tolist())])
    assert not torch.allclose(deep["direct"], deep["total"])
    with pytest.raises(ConfigError, match="not active features"):
        predict(graph, [(0, 0, 0)])
    for wrong in (predict, lambda g, n, v: measure(tiny_model, transcoders, g, n, v)):
        with pytest.raises(ConfigError, match="1e[+]39 is out of range"):  # inf in float32
            wrong(graph, [node], 1e39)


def test_strongest_nodes_are_those_predict_ranks_first(
    tiny_model: LanguageModel, transcoders: list[JumpReLUSAE], monkeypatch: pytest.MonkeyPatch
) -> None:
    graph = attribute(tiny_model, transcoders, PROMPT, progress=False)
    nodes = [tuple(int(v) for v in f) for f in graph.features.tolist()]
    monkeypatch.setattr(intervene, "STRONGEST_BATCH", 7)  # several batches, a short last one

    def effect(node: tuple[int, int, int], against: int | None) -> float:
        total = predict(graph, [node])["total"]  # the plain reference: one predict per node
        return float(total[0] - (total[against] if against is not None else 0.0))

    for against in (None, 1):
        reference = sorted(e for e in (effect(node, against) for node in nodes) if e < 0)
        picked = strongest(graph, 5, against)
        assert len(picked) == 5
        got = [effect(node, against) for node in picked]
        assert got == pytest.approx(reference[:5], abs=1e-5)  # the five most negative, in order
    # a candidate list limits the search; nothing predicted to help the answer is returned
    some = list(range(0, graph.n_features, 3))
    every = strongest(graph, 1000, None, some)
    assert set(every) <= {nodes[i] for i in some}
    assert every and all(effect(node, None) < 0 for node in every)
    assert len(every) == sum(effect(nodes[i], None) < 0 for i in some)
    with pytest.raises(ConfigError, match="at least 1"):
        strongest(graph, 0)
    with pytest.raises(ConfigError, match="not one of the graph's outputs"):
        strongest(graph, 3, len(graph.logit_tokens))
    with pytest.raises(ConfigError, match="distinct feature indices"):
        strongest(graph, 3, None, [graph.n_features])


def test_bad_input(tiny_model: LanguageModel, transcoders: list[JumpReLUSAE], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at most 128"):
        attribute(tiny_model, transcoders, "word " * 140, progress=False)
    with pytest.raises(ConfigError, match="empty"):
        attribute(tiny_model, transcoders, "  ", progress=False)
    with pytest.raises(SiteError, match="expected mlp_in.0 -> mlp_out.0"):
        attribute(tiny_model, transcoders[1:] + transcoders[:1], PROMPT, progress=False)
    run = tmp_path / "run"
    for layer in (0, 1, 3):
        save_sae(
            transcoders[layer],
            run / "saes" / "mlp_in" / f"layer_{layer}" / "width_64" / "l0_5_skip_transcoder",
        )
    with pytest.raises(StoreError, match=r"no transcoder for layers 2 \(it has layers 0-1, 3\)"):
        transcoder_set(run, tiny_model.n_layers)


def test_attribute_command(
    tiny_model: LanguageModel,
    transcoders: list[JumpReLUSAE],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = tmp_path / "run"
    for layer, tc in enumerate(transcoders):
        save_sae(tc, run / "saes" / "mlp_in" / f"layer_{layer}" / "width_64" / "l0_5_skip_transcoder")
    graph = attribute(tiny_model, transcoders, PROMPT, progress=False)
    layer, pos, latent = graph.features[-1].tolist()
    node = f"{layer}_{latent}_{pos}"  # as the graph JSON names it, the one node id
    code = main(["attribute", str(run), PROMPT, "--slug", "cat", "--ablate", node, "--model", "tiny-gemma3"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "replacement score" in out and "predicted" in out and "the model now says" in out
    data = json.loads((run / "graphs" / "cat.json").read_text())
    assert data["metadata"]["gemmascope"]["transcoder_digest"] == transcoder_digest(transcoders)
    assert (run / "graphs" / "cat.png").stat().st_size > 20_000
    assert main(["attribute", str(run), PROMPT, "--ablate", "1_x_2", "--model", "tiny-gemma3"]) == 2
    assert "expected LAYER_LATENT_POSITION" in capsys.readouterr().err
    # the nodes the graph says hold the answer's lead over the runner-up, switched off
    rival = graph.logit_tokens[1]
    args = ["attribute", str(run), PROMPT, "--ablate-top", "3", "--against", rival, "--model", "tiny-gemma3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    picked = strongest(graph, 3, 1, [j for j in range(graph.n_features) if prune(graph).nodes[j]])
    assert len(picked) == 3
    data = json.loads((run / "graphs" / "cat.json").read_text())
    for layer, pos, latent in picked:  # a line each: the node, its token and its label
        node = next(n for n in data["nodes"] if n["node_id"] == f"{layer}_{latent}_{pos}")
        token = data["metadata"]["prompt_tokens"][pos]
        assert f"  {node['node_id']:<14} {token!r:<14} {node['clerp']}" in out
    assert f"lead of {graph.logit_tokens[0]!r} over {rival!r}: predicted" in out
    assert main(["attribute", str(run), PROMPT, "--against", rival, "--model", "tiny-gemma3"]) == 2
    assert "give --ablate-top N too" in capsys.readouterr().err
    args = ["attribute", str(run), PROMPT, "--ablate-top", "2", "--against", "zzz", "--model", "tiny-gemma3"]
    assert main(args) == 2
    assert "'zzz' is not one of the graph's other outputs" in capsys.readouterr().err
    args = ["attribute", str(run), PROMPT, "--ablate-top", "2", "--value", "3", "--model", "tiny-gemma3"]
    assert main(args) == 2
    assert "--value 3 sets --ablate nodes" in capsys.readouterr().err
    # a name holding another prompt's graph is refused before the model runs; that graph stays
    before = (run / "graphs" / "cat.json").read_bytes()
    assert main(["attribute", str(run), "A dog ran", "--slug", "cat", "--model", "tiny-gemma3"]) == 2
    assert f"graph name 'cat' already holds the graph of {PROMPT!r}" in capsys.readouterr().err
    assert (run / "graphs" / "cat.json").read_bytes() == before
    # the same words as a graph drawn before: another name, and the command says which and why
    assert main(["attribute", str(run), PROMPT.upper() + "?", "--model", "tiny-gemma3"]) == 0
    out = capsys.readouterr().out
    assert (
        f"{graph_slug(PROMPT)!r} holds another prompt's graph" in out and "  (named 'the-cat-sat-on-" in out
    )


def test_a_graph_never_replaces_another_prompts_graph(
    tiny_model: LanguageModel, transcoders: list[JumpReLUSAE], tmp_path: Path
) -> None:
    first = draw_graph(tiny_model, transcoders, PROMPT, tmp_path, png=False, progress=False)
    assert first.path.name == "the-cat-sat-on-the-mat-and.json"
    kept = first.path.read_bytes()
    other = PROMPT.upper() + "?"  # the same words: the same slug
    assert graph_slug(other) == first.path.stem
    second = draw_graph(tiny_model, transcoders, other, tmp_path, png=False, progress=False)
    assert second.path != first.path and second.path.stem.startswith(first.path.stem)
    assert first.path.read_bytes() == kept and read_graph(second.path)["metadata"]["prompt"] == other
    assert graph_name(tmp_path, other) == second.path.stem  # drawn again under its own name
    assert graph_name(tmp_path, PROMPT) == first.path.stem
    with pytest.raises(ConfigError, match="already holds the graph of"):
        draw_graph(tiny_model, transcoders, other, tmp_path, slug=first.path.stem, progress=False)
    third = PROMPT + "!"  # its hashed name holding yet another prompt's graph: refused, not replaced
    hashed = f"{first.path.stem}-{hashlib.sha256(third.encode()).hexdigest()[:6]}"
    (tmp_path / f"{hashed}.json").write_bytes(second.path.read_bytes())
    with pytest.raises(ConfigError, match=f"graph name '{hashed}' already holds the graph of"):
        graph_name(tmp_path, third)
    first.path.write_text("{damaged")  # a damaged file is replaced
    assert graph_name(tmp_path, other, first.path.stem) == first.path.stem


def test_the_pictures_title_keeps_a_newline_output_on_one_line(
    tiny_model: LanguageModel, transcoders: list[JumpReLUSAE]
) -> None:
    data = graph_json(attribute(tiny_model, transcoders, PROMPT, progress=False), "cat", explanations={})
    top = next(n for n in data["nodes"] if n["feature_type"] == "logit" and n["is_target_logit"])
    top["clerp"] = 'Output "\n\n" (p=0.632)'
    first = _title(data).split("\n")[0]
    assert first.startswith(f'{PROMPT!r} -> "\\n\\n" (p=0.632), ')  # the title's first line, whole


def test_the_pictures_key_keeps_a_labels_start_on_two_lines() -> None:
    label = 'in text with "symptoms", "disease"; promotes "Coronavirus", "COVID", "pandemic"; fires on varied tokens (2.5% of all tokens)'
    lines = _key_label(label)
    assert len(lines) == 2 and all(len(line) <= KEY_WIDTH for line in lines)
    assert lines[0].startswith('in text with "symptoms"') and lines[1].endswith("...")
    assert _key_label('fires on "cat"') == ['fires on "cat"'] and _key_label("") == []


def random_clt(model: LanguageModel, seed: int = 0) -> CrossLayerTranscoder:
    """A CLT over the tiny model with every decoder (own layer and later ones) random, biases 0."""
    g = torch.Generator().manual_seed(seed)
    clt = CrossLayerTranscoder(CLTConfig(model.n_layers, model.d_model, 48, model.name, affine_skip=True))
    with torch.no_grad():
        for s in range(model.n_layers):
            clt.W_enc[s].copy_(torch.randn(clt.W_enc[s].shape, generator=g) * 0.3)
            clt.W_dec[s].copy_(torch.randn(clt.W_dec[s].shape, generator=g) * 0.1)
            clt.threshold[s].fill_(0.5)
        assert clt.W_skip is not None
        clt.W_skip.copy_(torch.randn(clt.W_skip.shape, generator=g) * 0.05)
    return clt


def test_a_clt_graphs_edges_add_up_to_what_each_node_reads(tiny_model: LanguageModel) -> None:
    """Over a cross-layer transcoder, a feature is one node writing every later layer: the edges
    into each feature still sum to its pre-activation and into each logit to the demeaned logit."""
    clt = random_clt(tiny_model)
    graph = attribute(tiny_model, clt, PROMPT, first_position=0, progress=False)
    assert graph.n_features > 50 and len(graph.transcoders) == tiny_model.n_layers
    captured = capture_prompt(tiny_model, graph.ids)
    for j in range(0, graph.n_features, 11):
        layer, pos, latent = graph.features[j].tolist()
        read = float(captured.mlp_in[layer][pos] @ clt.W_enc[layer][:, latent].detach())
        assert float(graph.adjacency[j].sum()) == pytest.approx(read, rel=1e-4, abs=1e-4)
    with torch.no_grad():
        logits = tiny_model.hf(input_ids=graph.ids[None], use_cache=False).logits[0, -1]
    for k, token in enumerate(graph.logit_ids.tolist()):
        read = float(logits[token] - logits.mean())
        assert float(graph.adjacency[graph.logit_start + k].sum()) == pytest.approx(read, rel=1e-4, abs=1e-4)
    # a layer-0 feature reaches the logits directly through every layer it writes: zeroing its
    # later decoders changes its direct edge to the logits
    first = next(j for j, f in enumerate(graph.features.tolist()) if f[0] == 0 and f[1] > 0)
    _, _, latent = graph.features[first].tolist()
    with torch.no_grad():
        clt.decoder(0)[latent, 1:] = 0
    own_only = attribute(tiny_model, clt, PROMPT, first_position=0, progress=False)
    assert not torch.allclose(
        own_only.adjacency[own_only.logit_start :, first], graph.adjacency[graph.logit_start :, first]
    )


def test_a_clt_writing_only_its_own_layer_draws_the_transcoders_graph(tiny_model: LanguageModel) -> None:
    from test_clt import own_layer_transcoders

    clt = random_clt(tiny_model)
    transcoders = own_layer_transcoders(clt)
    ours, theirs = (attribute(tiny_model, x, PROMPT, progress=False) for x in (clt, transcoders))
    assert torch.equal(ours.features, theirs.features)
    assert torch.allclose(ours.adjacency, theirs.adjacency, rtol=1e-4, atol=1e-5)


def test_clt_interventions_predicted_and_measured(tiny_model: LanguageModel) -> None:
    clt = random_clt(tiny_model)
    graph = attribute(tiny_model, clt, PROMPT, progress=False)
    last = graph.n_layers - 1
    at_end = [i for i, f in enumerate(graph.features.tolist()) if f[0] == last and f[1] == graph.n_pos - 1]
    node = tuple(graph.features[at_end[0]].tolist())
    predicted = predict(graph, [node])
    measured = measure(tiny_model, clt, graph, [node])
    assert torch.allclose(measured["delta"], predicted["total"], rtol=0.2, atol=0.02)
    same = measure(tiny_model, clt, graph, [node], float(graph.activations[at_end[0]]))
    assert torch.allclose(same["delta"], torch.zeros_like(same["delta"]), atol=1e-4)
    with pytest.raises(SiteError, match="spans 3 layers"):
        attribute(
            tiny_model, CrossLayerTranscoder(CLTConfig(3, tiny_model.d_model, 8)), PROMPT, progress=False
        )


def test_attribute_command_over_a_runs_clt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gemmascope.formats.clt import save_clt

    run = tmp_path / "run"
    assert main(["attribute", str(run), PROMPT, "--clt", "--model", "tiny-gemma3"]) == 2
    assert "is not a run folder with cross-layer transcoders" in capsys.readouterr().err and not run.exists()
    clt = random_clt(__import__("gemmascope.models", fromlist=["load_model"]).load_model("tiny-gemma3"))
    save_clt(clt, run / "clts" / "width_48" / "l0_9_skip")
    code = main(
        ["attribute", str(run), PROMPT, "--clt", "--slug", "c", "--ablate-top", "2", "--model", "tiny-gemma3"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "replacement score" in out and "the model now says" in out
    data = json.loads((run / "graphs" / "c.json").read_text())
    assert data["metadata"]["gemmascope"]["transcoder_digest"] == transcoder_digest(clt)
