"""The graph API (server/graphs.py) on a tiny run with a transcoder per layer: list, draw, read,
intervene; bad input gets a JSON 4xx and the server keeps serving; a run without transcoders says
why it cannot draw graphs."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from test_attribution import random_transcoders
from test_server import tiny_run_dir

from gemmascope.features import build_index
from gemmascope.formats import save_sae
from gemmascope.models import LanguageModel
from gemmascope.runs import sae_id
from gemmascope.server import create_app

PROMPT = "The cat sat on the mat and"
_RUNS: dict[str, Path] = {}


def graph_run_dir(tmp_path_factory: pytest.TempPathFactory, model: LanguageModel) -> Path:
    """A run folder on the tiny model with a (random) transcoder per layer, indexed (shared with
    test_browser)."""
    if "graph" not in _RUNS:
        run = tmp_path_factory.mktemp("graph_run")
        (run / "run.json").write_text(json.dumps({"model": model.name}))
        saes = {}
        for layer, tc in enumerate(random_transcoders(model)):
            folder = save_sae(
                tc, run / "saes" / "mlp_in" / f"layer_{layer}" / "width_64" / "l0_5_skip_transcoder"
            )
            saes[sae_id(folder)] = tc
        build_index(model, saes, run / "features.sqlite", n_tokens=2048, progress=False)
        _RUNS["graph"] = run
    return _RUNS["graph"]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, tiny_model: LanguageModel) -> Iterator[TestClient]:
    run = graph_run_dir(tmp_path_factory, tiny_model)
    with TestClient(create_app(run, model=tiny_model)) as c:
        yield c


@pytest.fixture(scope="module")
def drawn(client: TestClient) -> dict[str, Any]:
    out = client.post("/v1/graph/generate", json={"prompt": PROMPT})
    assert out.status_code == 200, out.text
    return dict(out.json())


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, tiny_model: LanguageModel) -> Path:
    """The graphs folder of the run the client serves."""
    return graph_run_dir(tmp_path_factory, tiny_model) / "graphs"


def test_draw_list_read_and_page(client: TestClient, drawn: dict[str, Any]) -> None:
    assert drawn["slug"] == "the-cat-sat-on-the-mat-and"
    listed = client.get("/v1/graph/list").json()
    assert listed["available"] and [g["slug"] for g in listed["graphs"]] == [drawn["slug"]]
    data = client.get(f"/v1/graph/{drawn['slug']}").json()
    assert data["metadata"]["prompt"] == PROMPT and data["links"]
    features = [n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert features and all(n["layer"] in "0123" for n in features)
    assert data["metadata"]["transcoder_list"][0] == "mlp_in.0.w64.l0_5_skip_transcoder"
    page = client.get(f"/graph/{drawn['slug']}")
    assert page.status_code == 200 and "graph.js" in page.text
    assert client.get("/graph/nope").status_code == 404


def test_intervene_gives_predicted_and_measured(client: TestClient, drawn: dict[str, Any]) -> None:
    data = client.get(f"/v1/graph/{drawn['slug']}").json()
    node = next(n["node_id"] for n in data["nodes"] if n["feature_type"] == "cross layer transcoder")
    out = client.post(f"/v1/graph/{drawn['slug']}/intervene", json={"nodes": [node]})
    assert out.status_code == 200, out.text
    body = out.json()
    assert len(body["logits"]) == len([n for n in data["nodes"] if n["feature_type"] == "logit"])
    row = body["logits"][0]
    assert set(row) == {"token", "predicted", "predicted_direct", "measured", "prob_before", "prob_after"}
    assert row["predicted"] != 0 or row["measured"] != 0
    assert isinstance(body["top_token"], str)


@pytest.mark.parametrize(
    "path,body,status,fragment",
    [
        ("/v1/graph/generate", {"prompt": ""}, 400, "empty"),
        ("/v1/graph/generate", {"prompt": "word " * 140}, 400, "at most 128"),
        ("/v1/graph/generate", {"prompt": "hi", "slug": "Bad Name"}, 400, "not valid"),
        ("/v1/graph/generate", {"prompt": "hi", "node_threshold": 2}, 422, "node_threshold"),
        ("/v1/graph/nope/intervene", {"nodes": ["1_2_3"]}, 404, "no graph 'nope'"),
    ],
)
def test_bad_requests(client: TestClient, path: str, body: Any, status: int, fragment: str) -> None:
    out = client.post(path, json=body)
    assert out.status_code == status, out.text
    assert fragment in json.dumps(out.json())
    assert client.get("/health").status_code == 200  # still serving


def test_a_drawn_graph_never_replaces_another_prompts(
    client: TestClient, drawn: dict[str, Any], folder: Path
) -> None:
    kept = (folder / f"{drawn['slug']}.json").read_bytes()
    out = client.post("/v1/graph/generate", json={"prompt": "A dog ran", "slug": drawn["slug"]})
    assert out.status_code == 400 and "already holds the graph of" in out.json()["error"]
    assert str(folder) not in out.json()["error"]  # no server path
    other = PROMPT.upper() + "?"  # the same words: the same default name
    out = client.post("/v1/graph/generate", json={"prompt": other})
    assert out.status_code == 200, out.text
    slug = out.json()["slug"]
    try:
        assert slug != drawn["slug"] and slug.startswith(drawn["slug"])
        assert client.get(f"/v1/graph/{slug}").json()["metadata"]["prompt"] == other
        assert (folder / f"{drawn['slug']}.json").read_bytes() == kept
    finally:
        (folder / f"{slug}.json").unlink()
        (folder / f"{slug}.png").unlink(missing_ok=True)


def test_bad_interventions(client: TestClient, drawn: dict[str, Any]) -> None:
    url = f"/v1/graph/{drawn['slug']}/intervene"
    assert "not a feature node" in client.post(url, json={"nodes": ["E_2_0"]}).json()["error"]
    out = client.post(url, json={"nodes": ["3_63_1"]})
    assert out.status_code == 400 and "not active features" in out.json()["error"]
    assert client.post(url, json={"nodes": []}).status_code == 422
    for node in ("²_1_1", "9" * 5000 + "_1_1", "1_1_１"):  # digits int() refuses, or thousands of them
        out = client.post(url, json={"nodes": [node]})
        assert out.status_code == 400 and "not a feature node" in out.json()["error"], out.text
    assert client.post(url, json={"nodes": ["1_2_3"], "value": 1e39}).status_code == 422


def test_a_damaged_graph_file_is_listed_as_damaged_and_hides_no_other(
    client: TestClient, drawn: dict[str, Any], folder: Path
) -> None:
    damaged = {"bad-json": "{oops", "bad-kind": '{"metadata": 3, "nodes": [], "links": []}'}
    for slug, text in damaged.items():
        (folder / f"{slug}.json").write_text(text)
    try:
        listed = client.get("/v1/graph/list")
        assert listed.status_code == 200, listed.text
        graphs = {g["slug"]: g for g in listed.json()["graphs"]}
        assert graphs[drawn["slug"]]["prompt"] == PROMPT and "damaged" not in graphs[drawn["slug"]]
        assert all(graphs[slug]["prompt"] is None and graphs[slug]["damaged"] for slug in damaged)
        assert not [slug for slug in damaged if str(folder) in graphs[slug]["damaged"]]  # no server path
        out = client.get("/v1/graph/bad-kind")
        assert out.status_code == 409 and "is damaged" in out.json()["error"]
    finally:
        for slug in damaged:
            (folder / f"{slug}.json").unlink()


def test_no_request_ever_gets_a_plain_text_500(
    client: TestClient, drawn: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug (any exception the routes do not expect) is answered in JSON like every other error."""
    from gemmascope.server import graphs

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(graphs, "read_graph", broken)
    plain = TestClient(client.app, raise_server_exceptions=False)
    out = plain.get(f"/v1/graph/{drawn['slug']}")
    assert out.status_code == 500 and out.headers["content-type"] == "application/json"
    assert "internal error (RuntimeError)" in out.json()["error"]


