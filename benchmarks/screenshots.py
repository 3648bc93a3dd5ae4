"""Screenshots of the web UI: serve a run folder, drive headless Chromium through each page the way
a user would (microscope with a prompt, a feature page opened from it, steering with that feature,
its measured effect (watched tokens, cost, a sweep), search, contrastive search, the microscope over
several documents, the SAEs page) and save `docs/screenshot-*.png`.

    python benchmarks/screenshots.py runs/demo [--out docs] [--prompt "..."]

Needs Debian's `chromium` (/usr/bin/chromium) and the Python `playwright` package; it never
downloads a browser. Also prints how long each page took and writes them to
benchmarks/results/screenshots.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

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
PROMPT = "The Eiffel Tower is in Paris, the capital of France. It was built in 1889 for the World's Fair."
STEER_PROMPT = "My favourite place to visit is"
MEASURE_PROMPTS = [
    "My favourite place to visit is",
    "Next summer we are flying to",
    "The city I like most is",
]
DOCUMENTS = [
    "My dog barks at the mailman every morning, and the puppy chews on old shoes.",
    "The stock market fell sharply on Monday as the bank raised interest rates.",
    "The violin concerto was first performed in Vienna in 1878.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--out", default="docs")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--steer-prompt", default=STEER_PROMPT)
    parser.add_argument(
        "--strength-fraction", type=float, default=0.15, help="of the feature's max activation"
    )
    parser.add_argument(
        "--search", default=PROMPT, help="text for the search page (searched at --focus-token)"
    )
    parser.add_argument("--sae", default=None, help="SAE id to show (default: the run's first)")
    parser.add_argument("--focus-token", default="Paris", help="token whose top feature gets its page shown")
    parser.add_argument("--graph", default=None, help="graph slug to show (default: the first in RUN/graphs)")
    parser.add_argument(
        "--watch",
        nargs="+",
        default=['" Paris"', '" France"'],
        help="watched tokens (measure panel; the defaults suit the France latent the demo finds on Paris)",
    )
    parser.add_argument("--measure-prompts", nargs="+", default=MEASURE_PROMPTS)
    parser.add_argument("--documents", nargs="+", default=DOCUMENTS, help="one document each (microscope)")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    app = create_app(args.run_dir)
    timings["load_run_s"] = time.perf_counter() - t0
    with serving(app) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900}, device_scale_factor=1)

        def shot(name: str) -> None:
            path = out / f"screenshot-{name}.png"
            page.screenshot(path=str(path), full_page=True)
            print(f"wrote {path}")

        def timed(name: str, fn: object) -> None:
            start = time.perf_counter()
            fn()  # type: ignore[operator]
            timings[f"{name}_s"] = time.perf_counter() - start

        # Microscope: type a prompt, run it, hover the token with the strongest feature.
        page.goto(url + "/" + (f"?sae_id={args.sae}" if args.sae else ""))
        page.wait_for_selector("#sae option", state="attached")
        page.fill("#prompt", args.prompt)
        timed("microscope", lambda: (page.click("#run"), page.wait_for_selector("#tokens .tok")))
        tokens = page.locator("#tokens .tok").all_inner_texts()
        focus = next((i for i, t in enumerate(tokens) if t.strip() == args.focus_token), 0)
        page.locator("#tokens .tok").nth(focus).click()  # pin the token: its top features are listed
        page.mouse.move(5, 5)
        shot("microscope")

        # Feature page: the strongest feature on that token, opened from the microscope.
        page.locator("#features .feat").first.click()
        timed("feature", lambda: page.wait_for_selector("#top-examples .example, #top-examples .muted"))
        page.fill("#own-text", args.prompt)
        page.click("#own-run")
        page.wait_for_selector("#own-result .tok")
        shot("feature")

        # Steer with that feature: default and steered completions side by side.
        page.click("#steer-with")
        page.wait_for_selector(".feature-row")
        page.fill("#prompt", args.steer_prompt)
        # Strength: a fraction of the feature's max activation (the placeholder shows it), as README
        # advises; the default, the whole max activation, is strong on this model.
        page.wait_for_function("document.querySelector('.strength').placeholder.startsWith('max act ')")
        max_act = float(page.locator(".strength").first.get_attribute("placeholder").split()[-1])  # type: ignore[union-attr]
        page.fill(".strength", f"{args.strength_fraction * max_act:.1f}")
        timed("steer", lambda: (page.click("#steer"), page.wait_for_selector("#outputs:not([hidden])")))
        shot("steer")

        # Measure it: watched tokens over prompts, the cost on held-out text, a strength sweep.
        page.fill("#m-watch", "\n".join(args.watch))
        page.fill("#m-prompts", "\n".join(args.measure_prompts))
        page.fill("#m-sweep", ",".join(f"{f * max_act:.0f}" for f in (0, 0.05, 0.1, 0.15, 0.2)))
        page.fill("#m-cost", "512")
        timed(
            "measure",
            lambda: (page.click("#measure"), page.wait_for_selector("#m-sweep-chart", timeout=600_000)),
        )
        page.locator("#measure-card").screenshot(path=str(out / "screenshot-measure.png"))
        print(f"wrote {out / 'screenshot-measure.png'}")

        # Search: features that fire most on a word.
        page.goto(url + "/search")
        page.wait_for_selector("#sae option", state="attached")
        page.fill("#query", args.search)
        page.fill("#token", args.focus_token)
        timed("search", lambda: (page.click("#search"), page.wait_for_selector("#results tr.result")))
        shot("search")

        # Contrastive search: the panel's own example sets (dogs against other topics).
        timed(
            "contrast",
            lambda: (
                page.click("#contrast"),
                page.wait_for_selector("#contrast-results tr.contrast-row", timeout=120_000),
            ),
        )
        page.locator("#contrast-card").screenshot(path=str(out / "screenshot-contrast.png"))
        print(f"wrote {out / 'screenshot-contrast.png'}")

        # The microscope over several documents: top features per document, shared ones.
        page.goto(url + "/" + (f"?sae_id={args.sae}" if args.sae else ""))
        page.wait_for_selector("#sae option", state="attached")
        page.check("#docs-mode")
        page.fill("#prompt", "\n".join(args.documents))
        timed("documents", lambda: (page.click("#run"), page.wait_for_selector("#docs-result:not([hidden])")))
        shot("documents")

        # SAEs: eval numbers and plots.
        page.goto(url + "/saes")
        page.wait_for_selector("#saes tr.sae")
        page.wait_for_load_state("networkidle")
        shot("saes")

        # Graph: a drawn attribution graph, when the run has one (a transcoder run).
        graphs = sorted((Path(args.run_dir) / "graphs").glob("*.json"))
        if graphs:
            page.set_viewport_size({"width": 1500, "height": 1000})
            page.goto(url + f"/graph/{(args.graph or graphs[0].stem)}")
            page.wait_for_selector("svg#graph circle.node")
            page.wait_for_timeout(800)
            shot("graph")
        browser.close()

    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    record = {"run_dir": str(args.run_dir), "model": app.state.run.model_name, "timings": timings}
    (results / "screenshots.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
