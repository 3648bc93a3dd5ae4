"""Tests for suite/ (plan.py, run.py) and the `suite` / `demo` commands: a whole suite on the tiny model (every stage,
the summary and heatmap, resuming without redoing work, the time budget), bad input, and the demo
end to end on the real Gemma 3 270M."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gemmascope.cli import main
from gemmascope.errors import ConfigError, StoreError
from gemmascope.formats import load_sae
from gemmascope.suite import SuitePlan, parse_l0s, parse_layers, run_suite


def _tiny_plan(**kw: object) -> SuitePlan:
    base: dict[str, object] = dict(
        model="tiny-gemma3",
        kinds=["resid_post", "mlp_out"],
        layers=[1, 2],
        widths=[128],
        target_l0s=[8.0],
        tokens=4096,
        eval_tokens=1200,
        index_tokens=2048,
        batch_size=256,
        fast=False,
    )
    base.update(kw)
    return SuitePlan(**base)  # type: ignore[arg-type]


def test_parse_l0s_and_layers() -> None:
    assert parse_l0s("small,medium,big") == [15.0, 45.0, 120.0]
    assert parse_l0s("20, 50") == [20.0, 50.0]
    assert parse_layers("all") is None
    assert parse_layers("0-2,6") == [0, 1, 2, 6]
    with pytest.raises(ConfigError, match="'huge'"):
        parse_l0s("huge")
    with pytest.raises(ConfigError, match=r"layers \[30\] are out of range: valid layers are 0..17"):
        parse_layers("30", n_layers=18)


def test_suite_runs_every_stage_and_resumes_without_redoing_work(tmp_path: Path) -> None:
    run_dir = tmp_path / "suite"
    stopped = run_suite(run_dir, _tiny_plan(), max_minutes=0.0, say=lambda _: None)
    assert stopped == {"complete": False, "stopped_before": "harvest"}

    out = run_suite(run_dir, _tiny_plan(), say=lambda _: None)
    assert out["complete"]
    assert len(out["saes"]) == 4  # 2 layers x 2 sites x 1 width x 1 target
    sites = set()
    for folder in out["saes"]:
        sae = load_sae(folder)
        sites.add(sae.cfg.site)
        result = json.loads((folder / "eval.json").read_text())
        assert result["eval_result_metrics"]["sparsity"]["l0"] > 0
    assert sites == {"resid_post.1", "mlp_out.1", "resid_post.2", "mlp_out.2"}
    report = run_dir / "report"
    for name in ("heatmap.png", "summary.txt", "evals.json", "frontier_l0_delta_lm_loss.png"):
        assert (report / name).stat().st_size > 0, name
    assert (run_dir / "features.sqlite").exists()

    # A second run finds everything done and touches nothing.
    mtimes = {f: (f / "sae_weights.safetensors").stat().st_mtime_ns for f in out["saes"]}
    said: list[str] = []
    again = run_suite(run_dir, _tiny_plan(), say=said.append)
    assert again["complete"] and said == []
    assert mtimes == {f: (f / "sae_weights.safetensors").stat().st_mtime_ns for f in again["saes"]}


def test_suite_refuses_a_run_folder_of_another_model(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(
        json.dumps({"model": "gemma-3-270m", "corpus": "wiki", "context_len": 128})
    )
    with pytest.raises(StoreError, match="model='gemma-3-270m'"):
        run_suite(run_dir, _tiny_plan(), say=lambda _: None)
    assert json.loads((run_dir / "run.json").read_text())["model"] == "gemma-3-270m"  # nothing overwritten


def test_cli_suite_bad_input_is_one_line_not_a_traceback(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["suite", str(tmp_path / "r"), "--model", "tiny-gemma3", "--l0", "huge"]) == 2
    err = capsys.readouterr().err
    assert "error: unknown L0 target 'huge'" in err and "Traceback" not in err
    assert main(["suite", str(tmp_path / "r"), "--model", "tiny-gemma3", "--sites", "resid_pre"]) == 2
    assert "unknown site kinds ['resid_pre']" in capsys.readouterr().err


@pytest.mark.real
def test_demo_end_to_end_on_the_real_model(tmp_path: Path) -> None:
    """`gemmascope demo --no-serve` with a small budget on Gemma 3 270M, then every artefact checked."""
    run_dir = tmp_path / "demo"
    cmd = [
        sys.executable, "-m", "gemmascope.cli", "demo", "--no-serve", "--run-dir", str(run_dir),
        "--tokens", "6144", "--train-tokens", "12288", "--width", "1024",
        "--eval-tokens", "1536", "--index-tokens", "3072",
    ]  # fmt: skip
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "TQDM_DISABLE": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Three features of resid_post.12" in done.stdout
    targets = done.stdout.split("Quality targets of ")[1].splitlines()[1:5]
    labels = ("ΔLM loss", "dead", "latents over 50% density", "L0 share of latents over 10%")
    assert all(label in line and "(target <= " in line for label, line in zip(labels, targets, strict=True))
    assert all(line.strip().startswith(("met ", "NOT met ")) for line in targets)
    folder = next((run_dir / "saes" / "resid_post" / "layer_12" / "width_1024").iterdir())
    sae = load_sae(folder)
    assert (sae.cfg.model_name, sae.cfg.site, sae.cfg.d_in, sae.cfg.d_sae) == (
        "gemma-3-270m",
        "resid_post.12",
        640,
        1024,
    )
    metrics = json.loads((folder / "eval.json").read_text())["eval_result_metrics"]
    assert 0 < metrics["sparsity"]["l0"] < 1024
    assert 0 <= metrics["gemmascope"]["fvu"] < 1.0
    assert metrics["gemmascope"]["n_tokens"] >= 1024
    from gemmascope.features import FeatureIndex
    from gemmascope.formats import sae_id

    index = FeatureIndex(run_dir / "features.sqlite")
    shown = [f for f in (index.feature(sae_id(folder), i) for i in range(1024)) if f["top_examples"]]
    assert len(shown) > 100
    assert (run_dir / "report" / "heatmap.png").exists()


def test_a_bfloat16_reader_harvests_and_indexes_while_evaluation_stays_float32(tmp_path: Path) -> None:
    from gemmascope.activations import ActivationStore
    from gemmascope.features import FeatureIndex

    plan = _one_sae_plan(kinds=["attn_out"], model_dtype="bfloat16")  # attn_out: its lens reads W_O
    out = run_suite(tmp_path / "run", plan, say=lambda _: None)
    assert out["complete"]
    store = ActivationStore(tmp_path / "run")
    assert [store.manifest(s)["model_dtype"] for s in store.sites] == ["bfloat16"]
    key = out["results"][0]["sae_id"]
    assert FeatureIndex(tmp_path / "run" / "features.sqlite").feature(key, 0)["logit_lens"] is not None
    assert (
        out["results"][0]["eval_result_metrics"]["model_performance_preservation"]["ce_loss_without_sae"] > 0
    )


def test_demo_graphs_train_a_clt_and_draw_its_graphs_which_the_graph_page_lists(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from gemmascope.demo import GRAPH_PROMPTS, GraphPlan, run_demo
    from gemmascope.server.app import create_app

    run_dir = tmp_path / "demo"
    plan = _one_sae_plan(eval_tokens=1200, index_tokens=1024)
    said: list[str] = []
    out = run_demo(
        run_dir, plan, serve=False, say=said.append, graphs=GraphPlan(tokens=2048, width=32, target_l0=4)
    )
    assert [p.name for p in out["graphs"]] == [
        "the-capital-of-france-is.json",
        "which-is-bigger-9-11-or-9-8-answer.json",
    ]
    assert all(p.is_file() for p in out["graphs"])
    assert len(list((run_dir / "clts").glob("**/W_enc_0.safetensors"))) == 1
    with TestClient(create_app(run_dir)) as client:
        listed = client.get("/v1/graph/list").json()
        assert listed["available"] and listed["dictionary"].startswith("cross-layer transcoder")
        assert sorted(g["prompt"] for g in listed["graphs"]) == sorted(GRAPH_PROMPTS)
        slug = out["graphs"][0].stem
        assert client.get(f"/v1/graph/{slug}").json()["metadata"]["prompt"] == GRAPH_PROMPTS[0]
    before = {p: p.stat().st_mtime_ns for p in out["graphs"]}
    again = run_demo(
        run_dir, plan, serve=False, say=said.append, graphs=GraphPlan(tokens=2048, width=32, target_l0=4)
    )
    assert {p: p.stat().st_mtime_ns for p in again["graphs"]} == before  # kept, not drawn again


def test_demo_graphs_out_of_range_are_refused_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "demo"
    for flags, said in (
        (["--graphs", "--graph-width", "0"], "CLT width 0 must be a positive integer"),
        (["--graphs", "--graph-tokens", "10"], "CLT tokens 10 must be at least one batch (1024)"),
        (
            ["--graphs", "--graph-width", "16"],
            "CLT target L0 45.0 must be > 0 and below the width 16 (--graph-width",
        ),
        (["--graph-width", "64"], "--graph-width need --graphs"),  # not silently ignored
    ):
        code = main(["demo", "--no-serve", "--run-dir", str(run_dir), "--model", "tiny-gemma3", *flags])
        err = capsys.readouterr().err
        assert code == 2 and said in err and "Traceback" not in err
        assert not run_dir.exists()


def test_a_bad_corpus_is_refused_before_a_model_loads_or_a_run_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text('{"text": "one short document", "title": "a"}\n')  # one split of it is empty
    for command in (["demo", "--no-serve"], ["suite", "--layers", "1"]):
        for corpus, said in (
            (str(tmp_path / "missing.jsonl"), "not found"),
            (f"wiki+{tmp_path / 'missing.jsonl'}", "in corpus 'wiki+"),
            (str(tiny), "split of corpus"),
        ):
            run_dir = tmp_path / "run"
            argv = [command[0], *(["--run-dir", str(run_dir)] if command[0] == "demo" else [str(run_dir)])]
            code = main([*argv, *command[1:], "--model", "no-such-model", "--corpus", corpus])
            err = capsys.readouterr().err
            assert code == 2 and said in err and "Traceback" not in err, err
            assert not run_dir.exists()


def _one_sae_plan(**kw: object) -> SuitePlan:
    return _tiny_plan(**{"kinds": ["resid_post"], "layers": [1], "widths": [32], "tokens": 2048, **kw})


def test_a_rerun_with_another_plan_is_refused_or_extends_with_extend(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = run_suite(run_dir, _one_sae_plan(), say=lambda _: None)
    assert first["complete"] and len(first["saes"]) == 1
    run_json = (run_dir / "run.json").read_bytes()
    weights = (first["saes"][0] / "sae_weights.safetensors").read_bytes()

    other = _one_sae_plan(widths=[64], target_l0s=[12.0])
    with pytest.raises(
        StoreError, match=r"holds another plan: widths \[32\] \(recorded\) vs \[64\] \(asked\)"
    ):
        run_suite(run_dir, other, say=lambda _: None)
    assert (run_dir / "run.json").read_bytes() == run_json  # no lie written
    with pytest.raises(StoreError, match="cannot change tokens"):
        run_suite(run_dir, _one_sae_plan(widths=[64], tokens=4096), extend=True, say=lambda _: None)

    said: list[str] = []
    out = run_suite(run_dir, other, extend=True, say=said.append)
    assert out["complete"] and said == ["== train/layer_1", "== eval/layer_1", "== index", "== report"]
    assert sorted(load_sae(f).cfg.d_sae for f in out["saes"]) == [32, 32, 64, 64]  # 2 widths x 2 L0s
    assert (first["saes"][0] / "sae_weights.safetensors").read_bytes() == weights  # kept, not retrained
    recorded = json.loads((run_dir / "run.json").read_text())
    assert recorded["widths"] == [32, 64] and recorded["target_l0s"] == [8.0, 12.0]
    again: list[str] = []
    recorded.pop("gemmascope_version")
    assert run_suite(run_dir, SuitePlan(**recorded), say=again.append)["complete"]
    assert again == []


def test_suite_bad_dtype_is_refused_before_run_json_and_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from gemmascope.suite import run as suite_run

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model must not load for a bad --dtype")

    monkeypatch.setattr(suite_run, "load_model", no_model)
    assert main(["suite", str(tmp_path / "r"), "--model", "tiny-gemma3", "--dtype", "int8"]) == 2
    assert "unknown dtype 'int8'" in capsys.readouterr().err
    assert not (tmp_path / "r" / "run.json").exists()


@pytest.mark.parametrize("name, text", [("run.json", "{oops"), ("suite.json", "[1, 2]"), ("run.json", "3")])
def test_a_damaged_run_or_suite_json_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str
) -> None:
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / name).write_text(text)
    assert main(["suite", str(run_dir), "--model", "tiny-gemma3", "--layers", "1", "--widths", "32"]) == 2
    err = capsys.readouterr().err
    assert name in err and "damaged" in err and err.count("\n") == 1 and "Traceback" not in err
    assert (run_dir / name).read_text() == text


def test_a_suite_with_a_finetune_evaluates_and_indexes_the_finetuned_saes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    said: list[str] = []
    out = run_suite(run_dir, _one_sae_plan(finetune_tokens=256), say=said.append)
    [folder] = out["saes"]
    assert folder.name.endswith("_finetuned") and (folder / "eval.json").exists()
    assert (folder.parent / folder.name.removesuffix("_finetuned")).is_dir()  # the trained one stays
    assert load_sae(folder).cfg.extra["finetune"]["tokens"] >= 256
    assert any(line.startswith("fine-tuned ") for line in said)
    again = run_suite(run_dir, _one_sae_plan(finetune_tokens=256), say=lambda _: None)
    assert again["saes"] == [folder]
    with pytest.raises(ConfigError, match="finetune_tokens -1"):
        _one_sae_plan(finetune_tokens=-1).check()


def test_a_transcoder_suite_trains_every_layer_from_one_harvest_and_reports_the_replacement_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "tc"
    code = main(
        ["suite", str(run_dir), "--model", "tiny-gemma3", "--transcoders", "--layers", "all", "--widths", "64",
         "--l0", "8", "--tokens", "4096", "--eval-tokens", "1200", "--index-tokens", "2048"]
    )  # fmt: skip
    assert code == 0
    plan = json.loads((run_dir / "run.json").read_text())
    assert plan["kinds"] == [] and plan["transcoders"] == ["skip"]
    harvested = sorted(p.parent.name + "/" + p.name for p in (run_dir / "activations").glob("*/layer_*"))
    assert harvested == [f"{k}/layer_{i}" for k in ("mlp_in", "mlp_out") for i in range(4)]
    saes = [load_sae(p.parent) for p in sorted((run_dir / "saes").glob("**/cfg.json"))]
    assert [(s.cfg.site, s.cfg.out_site, s.cfg.affine_skip) for s in saes] == [
        (f"mlp_in.{i}", f"mlp_out.{i}", True) for i in range(4)
    ]
    replacement = json.loads((run_dir / "report" / "replacement.json").read_text())
    assert replacement["layers"] == [0, 1, 2, 3] and replacement["delta_lm_loss"] == pytest.approx(
        replacement["ce_loss_with"] - replacement["ce_loss_without"]
    )
    summary = (run_dir / "report" / "summary.txt").read_text()
    assert "replacement model" in summary and "skip_transcoder" in summary
    assert "replacement model (4 transcoders)" in capsys.readouterr().out


ONE_SAE = ["--model", "tiny-gemma3", "--sites", "resid_post", "--layers", "1", "--widths", "32", "--l0", "8",
           "--tokens", "2048", "--eval-tokens", "1200", "--index-tokens", "2048"]  # fmt: skip


def _recorded(run_dir: Path, **kw: object) -> bytes:
    """A run folder whose run.json records `_one_sae_plan(**kw)` (as `suite` would have), nothing else."""
    from dataclasses import asdict

    run_dir.mkdir()
    plan = {**asdict(_one_sae_plan(**{"fast": True, "batch_size": None, **kw})), "gemmascope_version": "x"}
    (run_dir / "run.json").write_text(json.dumps(plan))
    return (run_dir / "run.json").read_bytes()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--l0", "nan"], "L0 target 'nan' must be a positive number"),
        (["--l0", "inf"], "L0 target 'inf' must be a positive number"),
        (["--l0-coeffs", "nan"], "item 'nan' is not valid"),
        (["--eval-tokens", "512"], "eval_tokens 512 must be at least 1024"),
        (["--extend", "--l0", "nan"], "L0 target 'nan' must be a positive number"),
        (["--extend", "--layers", "99"], "layer 99 is out of range: valid layers are 0..3"),
        (["--extend", "--eval-tokens", "512"], "eval_tokens 512 must be at least 1024"),
    ],
)
def test_a_refused_plan_is_never_recorded_and_nothing_runs(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    """The whole plan is checked (finite, in range, enough evaluation tokens, layers of the model,
    the asked layers too where --extend merges them into a recorded 'all') before anything is
    written or run, so a refused plan never becomes the folder's plan."""
    from gemmascope.suite import run as suite_run

    def no_stages(*args: object, **kwargs: object) -> None:
        raise AssertionError("a refused plan must not run")

    monkeypatch.setattr(suite_run, "_run_stages", no_stages)
    run_dir = tmp_path / "r"
    before = _recorded(run_dir, layers=None) if "--extend" in argv else None
    assert main(["suite", str(run_dir), *ONE_SAE, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    if before is None:
        assert not (run_dir / "run.json").exists()
    else:
        assert (run_dir / "run.json").read_bytes() == before


def test_a_recorded_plan_no_plan_can_have_is_named_as_damaged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run.json an older version wrote with NaN in it (never equal to itself, so every command
    was 'another plan') is named as damaged, with the way out."""
    run_dir = tmp_path / "r"
    before = _recorded(run_dir, target_l0s=[float("nan")])
    assert main(["suite", str(run_dir), *ONE_SAE]) == 2
    err = capsys.readouterr().err
    assert "run.json" in err and "is damaged" in err and "target_l0s [nan]" in err and "delete it" in err
    assert (run_dir / "run.json").read_bytes() == before
    with pytest.raises(ConfigError, match="target_l0s"):
        _one_sae_plan(target_l0s=[float("inf")]).check()
    with pytest.raises(ConfigError, match="widths"):
        _one_sae_plan(widths=["32"]).check()  # type: ignore[list-item]


@pytest.mark.parametrize(
    "done",
    [
        {"harvest": {"key": {"tokens": 2048, "dtype": "float32"}, "value": 5}},
        {"train/layer_1": {"key": None, "value": {"specs": {"a": 3}}}},
    ],
)
def test_a_suite_json_value_of_the_wrong_type_is_named_as_damaged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], done: dict[str, object]
) -> None:
    run_dir = tmp_path / "r"
    _recorded(run_dir)
    (run_dir / "suite.json").write_text(json.dumps({"done": done}))
    assert main(["suite", str(run_dir), *ONE_SAE]) == 2
    err = capsys.readouterr().err
    assert "suite.json" in err and "is damaged" in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_topk_suite_takes_its_target_l0_as_k_through_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`suite --arch topk` (and batchtopk) builds its specs through the architecture: the target L0
    is k; an architecture that takes no target L0 (relu) is refused before anything is written."""
    run_dir = tmp_path / "run"
    argv = ["suite", str(run_dir), "--model", "tiny-gemma3", "--sites", "resid_post", "--layers", "1"]
    argv += [
        "--widths",
        "32",
        "--l0",
        "6",
        "--tokens",
        "2048",
        "--eval-tokens",
        "1200",
        "--index-tokens",
        "1024",
    ]
    assert main([*argv, "--arch", "topk"]) == 0
    [folder] = [p for p in (run_dir / "saes").glob("**/l0_*") if p.is_dir()]
    sae = load_sae(folder)
    assert folder.name.endswith("_topk") and sae.cfg.architecture == "topk" and sae.cfg.k == 6
    assert json.loads((run_dir / "run.json").read_text())["architecture"] == "topk"
    capsys.readouterr()
    assert main(["suite", str(tmp_path / "relu"), "--model", "tiny-gemma3", "--arch", "relu"]) == 2
    assert "relu SAE takes no target L0" in capsys.readouterr().err
    assert not (tmp_path / "relu").exists()