def test_a_graph_of_another_transcoder_set_is_refused(
    client: TestClient, drawn: dict[str, Any], folder: Path
) -> None:
    source = folder / f"{drawn['slug']}.json"
    other = folder / "other.json"
    data = json.loads(source.read_text())
    data["metadata"]["gemmascope"]["transcoder_digest"] = "0123456789abcdef"
    other.write_text(json.dumps(data))
    try:
        out = client.get("/v1/graph/other")
        assert out.status_code == 409 and "another transcoder set" in out.json()["error"]
        listed = {g["slug"]: g["stale"] for g in client.get("/v1/graph/list").json()["graphs"]}
        assert listed["other"] and not listed[drawn["slug"]]  # the list says so before it is opened
    finally:
        other.unlink()


def test_a_run_without_transcoders_says_why(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: LanguageModel
) -> None:
    run = tiny_run_dir(tmp_path_factory, tiny_model)
    with TestClient(create_app(run, model=tiny_model)) as c:
        listed = c.get("/v1/graph/list").json()
        assert not listed["available"] and "no transcoder for layers 0-3" in listed["why_not"]
        out = c.post("/v1/graph/generate", json={"prompt": PROMPT})
        assert out.status_code == 409 and "suite" in out.json()["error"]
    shutil.rmtree(run / "graphs", ignore_errors=True)


