"""Tests of the web app (server/): every API endpoint against the pipeline functions it serves, every
bad-input case of UI.md's rules (4xx with a JSON message, and the server keeps serving), paths from
the URL never reaching the file system, model work not blocking other requests, 20 concurrent
microscope requests, and the `serve` command.

The run folder is small but real: the tiny Gemma 3, two JumpReLU SAEs saved with formats.save_sae,
a feature index built with features.build_index, and an eval report from evals.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from gemmascope import evals
from gemmascope.cli import main, run_line
from gemmascope.corpus import load_corpus, pack
from gemmascope.errors import StoreError
from gemmascope.features import HIDE_DENSE, FeatureIndex, build_index
from gemmascope.formats import sae_dir, sae_id, save_sae
from gemmascope.limits import REQUEST_NEW_TOKENS as MAX_NEW_TOKENS
from gemmascope.limits import REQUEST_PROMPT_CHARS as MAX_PROMPT_CHARS
from gemmascope.limits import REQUEST_PROMPT_TOKENS as MAX_REQUEST_TOKENS
from gemmascope.models import LanguageModel
from gemmascope.sae import JumpReLUSAE, SAEConfig
from gemmascope.server import app as app_module
from gemmascope.server import create_app, serving
from gemmascope.sites import capture, parse_site
from gemmascope.steer import generate_pair

PROMPT = "The Eiffel Tower is in Paris, the capital of France. It was built in 1889."
WIDTH = 256
_RUNS: dict[str, Path] = {}


def make_sae(model: LanguageModel, layer: int, rows: torch.Tensor, seed: int) -> JumpReLUSAE:
    """A JumpReLU SAE at resid_post.LAYER with random unit directions and each threshold at the
    99.5th percentile of its pre-activation on real text, so features are sparse, as trained ones."""
    site = parse_site(f"resid_post.{layer}")
    cfg = SAEConfig(
        "jumprelu",
        d_in=model.d_model,
        d_sae=WIDTH,
        site=str(site),
        hook_name=site.hook_name,
        model_name=model.name,
    )
    sae = JumpReLUSAE(cfg)
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(model.d_model, WIDTH, generator=g)
    W = W / W.norm(dim=0, keepdim=True)
    x = capture(model, rows, [site])[site][:, 1:].reshape(-1, model.d_model)  # [tokens, d_model]
    with torch.no_grad():
        sae.W_enc.copy_(W)
        sae.W_dec.copy_(W.T)
        sae.threshold.copy_((x @ W).quantile(0.995, dim=0).clamp_min(1e-3))
    return sae


def tiny_run_dir(tmp_path_factory: pytest.TempPathFactory, model: LanguageModel) -> Path:
    """A run folder on the tiny model, built once per test session (shared with test_browser)."""
    if "tiny" not in _RUNS:
        run = tmp_path_factory.mktemp("run")
        (run / "run.json").write_text(json.dumps({"model": model.name}))
        rows = pack(model.tokenizer, load_corpus("wiki", "train")[:40], context_len=128, max_rows=4)
        saes = {}
        for layer in (1, 2):
            sae = make_sae(model, layer, rows, seed=layer)
            folder = save_sae(sae, sae_dir(run, f"resid_post.{layer}", WIDTH, 1))
            saes[sae_id(folder)] = sae
        build_index(model, saes, run / "features.sqlite", n_tokens=2048, progress=False)
        token_ids = evals.eval_token_ids(model, 64, context_len=33)
        evals.write_report(
            run, evals.evaluate_tokens(model, saes, token_ids[:2], batch_size=2, min_tokens=32)
        )
        _RUNS["tiny"] = run
    return _RUNS["tiny"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model: LanguageModel) -> Path:
    return tiny_run_dir(tmp_path_factory, tiny_model)


@pytest.fixture(scope="module")
def app(run_dir: Path, tiny_model: LanguageModel) -> Any:
    return create_app(run_dir, model=tiny_model)


@pytest.fixture(scope="module")
def client(app: Any) -> Iterator[TestClient]:
    with TestClient(app) as c:  # one event loop for every request, as under uvicorn
        yield c


@pytest.fixture(scope="module")
def ids(client: TestClient) -> list[str]:
    return [s["id"] for s in client.get("/v1/saes").json()["saes"]]


def direct_acts(app: Any, key: str, text: str) -> tuple[list[int], torch.Tensor]:
    """Token ids and latent activations `[T, d_sae]` of `text`, computed without the server."""
    run = app.state.run
    entry = run.saes[key]
    site = parse_site(entry.site)
    input_ids = run.model.to_tokens(text)
    x = capture(run.model, input_ids, [site])[site][0]
    with torch.no_grad():
        return input_ids[0].tolist(), entry.sae.encode(x)


# ---------------------------------------------------------------------------------------------
# Reading the run


def test_health_and_saes_list_the_run(client: TestClient, run_dir: Path) -> None:
    health = client.get("/health")
    assert health.status_code == 200 and health.json() == {
        "status": "ok",
        "model": "tiny-gemma3",
        "saes": 2,
        "index": True,
    }
    data = client.get("/v1/saes").json()
    assert [s["id"] for s in data["saes"]] == ["resid_post.1.w256.l0_1", "resid_post.2.w256.l0_1"]
    first = data["saes"][0]
    assert (first["site"], first["layer"], first["width"], first["d_in"]) == ("resid_post.1", 1, WIDTH, 64)
    assert first["not_indexed"] is None
    summary = {
        row["sae_id"]: row for row in json.loads((run_dir / "report" / "evals.json").read_text())["summary"]
    }
    for s in data["saes"]:  # the eval numbers are the report's
        assert s["eval"]["l0"] == pytest.approx(summary[s["id"]]["l0"])
        assert s["eval"]["delta_lm_loss"] == pytest.approx(summary[s["id"]]["delta_lm_loss"])
    assert (
        data["plots"][0] == "/v1/report/frontier_l0_delta_lm_loss.png"
    )  # UI.md's L0 vs delta LM loss plot first
    from gemmascope import limits, steer

    assert data["limits"] == {**limits.served(), "dense": HIDE_DENSE}
    assert (data["limits"]["max_prompt_tokens"], data["limits"]["max_prompt_chars"]) == (
        MAX_REQUEST_TOKENS,
        MAX_PROMPT_CHARS,
    )
    assert data["limits"]["max_new_tokens"] == MAX_NEW_TOKENS and data["limits"]["dense"] == 0.095
    sampling = data["defaults"]["sampling"]  # the steer page's inputs start at steer's defaults
    assert sampling == {
        "max_new_tokens": steer.DEFAULT_MAX_NEW_TOKENS,
        "temperature": steer.DEFAULT_TEMPERATURE,
        "top_p": steer.DEFAULT_TOP_P,
        "freq_penalty": steer.DEFAULT_FREQ_PENALTY,
        "seed": steer.DEFAULT_SEED,
    }
    assert data["defaults"]["hide_dense"] == HIDE_DENSE


def test_report_plots_are_served(client: TestClient, run_dir: Path) -> None:
    for url in client.get("/v1/saes").json()["plots"]:
        resp = client.get(url)
        assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
        assert resp.content == (run_dir / "report" / url.rsplit("/", 1)[1]).read_bytes()


def test_feature_is_the_index_entry(client: TestClient, run_dir: Path, ids: list[str]) -> None:
    index = FeatureIndex(run_dir / "features.sqlite")
    fired = [i for i in range(WIDTH) if index.feature(ids[0], i)["n_fired"] > 0]
    assert fired, "the fixture SAE should have live features"
    i = fired[0]
    data = client.get(f"/v1/feature/{ids[0]}/{i}").json()
    expected = index.feature(ids[0], i)
    assert {k: data[k] for k in expected} == json.loads(json.dumps(expected))
    assert data["sae"]["id"] == ids[0] and data["sae"]["width"] == WIDTH
    assert len(data["histogram"]["counts"]) == 50 and sum(data["histogram"]["counts"]) == data["n_fired"]
    assert len(data["logit_lens"]["promoted"]) == 10 and len(data["logit_lens"]["suppressed"]) == 10
    assert 0 < len(data["top_examples"]) <= 20 and len(data["intervals"]) == 5
    top = data["top_examples"][0]
    assert top["acts"][top["focus"]] == pytest.approx(data["max_act"], rel=1e-3)


def test_feature_outputs_are_measured_then_kept(
    client: TestClient, app: Any, run_dir: Path, ids: list[str]
) -> None:
    """`GET /v1/feature/{sae_id}/{index}/outputs`: `outputs.latent_outputs` of the open run, kept in
    the run folder after the first request."""
    from gemmascope.outputs import latent_outputs

    index = FeatureIndex(run_dir / "features.sqlite")
    i = int(index.column(ids[0], "max_act").argmax())
    first = client.get(f"/v1/feature/{ids[0]}/{i}/outputs")
    assert first.status_code == 200
    data = first.json()
    assert data["latent"] == i and len(data["rose"]) == 10 and len(data["fell"]) == 10
    assert data["strength"] == pytest.approx(index.feature(ids[0], i)["max_act"])
    again = client.get(f"/v1/feature/{ids[0]}/{i}/outputs").json()
    assert again["cached"] is True and again["rose"] == data["rose"]
    assert (run_dir / "effects" / ids[0] / f"{i}.json").is_file()
    assert latent_outputs(app.state.run.opened, ids[0], i)["rose"] == data["rose"]


def test_saes_are_listed_with_numbers_as_numbers(tmp_path: Path, tiny_model: LanguageModel) -> None:
    """`GET /v1/saes` (which every page's SAE list shows) lists width 64 before width 128."""
    for width in (128, 64):
        cfg = SAEConfig(
            "jumprelu", d_in=tiny_model.d_model, d_sae=width, site="resid_post.1", model_name=tiny_model.name
        )
        save_sae(JumpReLUSAE(cfg), sae_dir(tmp_path, "resid_post.1", width, 8))
    with TestClient(create_app(tmp_path, model=tiny_model)) as c:
        listed = [s["id"] for s in c.get("/v1/saes").json()["saes"]]
    assert listed == ["resid_post.1.w64.l0_8", "resid_post.1.w128.l0_8"]


# ---------------------------------------------------------------------------------------------
# Running the model: answers equal the pipeline functions


def test_topk_by_token_matches_the_sae(client: TestClient, app: Any, ids: list[str]) -> None:
    body = {"prompt": PROMPT, "sae_id": ids[1], "k": 3, "order": "raw"}
    resp = client.post("/v1/activation/topk-by-token", json=body)
    assert resp.status_code == 200
    data = resp.json()
    assert data["order"] == "raw" and data["order_note"] is None  # the raw order, one parameter away
    token_ids, acts = direct_acts(app, ids[1], PROMPT)
    tok = app.state.run.model.tokenizer
    assert data["tokens"] == [tok.decode([t]) for t in token_ids]
    assert [r["position"] for r in data["results"]] == list(range(1, len(token_ids)))  # BOS hidden
    densities = app.state.run.column(app.state.run.saes[ids[1]], "density")
    visible = acts * (densities <= HIDE_DENSE)
    n_features = 0
    for r in data["results"]:
        values, latents = visible[r["position"]].topk(3)
        expected = [(int(i), float(v)) for v, i in zip(values, latents, strict=True) if v > 0]
        assert [f["index"] for f in r["top_features"]] == [i for i, _ in expected]
        assert [f["value"] for f in r["top_features"]] == pytest.approx([v for _, v in expected], rel=1e-4)
        n_features += len(r["top_features"])
    assert n_features > 0, "some feature should fire on the prompt"
    shown = {str(f["index"]) for r in data["results"] for f in r["top_features"]}
    assert set(data["explanations"]) == shown | {str(t["index"]) for t in data["topics"]}
    pooled = visible[1:].max(0).values  # raw order: topics max-pooled
    assert [t["index"] for t in data["topics"]] == [int(i) for i in pooled.topk(10).indices if pooled[i] > 0]


def test_topk_by_token_ranks_meaning_first_by_default(client: TestClient, app: Any, ids: list[str]) -> None:
    """Without `order`, each token's features and the text's topics are ranked by `features.rank`
    on the index's firing statistics, not by activation."""
    from gemmascope.features import meaning_scores, topic_scores

    data = client.post(
        "/v1/activation/topk-by-token", json={"prompt": PROMPT, "sae_id": ids[1], "k": 3}
    ).json()
    assert data["order"] == "meaning" and data["order_note"] is None
    run = app.state.run
    entry = run.saes[ids[1]]
    firing = run.firing(entry)
    _, acts = direct_acts(app, ids[1], PROMPT)
    visible = acts * (run.column(entry, "density") <= HIDE_DENSE)
    scores = meaning_scores(visible, firing)
    for r in data["results"]:
        fired = visible[r["position"]] > 0
        by = torch.where(fired, scores[r["position"]], -torch.inf)
        expected = [int(i) for i in by.topk(3).indices if fired[i]]
        assert [f["index"] for f in r["top_features"]] == expected
        assert [f["score"] for f in r["top_features"]] == pytest.approx(
            [float(scores[r["position"], i]) for i in expected], abs=1e-3
        )
    topics = topic_scores(visible[1:], torch.ones(len(visible) - 1, dtype=torch.bool), firing)
    assert [t["index"] for t in data["topics"]] == [int(i) for i in topics.topk(10).indices if topics[i] > 0]
    assert all(t["score"] > 0 and t["count"] >= 1 for t in data["topics"])


def test_topk_by_token_can_show_dense_features(client: TestClient, app: Any, ids: list[str]) -> None:
    body = {"prompt": PROMPT, "sae_id": ids[0], "hide_dense": 1.0, "order": "raw"}
    data = client.post("/v1/activation/topk-by-token", json=body).json()
    _, acts = direct_acts(app, ids[0], PROMPT)
    for r in data["results"]:
        top = acts[r["position"]].topk(5)
        assert [f["index"] for f in r["top_features"]] == [int(i) for v, i in zip(*top, strict=True) if v > 0]


def test_single_feature_activations(client: TestClient, app: Any, ids: list[str]) -> None:
    _, acts = direct_acts(app, ids[0], PROMPT)
    i = int(acts[1:].max(0).values.argmax())  # the feature firing most on the prompt
    data = client.post("/v1/activation/single", json={"prompt": PROMPT, "sae_id": ids[0], "index": i}).json()
    assert data["activation"]["values"] == pytest.approx(acts[:, i].tolist(), rel=1e-4, abs=1e-6)
    assert data["activation"]["max_value_index"] == int(acts[1:, i].argmax()) + 1
    assert data["activation"]["max_value"] == pytest.approx(float(acts[1:, i].max()), rel=1e-4)
    assert len(data["tokens"]) == acts.shape[0]


def test_single_and_topk_agree_on_massive_tokens(client: TestClient, app: Any, ids: list[str]) -> None:
    """Tokens above the SAE's training norm limit (Gemma 3's massive activations) get no features in
    the microscope and a zero activation from /v1/activation/single alike (both read latents
    through `sae.encode_inputs`)."""
    entry = app.state.run.saes[ids[0]]
    token_ids, acts = direct_acts(app, ids[0], PROMPT)
    site = parse_site(entry.site)
    norms = capture(app.state.run.model, torch.tensor([token_ids]), [site])[site][0].norm(dim=-1)
    limit = float(norms[1:].median())
    massive = norms > limit
    assert 0 < int(massive[1:].sum()) < len(token_ids) - 1
    fired = acts * massive[:, None]  # the latents that fire on a massive token without the limit
    fired[0] = 0
    t, i = divmod(int(fired.argmax()), acts.shape[1])
    assert fired[t, i] > 0, "some feature should fire on a massive token without the limit"
    entry.sae.cfg.max_norm = limit
    try:
        body = {"prompt": PROMPT, "sae_id": ids[0]}
        micro = client.post("/v1/activation/topk-by-token", json={**body, "k": 20, "hide_dense": 1.0}).json()
        single = client.post("/v1/activation/single", json={**body, "index": i}).json()
    finally:
        entry.sae.cfg.max_norm = None
    values = single["activation"]["values"]
    assert values[t] == 0.0
    for r in micro["results"]:
        shown = {f["index"]: f["value"] for f in r["top_features"]}
        if massive[r["position"]]:
            assert shown == {} and values[r["position"]] == 0.0
        if i in shown:
            assert shown[i] == pytest.approx(values[r["position"]], rel=1e-5)
        elif len(shown) < 20:  # not among the top 20: it does not fire here
            assert values[r["position"]] == 0.0
        if not massive[r["position"]]:
            assert values[r["position"]] == pytest.approx(float(acts[r["position"], i]), rel=1e-4, abs=1e-6)


def test_search_by_text_token_explanation_and_id(
    client: TestClient, app: Any, ids: list[str], run_dir: Path
) -> None:
    data = client.post("/v1/search/text", json={"query": PROMPT, "sae_id": ids[0], "k": 5}).json()
    _, acts = direct_acts(app, ids[0], PROMPT)
    densities = app.state.run.column(app.state.run.saes[ids[0]], "density")
    best = (acts[1:] * (densities <= HIDE_DENSE)).max(0).values  # dense features hidden by default
    assert [r["index"] for r in data["results"]] == best.topk(5).indices.tolist()
    assert [r["value"] for r in data["results"]] == pytest.approx(best.topk(5).values.tolist(), rel=1e-4)

    on_paris = client.post(
        "/v1/search/text", json={"query": PROMPT, "token": "Paris", "sae_id": ids[0]}
    ).json()
    assert all(r["token"].strip() == "Paris" for r in on_paris["results"])

    index = FeatureIndex(run_dir / "features.sqlite")
    explanation = index.feature(ids[1], 7)["explanation"]
    word = next(w for w in explanation.replace('"', " ").split() if w.isalpha() and len(w) > 3)
    hits = client.post(
        "/v1/search/text", json={"query": word, "mode": "explanation", "sae_id": ids[1]}
    ).json()
    assert {"sae_id": ids[1], "index": 7} in [
        {"sae_id": h["sae_id"], "index": h["index"]} for h in hits["results"]
    ]

    promotes = client.post("/v1/search/text", json={"query": "dog", "mode": "promotes", "k": 4}).json()
    assert len(promotes["results"]) == 4 and {r["sae_id"] for r in promotes["results"]} <= set(ids)
    assert [r["z"] for r in promotes["results"]] == sorted(
        (r["z"] for r in promotes["results"]), reverse=True
    )
    assert all(
        r["token"] in promotes["tokens"] and r["token"].strip().lower() == "dog" for r in promotes["results"]
    )
    unknown = client.post("/v1/search/text", json={"query": "qqxqzvbrtl", "mode": "promotes"})
    assert unknown.status_code == 400 and "single token" in unknown.json()["error"]

    by_id = client.post("/v1/search/text", json={"query": f"{ids[1]}#7", "mode": "id"}).json()
    assert by_id["results"] == [{"sae_id": ids[1], "index": 7, "explanation": explanation}]
    bare = client.post("/v1/search/text", json={"query": "7", "mode": "id"}).json()
    assert [(r["sae_id"], r["index"]) for r in bare["results"]] == [(ids[0], 7), (ids[1], 7)]


def test_steer_gives_default_and_steered_completions(client: TestClient, app: Any, ids: list[str]) -> None:
    body = {
        "prompt": "The capital of France is",
        "features": [{"sae_id": ids[1], "index": 3, "strength": 40.0}],
        "max_new_tokens": 6,
        "temperature": 0.0,
        "seed": 1,
        "freq_penalty": 0.0,
    }
    first = client.post("/v1/steer/completion", json=body)
    assert first.status_code == 200
    data = first.json()
    plain = generate_pair(
        app.state.run.model, body["prompt"], [], max_new_tokens=6, temperature=0.0, freq_penalty=0.0
    )
    assert data["default"] == plain.default  # the default completion is the unsteered model's
    assert data["steered"] != data["default"]  # a strong push changes the greedy completion
    assert [o["type"] for o in data["outputs"]] == ["DEFAULT", "STEERED"]
    assert client.post("/v1/steer/completion", json=body).json() == data  # same seed, same answer

    index = FeatureIndex(app.state.run.index_path)
    no_strength = {**body, "features": [{"sae_id": ids[1], "index": 3}]}
    applied = client.post("/v1/steer/completion", json=no_strength).json()["features"][0]
    assert applied["strength"] == pytest.approx(
        index.feature(ids[1], 3)["max_act"]
    )  # default: max activation


# ---------------------------------------------------------------------------------------------
# Bad input: a 4xx with a JSON message, and the server keeps serving

LONG = "word " * (MAX_REQUEST_TOKENS + 10)
SAE = "resid_post.1.w256.l0_1"
STEER = {"prompt": "Hello", "features": [{"sae_id": SAE, "index": 1, "strength": 1.0}]}
BAD_REQUESTS = [
    ("empty prompt", "/v1/activation/topk-by-token", {"prompt": ""}, 400, "empty"),
    ("blank prompt", "/v1/activation/single", {"prompt": "  \n ", "sae_id": SAE, "index": 1}, 400, "empty"),
    (
        "too many tokens",
        "/v1/activation/topk-by-token",
        {"prompt": LONG},
        400,
        f"at most {MAX_REQUEST_TOKENS}",
    ),
    (
        "too many tokens to steer",
        "/v1/steer/completion",
        {**STEER, "prompt": LONG},
        400,
        f"at most {MAX_REQUEST_TOKENS}",
    ),
    (
        "too many characters",
        "/v1/activation/topk-by-token",
        {"prompt": "x" * (MAX_PROMPT_CHARS + 1)},
        422,
        "prompt",
    ),
    (
        "unknown SAE",
        "/v1/activation/topk-by-token",
        {"prompt": "Hi", "sae_id": "resid_post.9.w1.l0_1"},
        404,
        "unknown SAE",
    ),
    (
        "index out of range",
        "/v1/activation/single",
        {"prompt": "Hi", "sae_id": SAE, "index": WIDTH},
        404,
        "out of range",
    ),
    (
        "negative index",
        "/v1/activation/single",
        {"prompt": "Hi", "sae_id": SAE, "index": -1},
        404,
        "out of range",
    ),
    ("k out of range", "/v1/activation/topk-by-token", {"prompt": "Hi", "k": 0}, 422, "k"),
    ("wrong type", "/v1/activation/topk-by-token", {"prompt": 5}, 422, "prompt"),
    ("missing field", "/v1/activation/single", {"prompt": "Hi", "sae_id": SAE}, 422, "index"),
    ("unknown field", "/v1/activation/topk-by-token", {"prompt": "Hi", "promt": "x"}, 422, "promt"),
    ("body not an object", "/v1/activation/topk-by-token", ["Hi"], 422, "JSON object"),
    (
        "strength out of range",
        "/v1/steer/completion",
        {**STEER, "features": [{"sae_id": SAE, "index": 1, "strength": 1e9}]},
        400,
        "out of range",
    ),
    (
        "steer unknown SAE",
        "/v1/steer/completion",
        {**STEER, "features": [{"sae_id": "x", "index": 1}]},
        404,
        "unknown SAE",
    ),
    (
        "steer index out of range",
        "/v1/steer/completion",
        {**STEER, "features": [{"sae_id": SAE, "index": 10**6}]},
        404,
        "out of range",
    ),
    ("no features", "/v1/steer/completion", {**STEER, "features": []}, 422, "features"),
    (
        "too many new tokens",
        "/v1/steer/completion",
        {**STEER, "max_new_tokens": MAX_NEW_TOKENS + 1},
        422,
        "max_new_tokens",
    ),
    ("negative temperature", "/v1/steer/completion", {**STEER, "temperature": -1}, 422, "temperature"),
    (
        "unknown mode",
        "/v1/steer/completion",
        {**STEER, "features": [{"sae_id": SAE, "index": 1, "mode": "boost"}]},
        422,
        "mode",
    ),
    ("empty search", "/v1/search/text", {"query": "   "}, 400, "empty"),
    ("token not in text", "/v1/search/text", {"query": "Hello world", "token": "Paris"}, 400, "Paris"),
    ("bad feature id", "/v1/search/text", {"query": "abc", "mode": "id"}, 400, "abc"),
    (
        "feature id out of range",
        "/v1/search/text",
        {"query": f"{SAE}#{WIDTH}", "mode": "id"},
        404,
        "out of range",
    ),
    ("no explanation words", "/v1/search/text", {"query": "!!", "mode": "explanation"}, 400, "word"),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "fragment"), [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_requests_get_a_json_4xx(
    client: TestClient, path: str, body: Any, status: int, fragment: str
) -> None:
    resp = client.post(path, json=body)
    assert resp.status_code == status, resp.text
    assert fragment in resp.json()["error"]
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize(
    ("raw", "status", "fragment"),
    [
        (b"{bad json", 400, "malformed JSON"),
        (b'{"prompt": "Hi",}', 400, "malformed JSON"),
        (b'{"prompt": "Hi", "index": 1', 400, "malformed JSON"),
        (b"", 422, "JSON object"),
        (b"null", 422, "JSON object"),
        (b'"a string"', 422, "JSON object"),
    ],
)
def test_malformed_json(client: TestClient, raw: bytes, status: int, fragment: str) -> None:
    resp = client.post("/v1/activation/single", content=raw, headers={"content-type": "application/json"})
    assert resp.status_code == status and fragment in resp.json()["error"]
    assert client.get("/health").status_code == 200


def test_non_finite_strength_is_refused(client: TestClient) -> None:
    raw = json.dumps({**STEER, "features": [{"sae_id": SAE, "index": 1, "strength": float("nan")}]}).encode()
    resp = client.post("/v1/steer/completion", content=raw, headers={"content-type": "application/json"})
    assert resp.status_code == 422 and "strength" in resp.json()["error"]


def test_a_number_beyond_float32_is_refused_by_the_request_model(client: TestClient) -> None:
    """1e39 is a finite float in JSON but inf in a float32 tensor: refused where a body is parsed."""
    feature = {"sae_id": SAE, "index": 1, "strength": 1e39}
    resp = client.post("/v1/steer/completion", json={**STEER, "features": [feature]})
    assert (
        resp.status_code == 422 and "strength" in resp.json()["error"] and "float32" in resp.json()["error"]
    )
    measure = {"prompts": ["Hi"], "features": STEER["features"], "watch": [" a"], "strengths": [1.0, 1e39]}
    resp = client.post("/v1/steer/measure", json=measure)
    assert resp.status_code == 422 and "strengths" in resp.json()["error"]


@pytest.mark.parametrize(
    ("url", "status", "fragment"),
    [
        (f"/v1/feature/{SAE}/{WIDTH}", 404, "out of range"),
        (f"/v1/feature/{SAE}/-3", 404, "out of range"),
        (f"/v1/feature/{SAE}/abc", 400, "not an integer"),
        ("/v1/feature/resid_post.7.w4096.l0_52/1", 404, "unknown SAE"),
        (f"/v1/feature/{SAE}/{WIDTH}/outputs", 404, "out of range"),
        (f"/v1/feature/{SAE}/abc/outputs", 400, "not an integer"),
        ("/v1/feature/resid_post.7.w4096.l0_52/1/outputs", 404, "unknown SAE"),
        ("/v1/nothing-here", 404, "Not Found"),
    ],
)
def test_bad_get_requests(client: TestClient, url: str, status: int, fragment: str) -> None:
    resp = client.get(url)
    assert resp.status_code == status and fragment in resp.json()["error"]


def test_wrong_method_is_json(client: TestClient) -> None:
    resp = client.get("/v1/activation/topk-by-token")
    assert resp.status_code == 405 and resp.json()["error"]


@pytest.mark.parametrize(
    "url",
    [
        "/v1/report/..%2Frun.json",
        "/v1/report/%2E%2E%2Frun.json",
        "/v1/report/run.json",
        "/v1/report/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/v1/feature/..%2F..%2Frun.json/1",
        "/v1/feature/..%2Fsaes/1",
        "/static/..%2Fapp.py",
        "/static/%2E%2E/run.py",
        "/static/../run.py",
        "/feature/..%2F..%2Frun.json/0",
    ],
)
def test_paths_from_the_url_never_reach_the_file_system(client: TestClient, url: str) -> None:
    resp = client.get(url)
    assert resp.status_code == 404
    assert b"gemmascope" not in resp.content or b"Not found" in resp.content  # no file content leaks


# ---------------------------------------------------------------------------------------------
# Pages


@pytest.mark.parametrize("url", ["/", "/steer", "/search", "/saes", f"/feature/{SAE}/0"])
def test_pages_are_served_from_the_package(client: TestClient, url: str) -> None:
    resp = client.get(url)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    assert "/static/common.js" in resp.text and "/static/style.css" in resp.text


def test_static_files_fetch_nothing_from_the_network() -> None:
    for path in sorted(app_module.STATIC.iterdir()):
        text = path.read_text().replace(
            "http://www.w3.org/2000/svg", ""
        )  # SVG's namespace: a name, not a fetch
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, path.name


def test_no_page_loads_from_a_cdn(client: TestClient) -> None:
    assert client.get("/v1/docs").status_code == 404 and client.get("/docs").status_code == 404
    assert "/v1/steer/completion" in client.get("/v1/openapi.json").json()["paths"]


def test_unknown_feature_page_is_a_404_page(client: TestClient) -> None:
    resp = client.get(f"/feature/{SAE}/{WIDTH}")
    assert (
        resp.status_code == 404
        and "out of range" in resp.text
        and resp.headers["content-type"].startswith("text/html")
    )


# ---------------------------------------------------------------------------------------------
# Load: model work does not block other requests, and many requests are all answered correctly


def test_model_work_does_not_block_other_requests(app: Any, client: TestClient, ids: list[str]) -> None:
    """While the model is busy (its lock held), pages and feature lookups still answer, and the
    waiting request completes once the model is free."""
    run = app.state.run
    answers: list[httpx.Response] = []
    with run.model_lock:
        waiter = threading.Thread(
            target=lambda: answers.append(
                client.post("/v1/activation/topk-by-token", json={"prompt": PROMPT})
            )
        )
        waiter.start()
        wait_until_queued(app, 1)
        assert client.get("/health").status_code == 200
        assert client.get(f"/v1/feature/{ids[0]}/0").status_code == 200
        assert client.get("/").status_code == 200
        assert not answers  # still waiting for the model
    waiter.join(timeout=60)
    assert answers and answers[0].status_code == 200


def test_model_queue_is_bounded(app: Any, client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_module, "MAX_WAITING", 1)
    answers: list[httpx.Response] = []
    with app.state.run.model_lock:
        first = threading.Thread(
            target=lambda: answers.append(client.post("/v1/activation/topk-by-token", json={"prompt": "Hi"}))
        )
        first.start()
        wait_until_queued(app, 1)
        busy = client.post("/v1/activation/topk-by-token", json={"prompt": "Hello"})
        assert busy.status_code == 503 and "busy" in busy.json()["error"]
    first.join(timeout=60)
    assert answers[0].status_code == 200
    assert app.state.model_queue[0] == 0


def wait_until_queued(app: Any, n: int) -> None:
    """Block until `n` model requests are queued (the request threads above get there on their own time)."""
    deadline = time.monotonic() + 60
    while app.state.model_queue[0] < n:
        assert time.monotonic() < deadline, "the request never reached the model queue"
        time.sleep(0.01)


def test_twenty_concurrent_microscope_requests(app: Any, client: TestClient, ids: list[str]) -> None:
    prompts = [f"{PROMPT} Request number {n} asks about item {n * 7}." for n in range(20)]
    expected = {
        p: client.post("/v1/activation/topk-by-token", json={"prompt": p, "sae_id": ids[n % 2]}).json()
        for n, p in enumerate(prompts)
    }
    with serving(app) as url:
        with httpx.Client(base_url=url, timeout=120) as http:

            def ask(n: int) -> httpx.Response:
                return http.post(
                    "/v1/activation/topk-by-token", json={"prompt": prompts[n], "sae_id": ids[n % 2]}
                )

            with ThreadPoolExecutor(max_workers=20) as pool:
                futures = [pool.submit(ask, n) for n in range(20)]
                health = http.get("/health")  # answered while the microscope requests queue
                answers = [f.result() for f in futures]
            assert health.status_code == 200
            for prompt, resp in zip(prompts, answers, strict=True):
                assert resp.status_code == 200
                got = resp.json()
                want = expected[prompt]
                assert got["tokens"] == want["tokens"] and got["sae_id"] == want["sae_id"]
                for g, w in zip(got["results"], want["results"], strict=True):
                    assert [f["index"] for f in g["top_features"]] == [f["index"] for f in w["top_features"]]
            assert http.get("/health").json()["status"] == "ok"  # and it stays up


# ---------------------------------------------------------------------------------------------
# Run folders the server refuses or serves partly, and the command


def test_missing_or_empty_run_folder_is_refused(tmp_path: Path, tiny_model: LanguageModel) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        create_app(tmp_path / "nope", model=tiny_model)
    with pytest.raises(StoreError, match="holds no SAEs"):
        create_app(tmp_path, model=tiny_model)


def test_run_without_index_still_serves_the_microscope(
    tmp_path: Path, run_dir: Path, tiny_model: LanguageModel
) -> None:
    import shutil

    shutil.copytree(run_dir / "saes", tmp_path / "saes")
    client = TestClient(create_app(tmp_path, model=tiny_model))
    key = client.get("/v1/saes").json()["saes"][0]
    assert "gemmascope index" in key["not_indexed"]
    resp = client.get(f"/v1/feature/{key['id']}/0")
    assert resp.status_code == 404 and "gemmascope index" in resp.json()["error"]
    micro = client.post("/v1/activation/topk-by-token", json={"prompt": PROMPT})
    assert micro.status_code == 200 and micro.json()["dense_hidden"] is False
    assert micro.json()["order"] == "raw" and "no feature index" in micro.json()["order_note"]
    steer = client.post(
        "/v1/steer/completion", json={**STEER, "features": [{"sae_id": key["id"], "index": 1}]}
    )
    assert steer.status_code == 400 and "give a strength" in steer.json()["error"]


def test_serve_command(
    monkeypatch: pytest.MonkeyPatch, run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    called: dict[str, Any] = {}
    monkeypatch.setattr(
        "gemmascope.server.serve",
        lambda run, host, port, extra, model, run_line, clt: called.update(
            run=run, host=host, port=port, extra=extra, model=model, run_line=run_line, clt=clt
        ),
    )
    assert main(["serve", str(run_dir)]) == 0
    assert called.pop("run_line") is run_line  # it runs the command line's commands (test_warm)
    assert called.pop("clt") is None
    assert called == {"run": str(run_dir), "host": "127.0.0.1", "port": 8000, "extra": [], "model": None}
    assert main(["serve", str(run_dir), "--clt"]) == 0 and called["clt"] == ""  # test_server_graphs
    assert main(["serve", "--sae", "x", "--clt"]) == 2
    assert "--clt draws graphs over a run folder" in capsys.readouterr().err
    assert main(["serve", str(run_dir), "--model", "tiny-gemma3"]) == 0
    assert called["model"] == "tiny-gemma3"
    assert main(["serve", str(run_dir), "--host", "0.0.0.0", "--port", "9001"]) == 0
    assert called["host"] == "0.0.0.0" and called["port"] == 9001
    assert main(["serve", str(run_dir), "--port", "70000"]) == 2
    assert "70000" in capsys.readouterr().err
    release = "gemma-scope-2-270m-pt/resid_post/layer_6_width_16k_l0_small"
    assert main(["serve", "--sae", release]) == 0
    assert called["run"] is None and called["extra"] == [release]
    assert main(["serve"]) == 2
    assert "serve needs RUN_DIR, or --sae" in capsys.readouterr().err


def test_official_saes_are_served_with_or_without_a_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_dir: Path, tiny_model: LanguageModel
) -> None:
    """`serve --sae RELEASE/ID`: an official SAE (from $GEMMASCOPE_RELEASES, laid out as the hub)
    joins the run's SAEs, or is served alone; the microscope and steering read it, the pages that
    need an index or a run folder say so."""
    from gemmascope.formats import save_params_safetensors
    from gemmascope.releases import load_release

    ident = "resid_post/layer_1_width_16k_l0_small"
    release_sae = make_sae(tiny_model, 1, tiny_model.to_tokens(PROMPT), seed=7)
    save_params_safetensors(release_sae, tmp_path / "gemma-scope-2-270m-pt" / ident / "params.safetensors")
    monkeypatch.setenv("GEMMASCOPE_RELEASES", str(tmp_path))
    key = "gemma-scope-2-270m-pt.resid_post.layer_1_width_16k_l0_small"
    with TestClient(create_app(run_dir, model=tiny_model, extra=[f"gemma-scope-2-270m-pt/{ident}"])) as c:
        listed = [s["id"] for s in c.get("/v1/saes").json()["saes"]]
        assert listed == ["resid_post.1.w256.l0_1", "resid_post.2.w256.l0_1", key]
    with TestClient(create_app(None, model=tiny_model, extra=[f"gemma-scope-2-270m-pt/{ident}"])) as c:
        data = c.get("/v1/saes").json()
        assert [s["id"] for s in data["saes"]] == [key] and data["saes"][0]["site"] == "resid_post.1"
        micro = c.post("/v1/activation/topk-by-token", json={"prompt": PROMPT, "sae_id": key})
        assert micro.status_code == 200
        expected = load_release("gemma-scope-2-270m-pt", ident).encode(
            capture(tiny_model, tiny_model.to_tokens(PROMPT), [parse_site("resid_post.1")])[
                parse_site("resid_post.1")
            ][0]
        )
        results = [r for r in micro.json()["results"] if r["top_features"]]
        assert results, "some latent of the official SAE should fire on the prompt"
        for r in results:
            assert r["top_features"][0]["value"] == pytest.approx(
                expected[r["position"]].max().item(), rel=1e-4
            )
        feature = c.get(f"/v1/feature/{key}/0")
        assert feature.status_code == 404 and "without a run folder" in feature.json()["error"]
        graphs = c.get("/v1/graph/list").json()
        assert graphs["available"] is False and "run folder" in graphs["why_not"]
        steer = c.post(
            "/v1/steer/completion",
            json={**STEER, "features": [{"sae_id": key, "index": 1, "strength": 5.0}]},
        )
        assert steer.status_code == 200
    with pytest.raises(Exception, match="serve needs a run folder"):
        create_app(None, model=tiny_model)
    own = str(next((run_dir / "saes").glob("resid_post/layer_1/*/*")))
    with pytest.raises(Exception, match="as an SAE already served"):  # never two SAEs under one id
        create_app(run_dir, model=tiny_model, extra=[own])


def test_serve_refuses_a_taken_port_before_loading(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(run_dir), "--port", str(port)]) == 2
    assert f"127.0.0.1:{port}" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The server's structure: one model queue, steer's defaults, no server paths in what clients see


def test_steer_defaults_are_steers(client: TestClient) -> None:
    from gemmascope import steer

    resp = client.post("/v1/steer/completion", json=STEER)
    assert resp.status_code == 200, resp.text
    settings = resp.json()["settings"]
    assert settings["max_new_tokens"] == steer.DEFAULT_MAX_NEW_TOKENS
    assert settings["temperature"] == steer.DEFAULT_TEMPERATURE
    assert settings["seed"] == steer.DEFAULT_SEED
    assert settings["freq_penalty"] == steer.DEFAULT_FREQ_PENALTY
    assert settings["top_p"] == steer.DEFAULT_TOP_P


def test_errors_show_no_absolute_server_path(
    tmp_path: Path, run_dir: Path, tiny_model: LanguageModel
) -> None:
    import shutil

    from gemmascope.server.errors import public_message

    shutil.copytree(run_dir / "saes", tmp_path / "saes")
    client = TestClient(create_app(tmp_path, model=tiny_model))
    listing = client.get("/v1/saes").json()
    key = listing["saes"][0]
    resp = client.get(f"/v1/feature/{key['id']}/0")
    search = client.post("/v1/search/text", json={"query": "x", "mode": "explanation", "sae_id": key["id"]})
    assert resp.status_code == 404 and search.status_code == 404
    for text in (json.dumps(listing), resp.text, search.text):
        assert "gemmascope index" in text and str(tmp_path.parent) not in text
    assert f"gemmascope index {tmp_path.name}" in resp.json()["error"]
    message = public_message(f"cannot read '{tmp_path}/run.json' or '/srv/x/y.sqlite'", tmp_path)
    assert message == f"cannot read '{tmp_path.name}/run.json' or 'y.sqlite'"


def test_steer_at_chosen_positions(client: TestClient, ids: list[str]) -> None:
    """`positions` edits those token positions only: past the prompt and the generation it changes
    nothing; a negative one is a 400."""
    body = {
        "prompt": "The capital of France is",
        "features": [{"sae_id": ids[1], "index": 3, "strength": 40.0, "positions": [500]}],
        "max_new_tokens": 6,
        "temperature": 0.0,
        "freq_penalty": 0.0,
    }
    data = client.post("/v1/steer/completion", json=body).json()
    assert data["steered"] == data["default"] and data["features"][0]["positions"] == [500]
    body["features"][0]["positions"] = [1, 2, 3, 4, 5, 6]
    assert client.post("/v1/steer/completion", json=body).json()["steered"] != data["default"]
    body["features"][0]["positions"] = [-1]
    out = client.post("/v1/steer/completion", json=body)
    assert out.status_code == 400 and "positions" in out.json()["error"]


def test_measure_watched_tokens_cost_and_sweep(client: TestClient, ids: list[str]) -> None:
    body = {
        "prompts": ["The capital of France is", "My favourite city is"],
        "features": [{"sae_id": ids[1], "index": 3, "strength": 40.0}],
        "watch": [" the", " a"],
        "side_effect_tokens": 256,
        "strengths": [0.0, 40.0],
    }
    out = client.post("/v1/steer/measure", json=body)
    assert out.status_code == 200, out.text
    data = out.json()
    assert [w["token"] for w in data["watch"]] == [" the", " a"] and len(data["watch"][0]["per_prompt"]) == 2
    assert data["side_effects"]["kl"] > 0 and data["rose"] and data["fell"]
    assert [r["strength"] for r in data["sweep"]] == [0.0, 40.0] and data["sweep"][0]["kl"] == pytest.approx(
        0, abs=1e-6
    )


@pytest.mark.parametrize(
    "change,status,fragment",
    [
        ({"watch": [" two words"]}, 400, "not one"),
        ({"prompts": [""]}, 400, "empty"),
        ({"strengths": [float(i) for i in range(9)]}, 422, "strengths"),
        ({"side_effect_tokens": 100000}, 422, "side_effect_tokens"),
        ({"side_effect_tokens": 64}, 400, "at least 128"),
        ({"features": [{"sae_id": "nope", "index": 3}]}, 404, "unknown SAE"),
    ],
)
def test_measure_bad_input(
    client: TestClient, ids: list[str], change: dict[str, Any], status: int, fragment: str
) -> None:
    body = {"prompts": ["The capital of France is"], "features": [{"sae_id": ids[1], "index": 3, "strength": 40.0}],
            "watch": [" the"], "side_effect_tokens": 0, **change}  # fmt: skip
    out = client.post("/v1/steer/measure", json=body)
    assert out.status_code == status, out.text
    assert fragment in json.dumps(out.json())
    assert client.get("/health").status_code == 200


def test_contrast_over_every_sae(client: TestClient, ids: list[str]) -> None:
    body = {
        "a": ["The sea was calm.", "Waves hit the shore."],
        "b": ["The bank raised rates.", "Stocks fell."],
    }
    out = client.post("/v1/search/contrast", json={**body, "hide_dense": 1.0})
    assert out.status_code == 200, out.text
    data = out.json()
    assert data["n_a"] == 2 and data["results"] and {r["sae_id"] for r in data["results"]} <= set(ids)
    effects = [r["effect"] for r in data["results"]]
    assert effects == sorted(effects, reverse=True) and "explanation" in data["results"][0]
    hidden = client.post("/v1/search/contrast", json=body).json()
    assert hidden["hidden_dense"] >= 0
    bad = client.post("/v1/search/contrast", json={"a": ["one"], "b": body["b"]})
    assert bad.status_code == 422
    empty = client.post("/v1/search/contrast", json={"a": ["x", " "], "b": body["b"]})
    assert empty.status_code == 400 and "empty" in empty.json()["error"]


def test_documents_view(client: TestClient, ids: list[str]) -> None:
    body = {
        "documents": ["The sea was calm.", "Stocks fell sharply.", "The ship sailed on."],
        "sae_id": ids[0],
        "k": 4,
    }
    out = client.post("/v1/activation/documents", json=body)
    assert out.status_code == 200, out.text
    data = out.json()
    assert len(data["documents"]) == 3 and data["documents"][0]["max"]
    for doc in data["documents"]:  # topics, meaning first (the index describes this SAE)
        assert list(doc)[:2] == ["text", "topics"] and all(r["value"] > 0 for r in doc["topics"])
    assert any(doc["topics"] for doc in data["documents"])
    assert (
        all(
            str(r["index"]) in data["explanations"] or r["index"] in data["explanations"]
            for r in data["documents"][0]["max"][:1]
        )
        or data["explanations"] == {}
    )
    assert client.post("/v1/activation/documents", json={"documents": []}).status_code == 422
    bad = client.post("/v1/activation/documents", json={"documents": ["x", " "]})
    assert bad.status_code == 400 and "empty" in bad.json()["error"]
