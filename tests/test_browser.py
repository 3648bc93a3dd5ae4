"""The web UI in a real browser: headless Debian Chromium driven by Playwright clicks through each page
of a small real run folder (tiny model, see test_server.tiny_run_dir) the way a user would, and
checks what is shown. It also checks that no page logs a JavaScript error or fetches anything from
outside the local server.

Needs /usr/bin/chromium (CI installs Debian's `chromium`); never downloads a browser.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from test_server import PROMPT, tiny_run_dir

from gemmascope.models import LanguageModel
from gemmascope.server import create_app, serving

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM),
        reason=f"needs Debian's chromium at {CHROMIUM} (apt-get install chromium)",
    ),
]


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory, tiny_model: LanguageModel) -> Iterator[str]:
    run_dir = tiny_run_dir(tmp_path_factory, tiny_model)
    with serving(create_app(run_dir, model=tiny_model)) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, base_url: str) -> Iterator[Any]:
    """A fresh page that records JavaScript errors and every URL it requests."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.errors = []
    page.requests = []
    page.on("pageerror", lambda err: page.errors.append(str(err)))
    page.on("console", lambda msg: page.errors.append(msg.text) if msg.type == "error" else None)
    page.on("request", lambda req: page.requests.append(req.url))
    yield page
    assert all(url.startswith(base_url) for url in page.requests), [
        u for u in page.requests if not u.startswith(base_url)
    ]
    context.close()


def no_js_errors(page: Any, allowed: tuple[str, ...] = ()) -> None:
    errors = [e for e in page.errors if not any(a in e for a in allowed)]
    assert not errors, errors


def test_microscope_feature_page_and_steering(page: Any, base_url: str) -> None:
    """The user's path: type a prompt into the microscope, hover a token, click a feature, see its
    page with highlighted examples, try their own text, steer with it and see two completions."""
    page.goto(base_url + "/")
    page.wait_for_selector("#sae option", state="attached")
    page.fill("#prompt", PROMPT)
    page.click("#run")
    page.wait_for_selector("#tokens .tok")
    shown = page.locator("#tokens .tok").all_inner_texts()
    assert "".join(shown) == PROMPT  # every token shown once, BOS hidden

    # Hovering a token filters the feature list to that token.
    page.locator("#tokens .tok").nth(5).hover()
    assert f'token 6: "{shown[5]}"' in page.inner_text("#features-title")
    page.mouse.move(2, 2)
    page.wait_for_function(
        "document.querySelector('#features-title').textContent.startsWith('Features on the prompt')"
    )
    first = page.locator("#features .feat").first
    index = first.get_attribute("data-index")
    assert index is not None

    # Clicking a feature opens its page, with examples highlighted.
    first.click()
    page.wait_for_url(f"**/feature/*/{index}")
    page.wait_for_selector("#top-examples .example")
    assert page.inner_text("#title").endswith(f"feature #{index}")
    assert (
        page.locator("#top-examples .example .tok.hot").count()
        == page.locator("#top-examples .example").count()
    )
    hot = page.locator("#top-examples .example .tok.hot").first
    assert "rgba(249, 115, 22" in hot.evaluate("el => getComputedStyle(el).backgroundColor")
    assert page.locator("#lens-pos tr").count() == 11 and page.locator("#lens-neg tr").count() == 11
    assert page.inner_text("#lens-agree").startswith("Its top tokens agree")
    # beside the logit lens, what turning the feature up does to the next token, measured
    page.wait_for_selector("#output-effects[data-loaded]")
    assert page.locator("#out-pos tr").count() == 11 and page.locator("#out-neg tr").count() == 11
    assert "neutral prompts" in page.inner_text("#outputs-note")
    assert page.inner_text("#out-pos tr:nth-child(2) td:last-child").startswith("×")
    assert page.locator("#intervals .group").count() == 5
    assert page.locator("#neighbours a").count() == 10
    assert page.is_visible("#hist") and "non-zero activations" in page.inner_text("#hist-note")
    assert page.inner_text("#explanation").strip()

    # Try your own text: the prompt the feature fired on in the microscope.
    page.fill("#own-text", PROMPT)
    page.click("#own-run")
    page.wait_for_selector("#own-result .tok")
    assert page.locator("#own-result .tok").count() == len(shown)
    assert page.inner_text("#own-max").startswith("max ")

    # Steer with this: the feature is filled in; two completions side by side.
    page.click("#steer-button")
    page.wait_for_url("**/steer?*")
    page.wait_for_selector(".feature-row")
    assert page.input_value(".feature-row .index") == index
    page.fill("#prompt", "The capital of France is")
    page.fill(".feature-row .strength", "40")
    page.fill("#temperature", "0")
    page.fill("#max-new", "8")
    page.click("#steer")
    page.wait_for_selector("#outputs:not([hidden])")
    default, steered = page.inner_text("#default"), page.inner_text("#steered")
    assert default.startswith("The capital of France is") and steered.startswith("The capital of France is")
    assert len(default) > len("The capital of France is") and default != steered
    assert f"add #{index}" in page.inner_text("#steered-tag")
    no_js_errors(page)