def test_graphs_over_a_runs_cross_layer_transcoder(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, tiny_model: LanguageModel, drawn: dict[str, Any]
) -> None:
    from test_clt import random_clt

    from gemmascope.formats.clt import save_clt

    run = tmp_path / "run"
    shutil.copytree(graph_run_dir(tmp_path_factory, tiny_model), run)  # its per-layer set and a graph of it
    save_clt(random_clt(w=32), run / "clts" / "width_32" / "l0_5_skip")
    with TestClient(create_app(run, model=tiny_model)) as c:  # the per-layer set by default
        assert c.get("/v1/graph/list").json()["dictionary"] == "a transcoder per layer"
    with TestClient(create_app(run, model=tiny_model, clt="")) as c:  # serve --clt
        listed = c.get("/v1/graph/list").json()
        assert (
            listed["available"] and listed["dictionary"] == "cross-layer transcoder clts/width_32/l0_5_skip"
        )
        assert c.get(f"/v1/graph/{drawn['slug']}").status_code == 409  # drawn over the per-layer set
        out = c.post("/v1/graph/generate", json={"prompt": PROMPT, "slug": "over-clt"})
        assert out.status_code == 200, out.text
        data = c.get("/v1/graph/over-clt").json()
        assert data["metadata"]["transcoder_list"][0].startswith("clt")
        node = next(n["node_id"] for n in data["nodes"] if n["feature_type"] == "cross layer transcoder")
        answer = c.post("/v1/graph/over-clt/intervene", json={"nodes": [node]})
        assert answer.status_code == 200 and answer.json()["logits"][0]["measured"] is not None
    with TestClient(create_app(run, model=tiny_model, clt="width_99")) as c:
        listed = c.get("/v1/graph/list").json()
        assert not listed["available"] and "matching 'width_99'" in listed["why_not"]
    shutil.rmtree(run / "saes" / "mlp_in" / "layer_3")  # no per-layer set: the run's only CLT
    with TestClient(create_app(run, model=tiny_model)) as c:
        assert c.get("/v1/graph/list").json()["dictionary"].startswith("cross-layer transcoder")


