"""evaluate.py on a gpt2_tiny sweep (prefix, LoRA, compiled): eval.json, the report, broken runs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import matplotlib.image as mpimg
import pytest
from omegaconf import open_dict

from analyze import analyze
from compile import compile_prefix
from evaluate import evaluate
from feta.tracking import finish_wandb
from tests.conftest import compose_cfg, tiny_train_cfg
from tests.helpers.runs import eval_cfg
from train import train


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    for job, overrides in enumerate([("adapter.init=random", "adapter.m=8"), ("adapter=lora",)]):
        cfg = tiny_train_cfg(root, *overrides)
        with open_dict(cfg):
            cfg.output_dir = str(root / str(job))
        train(cfg)
    compile_prefix(compose_cfg("compile", [f"ckpt={root / '0'}", "rank=4", "~logger", "calib_size=64", "eval_size=32"]))
    return root


def test_sweep_eval_and_report(sweep):
    out = evaluate(eval_cfg(sweep))
    evals = {p.parent.name: json.loads(p.read_text()) for p in sweep.rglob("eval.json")}
    assert set(evals) == {"0", "1", "compiled-r4"}
    for ev in evals.values():
        assert ev["val_size"] == 64 and 0 <= ev["val_acc"] <= 1
        assert sum(map(sum, ev["confusion"])) == 64 and len(ev["predictions"]) == 64
        assert ev["val_acc"] == pytest.approx(sum(ev["confusion"][i][i] for i in (0, 1)) / 64)
        rows = ev["latency"]["rows"]
        assert {(r["phase"], r["batch"]) for r in rows} == {("prefill", 1), ("prefill", 2), ("decode", 1)}
        assert all(r["us_per_token"] > 0 and math.isfinite(r["ratio_to_base"]) for r in rows)
        assert ev["latency"]["device"] == "cpu" and ev["latency"]["threads"] >= 1
    for job in ("0", "1"):  # what training counted, not the frozen reloaded adapter's zero
        assert evals[job]["trainable_params"] == json.loads((sweep / job / "metrics.json").read_text())["trainable_params"] > 0
    assert {r["name"] for r in evals["1"]["latency"]["rows"]} == {"base", "adapter", "merged"}
    assert {r["name"] for r in evals["0"]["latency"]["rows"]} == {"base", "adapter"}
    comp = evals["compiled-r4"]
    assert comp["kind"] == "compiled" and comp["r"] == 4 and comp["m"] == 8
    assert 0 <= comp["class_agreement"] <= 1 and len(comp["residuals"]["last"]) == 2
    # Agreement is computed from the two prediction lists.
    agree = sum(a == b for a, b in zip(comp["predictions"], evals["0"]["predictions"])) / 64
    assert comp["class_agreement"] == pytest.approx(agree)

    report = sweep / "report"
    table = (report / "results.csv").read_text().splitlines()
    assert len(table) == 1 + 3
    for name in ("metric_vs_latency.png", "metric_summary.png", "equiv_heatmap.png"):
        img = mpimg.imread(report / name)
        assert (report / name).stat().st_size > 10_000 and img.shape[0] > 200 and img.std() > 0.01
    assert out["skipped"] == []


def test_unfinished_run_is_skipped_with_a_warning(sweep, tmp_path):
    broken = sweep / "2"
    broken.mkdir(exist_ok=True)
    (broken / "config.yaml").write_text((sweep / "0" / "config.yaml").read_text())
    try:
        with pytest.warns(UserWarning, match=r"skipped unfinished or broken runs:[\s\S]*2: training did not finish"):
            out = evaluate(eval_cfg(sweep, "latency.enabled=false"))
        assert len(out["skipped"]) == 1
    finally:
        shutil.rmtree(broken)


def test_single_unfinished_run_is_an_error(tmp_path):
    cfg = tiny_train_cfg(tmp_path)
    run = Path(cfg.output_dir)
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\nadapter: {kind: prefix}\ndata: {}\n")
    with pytest.raises(ValueError, match=r"training did not finish"):
        evaluate(eval_cfg(run))


def test_empty_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=rf"ckpt={tmp_path}: holds no runs"):
        evaluate(eval_cfg(tmp_path))


def test_equivalence_analysis_command_writes_json_and_figures(sweep):
    out = analyze(compose_cfg("analyze", [f"ckpt={sweep / '0'}", "~logger", "analysis=equivalence",
                                          f"analysis.lora={sweep / '1'}", "analysis.sentences=4", "analysis.layers=[0]"]))
    analysis = sweep / "0" / "analysis"
    saved = json.loads((analysis / "equivalence.json").read_text())
    assert saved["verdicts"] == out["verdicts"] and [g["layer"] for g in saved["gating"]["per_layer"]] == [0]
    # float64, through the real attention module, with the prefix's λ strictly inside (0, 1)
    assert saved["gating"]["max_abs_err"] < 1e-10 and 0 < saved["gating"]["lam_min"] < saved["gating"]["lam_max"] < 1
    for name in ("linearity.png", "span_grid.png", "prefix_spectrum.png"):
        assert (analysis / name).stat().st_size > 10_000


def test_equivalence_analysis_refuses_a_lora_run(sweep):
    with pytest.raises(ValueError, match=r"ckpt=.*: is a lora run; analysis=equivalence takes a prefix run"):
        analyze(compose_cfg("analyze", [f"ckpt={sweep / '1'}", "~logger", "analysis=equivalence"]))


def test_offline_wandb_runs_keep_the_lineage(sweep, tmp_path, monkeypatch):
    """W&B refuses `use_artifact` offline; compile and evaluate still finish, and their runs' configs name
    the adapter they read, by name and content digest."""
    wandb = pytest.importorskip("wandb")
    from wandb.sdk.wandb_config import Config  # only once importorskip found wandb

    lineage = []  # an offline run's config lives in its binary log; record what reaches it instead
    update = Config.update
    monkeypatch.setattr(Config, "update", lambda self, d, *a, **k: (
        lineage.append(dict(d)) if "input_artifact" in d else None, update(self, d, *a, **k))[1])
    run = tmp_path / "0"  # unevaluated: evaluate.py skips a run that has its eval.json
    shutil.copytree(sweep / "0", run, ignore=shutil.ignore_patterns("eval.json", "outputs.jsonl", "wandb"))
    metrics = json.loads((run / "metrics.json").read_text())
    expected = wandb.Artifact(metrics["artifact"], type="adapter")
    expected.add_dir(str(run / "adapter"))
    out = tmp_path / "compiled"
    compile_prefix(compose_cfg("compile", [f"ckpt={run}", "rank=2", f"out_dir={out}", "logger=wandb",
                                           "logger.mode=offline", "calib_size=64", "eval_size=32"]))
    finish_wandb()
    evaluate(compose_cfg("evaluate", [f"ckpt={run}", "logger=wandb", "logger.mode=offline", "latency.enabled=false"]))
    assert (out / "compile.json").is_file() and list((out / "wandb").glob("offline-run-*"))
    compiled = wandb.Artifact(f"{metrics['artifact']}-compiled-r4", type="adapter")
    compiled.add_dir(str(run / "compiled-r4" / "adapter"))
    assert lineage == [{"input_artifact": metrics["artifact"], "input_digest": expected.digest},  # compile
                       {"input_artifact": metrics["artifact"], "input_digest": expected.digest},  # evaluate: prefix
                       {"input_artifact": compiled.name, "input_digest": compiled.digest}]  # and its compiled-r4
    assert expected.digest != compiled.digest