def test_microscope_shows_errors_from_the_server(page: Any, base_url: str) -> None:
    page.goto(base_url + "/")
    page.wait_for_selector("#sae option", state="attached")
    page.fill("#prompt", "   ")
    page.click("#run")
    page.wait_for_function("document.querySelector('#error').textContent.length > 0")
    assert "empty" in page.inner_text("#error")
    page.fill("#prompt", "word " * 300)
    page.click("#run")
    page.wait_for_function("document.querySelector('#error').textContent.includes('tokens')")
    no_js_errors(page, allowed=("status of 400",))  # the browser logs the failed fetch itself


def test_microscope_shows_a_character_split_over_byte_tokens_once(page: Any, base_url: str) -> None:
    """A narrow no-break space is three byte tokens: the character shows whole on the last, the
    other two are slivers that still carry their activations (hover titles), and nothing is garbled."""
    text = "1,855,000\u202fkm2 of land"
    page.goto(base_url + "/")
    page.wait_for_selector("#sae option", state="attached")
    page.fill("#prompt", text)
    page.click("#run")
    page.wait_for_selector("#tokens .tok")
    assert "".join(page.locator("#tokens .tok").all_text_contents()) == text
    assert page.locator("#tokens .tok.part").count() == 2
    assert "\ufffd" not in page.inner_text("#tokens")
    no_js_errors(page)


def test_search_page(page: Any, base_url: str) -> None:
    page.goto(base_url + "/search")
    page.wait_for_selector("#sae option", state="attached")
    page.fill("#query", PROMPT)
    page.click("#search")
    page.wait_for_selector("#results tr.result")
    n = page.locator("#results tr.result").count()
    assert 0 < n <= 20 and page.inner_text("#results-title") == f"{n} result{'s' if n > 1 else ''}"
    values = [float(v) for v in page.locator("#results tr.result td.num").all_inner_texts()]
    assert values == sorted(values, reverse=True)
    page.check("input[name=mode][value=id]")
    page.select_option("#sae", "")  # every SAE
    page.fill("#query", "7")
    page.click("#search")
    page.wait_for_function("document.querySelector('#results-title').textContent.startsWith('2 results')")
    page.locator("#results tr.result a").first.click()
    page.wait_for_url("**/feature/*/7")
    page.wait_for_selector("#stats .stat")
    no_js_errors(page)


def test_saes_page(page: Any, base_url: str) -> None:
    page.goto(base_url + "/saes")
    page.wait_for_selector("#saes tr.sae")
    assert page.locator("#saes tr.sae").count() == 2
    cells = page.locator("#saes tr.sae").first.locator("td").all_inner_texts()
    assert cells[1] == "resid_post.1" and cells[3] == "256"
    assert all(c not in ("", "–") for c in cells[5:8])  # L0, FVU, delta LM loss from the report
    page.wait_for_load_state("networkidle")
    images = page.locator("#plots img")
    assert images.count() >= 1
    assert "frontier_l0_delta_lm_loss" in (images.first.get_attribute("src") or "")
    assert all(w > 0 for w in images.evaluate_all("imgs => imgs.map(i => i.naturalWidth)"))
    # one "dead" on the page: the eval's, named so, and training curves say theirs is another count
    assert "dead (eval)" in page.locator("#saes tr").first.inner_text()
    no_js_errors(page)