def test_a_run_of_a_cross_layer_transcoder_alone_serves_its_graphs_and_its_latents_pages(
    tmp_path: Path, tiny_model: LanguageModel
) -> None:
    """A run holding only a CLT (no saes/) is served: the Graph page draws over it, and each layer of
    the CLT is a dictionary of its own (`clt.layer_sae`), named as the graph names its nodes' layers,
    so a node's feature page opens once the run is indexed (`gemmascope index RUN`); an empty run is
    still refused."""
    from test_clt import random_clt

    from gemmascope.cli import main
    from gemmascope.errors import StoreError
    from gemmascope.formats.clt import save_clt

    run = tmp_path / "clt_run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"model": tiny_model.name}))
    with pytest.raises(StoreError, match="holds no SAEs and no cross-layer transcoder"):
        create_app(run, model=tiny_model)
    clt = random_clt(w=32)
    n = tiny_model.n_layers
    clt.cfg.extra["heldout"] = {
        "tokens": 512,
        "fvu": [0.1 * i for i in range(n)],
        "l0": [5.0] * n,
        "dead": [0.0] * n,
    }
    save_clt(clt, run / "clts" / "width_32" / "l0_5_skip")
    layers = [f"clt.{layer}.w32.l0_5_skip" for layer in range(n)]
    with TestClient(create_app(run, model=tiny_model)) as c:
        listed = c.get("/v1/saes").json()["saes"]
        assert [s["id"] for s in listed] == layers
        assert listed[2]["architecture"] == "jumprelu (CLT layer)"  # its training's held-out figures
        assert listed[2]["eval"] == {"l0": 5.0, "fvu": pytest.approx(0.2), "frac_dead": 0.0, "n_tokens": 512}
        listed = c.get("/v1/graph/list").json()
        assert listed["available"] and listed["dictionary"].startswith("cross-layer transcoder")
        out = c.post("/v1/graph/generate", json={"prompt": PROMPT, "slug": "clt-only"})
        assert out.status_code == 200, out.text
        graph = c.get("/v1/graph/clt-only").json()
        assert graph["metadata"]["transcoder_list"] == layers
        node = next(n for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder")
        page = c.get(f"/v1/feature/{layers[int(node['layer'])]}/{node['node_id'].split('_')[1]}")
        assert page.status_code == 404 and "gemmascope index" in page.json()["error"], page.text
        answer = c.post("/v1/activation/topk-by-token", json={"prompt": PROMPT, "sae_id": layers[2]})
        assert answer.status_code == 200, answer.text
    assert main(["index", str(run), "--model", "tiny-gemma3", "--tokens", "1024", "--quiet"]) == 0
    with TestClient(create_app(run, model=tiny_model)) as c:
        page = c.get(f"/v1/feature/{layers[int(node['layer'])]}/{node['node_id'].split('_')[1]}")
        assert page.status_code == 200 and page.json()["top_examples"], page.text
        assert c.get("/").status_code == 200 and c.get("/graph").status_code == 200


def test_a_damaged_clt_is_left_out_and_an_older_index_still_reports(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, tiny_model: LanguageModel, capsys
) -> None:
    """One CLT folder that cannot be read keeps neither the run's SAEs nor its other CLTs from
    opening (a warning names it); `gemmascope index RUN --no-build` on an index built before the run
    had CLTs reports the SAEs it holds instead of failing on CLT layers it never held."""
    from test_clt import random_clt

    from gemmascope.cli import main
    from gemmascope.formats.clt import save_clt
    from gemmascope.opening import open_run

    run = tmp_path / "run"
    shutil.copytree(graph_run_dir(tmp_path_factory, tiny_model), run)  # indexed before any CLT
    save_clt(random_clt(w=32), run / "clts" / "width_32" / "l0_5_skip")
    bad = save_clt(random_clt(w=16), run / "clts" / "width_16" / "l0_5_skip")
    (bad / "W_enc_0.safetensors").write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="left out the CLT .*width_16"):
        opened = open_run(run, model=tiny_model, clt_layers=True)
    assert sum(k.startswith("mlp_in.") for k in opened.saes) == tiny_model.n_layers
    assert [k for k in opened.saes if k.startswith("clt.")] == [
        f"clt.{layer}.w32.l0_5_skip" for layer in range(tiny_model.n_layers)
    ]
    with pytest.warns(UserWarning, match="width_16"):
        assert main(["index", str(run), "--model", "tiny-gemma3", "--no-build"]) == 0
    out = capsys.readouterr().out
    assert "mlp_in.0.w64.l0_5_skip_transcoder: " in out and "clt." not in out.split("feature index:")[0]


def test_the_command_line_takes_a_clt_layer_by_its_id(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, tiny_model: LanguageModel, capsys
) -> None:
    """`inspect` and `steer --sae clt.L.wW.l0_K` open that one layer of the run's CLT (as the pages
    do); a layer the run lacks is a one-line error naming the ids it has."""
    from test_clt import random_clt

    from gemmascope.cli import main
    from gemmascope.formats.clt import save_clt

    run = tmp_path / "run"
    shutil.copytree(graph_run_dir(tmp_path_factory, tiny_model), run)
    save_clt(random_clt(w=32), run / "clts" / "width_32" / "l0_5_skip")
    common = ["--run", str(run), "--model", "tiny-gemma3"]
    assert main(["inspect", PROMPT, "--sae", "clt.2.w32.l0_5_skip", *common]) == 0
    assert "top 5 features of clt.2.w32.l0_5_skip per token" in capsys.readouterr().out
    steer = ["steer", PROMPT, "--feature", "5", "--strength", "3", "--max-new-tokens", "3", *common]
    assert main([*steer, "--sae", "clt.1.w32.l0_5_skip"]) == 0
    assert "SAEs clt.1.w32.l0_5_skip" in capsys.readouterr().out
    assert main([*steer, "--sae", "clt.9.w32.l0_5_skip"]) == 2
    err = capsys.readouterr().err
    assert "no CLT layer 'clt.9.w32.l0_5_skip'" in err and "clt.LAYER.w32.l0_5_skip" in err