def test_saes_page_says_the_training_curves_dead_is_not_the_evals(page: Any, base_url: str) -> None:
    def with_curves(route: Any) -> None:  # the run's listing, with a training-curves plot added
        data = route.fetch().json()
        data["plots"].append(data["plots"][0].rsplit("/", 1)[0] + "/layer_1_curves.png")
        route.fulfill(json=data)

    page.route("**/v1/saes", with_curves)
    page.goto(base_url + "/saes")
    page.wait_for_selector("#plots figure")
    captions = page.locator("#plots figcaption").all_inner_texts()
    curves = [c for c in captions if "layer_1_curves.png" in c]
    assert len(curves) == 1 and "not the dead of the table above" in curves[0]
    assert all("training window" not in c for c in captions if c not in curves)


def test_unknown_feature_page(page: Any, base_url: str) -> None:
    resp = page.goto(base_url + "/feature/resid_post.1.w256.l0_1/99999")
    assert resp.status == 404 and "out of range" in page.inner_text(".error")


@pytest.fixture(scope="module")
def graph_url(tmp_path_factory: pytest.TempPathFactory, tiny_model: LanguageModel) -> Iterator[str]:
    from test_server_graphs import graph_run_dir

    run_dir = graph_run_dir(tmp_path_factory, tiny_model)
    with serving(create_app(run_dir, model=tiny_model)) as url:
        yield url


def test_graph_page_from_the_microscope_hover_select_and_intervene(browser: Any, graph_url: str) -> None:
    """The microscope's "Why this next token?" draws the prompt's graph; hovering a feature node says
    what it is, shift+click selects it, and an intervention shows predicted beside measured."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(graph_url + "/")
    page.wait_for_selector("#why:not([hidden])")
    page.fill("#prompt", GRAPH_PROMPT)
    page.click("#why")
    page.wait_for_url("**/graph/the-cat-sat-on-the-mat-and")
    page.wait_for_selector("svg#graph .node")
    assert "replacement score" in page.inner_text("#graph-stats")
    assert page.locator("svg#graph line.edge").count() > 0
    nodes = page.locator("svg#graph circle.node")
    picked = None
    for i in range(nodes.count()):
        node_id = nodes.nth(i).get_attribute("data-id") or ""
        if node_id.count("_") == 2 and not node_id.startswith("5_"):  # a feature node, not a logit
            picked = nodes.nth(i)
            break
    assert picked is not None
    picked.hover()
    page.wait_for_selector("#tip:not([hidden])")
    assert "latent" in page.inner_text("#tip")
    picked.click(modifiers=["Shift"])
    assert "1 node(s)" in page.inner_text("#selected")
    page.click("#intervene")
    page.wait_for_selector("#result-table tr:nth-child(2)")
    assert "measured" in page.inner_text("#result-table") and "now says" in page.inner_text("#now-says")
    assert not errors, errors
    context.close()


GRAPH_PROMPT = "The cat sat on the mat and"


def open_graph(browser: Any, graph_url: str) -> tuple[Any, Any, str]:
    """A new page (1400 x 1000) showing GRAPH_PROMPT's graph, drawn when the run lacks it."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    listed = page.request.get(graph_url + "/v1/graph/list").json()
    slug = next((g["slug"] for g in listed["graphs"] if g["prompt"] == GRAPH_PROMPT), None)
    if slug is None:
        slug = page.request.post(graph_url + "/v1/graph/generate", data={"prompt": GRAPH_PROMPT}).json()[
            "slug"
        ]
    page.goto(f"{graph_url}/graph/{slug}")
    page.wait_for_selector("svg#graph .node")
    return context, page, slug


def test_graph_page_draws_errors_beneath_features_and_output_labels_whole(
    browser: Any, graph_url: str
) -> None:
    """Nothing is drawn over a feature node's centre, neither a square nor another feature (a click
    there reaches that feature), and every output label lies inside the drawing."""
    context, page, slug = open_graph(browser, graph_url)
    found = page.evaluate(
        """() => {
        const nodes = [...document.querySelectorAll("svg#graph .node")];
        const square = (id) => id.startsWith("err_") || id.startsWith("E_");
        const ids = nodes.map((n) => n.dataset.id);
        const layers = ids.filter((id) => /^\\d+_\\d+_\\d+$/.test(id)).map((id) => Number(id.split("_")[0]));
        const logitLayer = Math.max(...layers);
        const feature = (id) => /^\\d+_\\d+_\\d+$/.test(id) && Number(id.split("_")[0]) < logitLayer;
        const lastSquare = Math.max(...ids.map((id, i) => (square(id) ? i : -1)));
        const firstFeature = ids.findIndex(feature);
        const covered = [];
        for (const n of nodes.filter((n) => feature(n.dataset.id))) {
          n.scrollIntoView({block: "center", inline: "center"});
          const box = n.getBoundingClientRect();
          const hit = document.elementFromPoint(box.x + box.width / 2, box.y + box.height / 2);
          if (hit !== n) covered.push(n.dataset.id);  // a square or another feature over its centre
        }
        const svg = document.querySelector("svg#graph");
        const width = Number(svg.getAttribute("width"));
        const cut = [...svg.querySelectorAll("text")].filter((t) => t.getBBox().x + t.getBBox().width > width)
          .map((t) => t.textContent);
        return {nFeatures: ids.filter(feature).length, nSquares: ids.filter(square).length, lastSquare,
          firstFeature, covered, cut};
      }"""
    )
    assert found["nFeatures"] > 0 and found["nSquares"] > 0
    assert found["lastSquare"] < found["firstFeature"], found  # squares first: beneath every feature
    assert found["covered"] == [] and found["cut"] == []
    context.close()


def test_graph_page_fills_the_width_and_redraws_a_stale_graphs_own_prompt(
    browser: Any, graph_url: str, tmp_path_factory: pytest.TempPathFactory, tiny_model: LanguageModel
) -> None:
    """A short prompt's graph spreads its positions over the page's width (the crowded ones wider),
    not a fixed 92 px each; a graph drawn from another transcoder set says so and puts its own
    prompt in the box, so "draw it again here" redraws that prompt."""
    import json

    from test_server_graphs import graph_run_dir

    context, page, slug = open_graph(browser, graph_url)
    width, room = page.evaluate(
        """() => [Number(document.querySelector("svg#graph").getAttribute("width")),
                  document.querySelector(".graph-wrap").clientWidth]"""
    )
    assert 0.9 * room <= width <= 1.1 * room, (width, room)  # a long output label may widen it
    run = graph_run_dir(tmp_path_factory, tiny_model)
    data = json.loads((run / "graphs" / f"{slug}.json").read_text())
    data["metadata"]["prompt"] = "A stale graph of another prompt"
    data["metadata"]["gemmascope"]["transcoder_digest"] = "0123456789abcdef"
    stale = run / "graphs" / "stale-one.json"
    stale.write_text(json.dumps(data))
    try:
        page.goto(f"{graph_url}/graph/stale-one")
        page.wait_for_selector("#error:has-text('another transcoder set')")
        assert page.input_value("#prompt") == "A stale graph of another prompt"
    finally:
        stale.unlink()
    context.close()


def test_a_feature_with_few_examples_says_so_and_an_empty_search_offers_dense_features(
    page: Any, base_url: str, tmp_path_factory: pytest.TempPathFactory, tiny_model: LanguageModel
) -> None:
    import json

    from gemmascope.features import FeatureIndex

    index = FeatureIndex(tiny_run_dir(tmp_path_factory, tiny_model) / "features.sqlite")
    sae_id = index.saes()[0]["sae_id"]
    fired = index.column(sae_id, "n_fired").tolist()
    few = next(i for i, n in enumerate(fired) if 0 < n < 10)
    many = next(i for i, n in enumerate(fired) if n >= 10)
    page.goto(f"{base_url}/feature/{sae_id}/{few}")
    page.wait_for_selector("#few-examples")
    assert f"Only {int(fired[few])} indexed example" in page.inner_text("#few-examples")
    page.goto(f"{base_url}/feature/{sae_id}/{many}")
    page.wait_for_selector("#stats div")
    assert page.locator("#few-examples").count() == 0

    asked: list[dict[str, Any]] = []

    def answer(route: Any) -> None:  # the server's answer, stubbed: first nothing, then one feature
        body = json.loads(route.request.post_data)
        asked.append(body)
        results = (
            []
            if body.get("hide_dense", 0) < 1
            else [{"sae_id": sae_id, "index": many, "value": 3.0, "token": " a"}]
        )
        route.fulfill(json={"mode": "text", "sae_id": sae_id, "results": results})

    page.route("**/v1/search/text", answer)
    page.goto(f"{base_url}/search?mode=text&q=hello")
    page.wait_for_selector("#dense-hint button")
    page.click("#dense-hint button")
    page.wait_for_selector("tr.result")
    # the server's default share first (not sent), then everything
    assert [b.get("hide_dense") for b in asked] == [None, 1.0] and page.is_checked("#show-dense")


def test_steer_page_measures_watched_tokens_cost_and_a_sweep(page: Any, base_url: str) -> None:
    page.goto(base_url + "/steer")
    page.wait_for_selector(".feature-row .sae option", state="attached")
    page.fill("#prompt", "The capital of France is")
    page.fill(".feature-row .index", "3")
    page.fill(".feature-row .strength", "40")
    page.fill("#m-watch", '" the"\n" a"')
    page.fill("#m-prompts", "My favourite city is")
    page.fill("#m-cost", "256")
    page.fill("#m-sweep", "0,20,40")
    page.click("#measure")
    page.wait_for_selector("#m-sweep-table tr:nth-child(4)")
    watched = page.inner_text("#m-watch-table")
    assert '" the"' in watched and '" a"' in watched
    assert "ΔLM" in page.inner_text("#m-cost-line")
    assert page.locator("#m-sweep-chart polyline").count() == 3  # two watched tokens and ΔLM loss
    page.fill("#m-watch", '" two words"')
    page.click("#measure")
    page.wait_for_function("document.querySelector('#m-error').textContent.includes('not one')")
    no_js_errors(page, allowed=("400",))


def test_search_page_contrast_panel(page: Any, base_url: str) -> None:
    page.goto(base_url + "/search")
    page.wait_for_selector("#sae option", state="attached")
    page.fill("#set-a", "The sea was calm.\nWaves hit the shore.")
    page.fill("#set-b", "The bank raised rates.\nStocks fell.")
    page.check("#contrast-dense")
    page.click("#contrast")
    page.wait_for_selector("tr.contrast-row")
    row = page.locator("tr.contrast-row").first
    assert "/2" in row.inner_text() and row.locator("a").get_attribute("href").startswith("/feature/")
    page.fill("#set-a", "only one")
    page.click("#contrast")
    page.wait_for_function("document.querySelector('#c-error').textContent.length > 0")
    no_js_errors(page, allowed=("422",))


def test_microscope_shows_topics_first_and_the_raw_order_on_request(page: Any, base_url: str) -> None:
    """The text's topics (pooled, meaning first) sit above its tokens; the order select switches to
    the raw activation order and back, and the choice survives a reload through the URL."""
    page.goto(base_url + "/")
    page.wait_for_selector("#sae option", state="attached")
    page.fill("#prompt", PROMPT)
    page.click("#run")
    page.wait_for_selector("#tokens .tok")
    assert page.inner_text("#topics-title") == "Topics of the text (meaning first)"
    topics_box, tokens_box = (
        page.locator("#topics-card").bounding_box(),
        page.locator("#tokens").bounding_box(),
    )
    assert topics_box["y"] < tokens_box["y"]  # topics first
    assert page.locator("#topics .feat").count() > 0
    assert "meaning first" in page.inner_text("#features-title")
    # a label wraps to two lines rather than being cut to one, and says the whole on hover
    label = page.locator("#features .feat .expl").first
    assert label.get_attribute("title") == label.inner_text() != ""
    assert label.evaluate("e => getComputedStyle(e).webkitLineClamp") == "2"
    assert label.evaluate("e => getComputedStyle(e).whiteSpace") != "nowrap"
    page.select_option("#order", "raw")
    page.wait_for_function("document.querySelector('#topics-title').textContent.includes('by activation')")
    assert "strongest first" in page.inner_text("#features-title") and "order=raw" in page.url
    page.reload()
    page.wait_for_selector("#tokens .tok")
    assert page.input_value("#order") == "raw" and "by activation" in page.inner_text("#topics-title")
    no_js_errors(page)


def test_microscope_documents_mode_and_token_boundaries(page: Any, base_url: str) -> None:
    page.goto(base_url + "/")
    page.wait_for_selector("#sae option", state="attached")
    page.fill("#prompt", "The sea was calm.")
    page.click("#run")
    page.wait_for_selector("#tokens .tok")
    assert "tokens after BOS" in page.inner_text("#token-count")
    page.check("#bounds")
    assert page.locator("#tokens .tokens.bounded").count() == 1
    page.fill("#prompt", "The sea was calm.\nStocks fell sharply.\nThe ship sailed on.")
    page.check("#docs-mode")
    page.click("#run")
    page.wait_for_selector(".doc-card")
    assert page.locator(".doc-card").count() == 3 and page.is_visible("#shared")
    assert page.locator(".doc-card .grid4 > div").first.inner_text().startswith("topics (meaning first)")
    assert page.is_hidden("#result")
    no_js_errors(page)
