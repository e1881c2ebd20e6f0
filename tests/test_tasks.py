"""Every stage on every task kind: a user's 3-class CSV, a pair task in JSON Lines, and E2E generation, each
trained, compiled and evaluated end to end on tiny random models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compile import compile_prefix
from evaluate import evaluate
from tests.conftest import compose_cfg, train_tiny
from tests.helpers.data import mood_csv

FAST_LATENCY = ["latency.repeats=1", "latency.batches=[1]", "latency.decode_tokens=2", "latency.min_run_time=0.01",
                "latency.prompt_len=8"]
def _prefix_compiled(root: Path, data: list[str], model: str, steps: int, calib_size: int, eval_size: int) -> Path:
    """A random-init prefix (m=4) trained as job 0 of `root`, then compiled with the default method."""
    train_tiny(root, "0", *data, f"model={model}", "adapter.init=random", "adapter.m=4", "adapter.lr=0.05",
         f"trainer.max_steps={steps}")
    compile_prefix(compose_cfg("compile", [f"ckpt={root / '0'}", "~logger", f"calib_size={calib_size}",
                                           f"eval_size={eval_size}"]))
    return root


@pytest.fixture(scope="module")
def csv_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("csv")
    data = ["data=csv", f"data.train_file={mood_csv(root / 'train.csv', 96)}",
            f"data.validation_file={mood_csv(root / 'val.csv', 30, offset=1)}", "data.prompt='Review: {text}\nMood:'",
            "data.classes=[neg,neu,pos]", "data.verbalizers=[' negative',' neutral',' very positive']",
            "data.val_limit=null", "data.train_limit=null"]
    train_tiny(root, "1", *data, "adapter=lora", "adapter.lr=0.05", "trainer.max_steps=8")
    return _prefix_compiled(root, data, "gpt2_tiny", steps=8, calib_size=64, eval_size=16)


def test_users_csv_trains_compiles_and_evaluates_three_classes(csv_sweep):
    metrics = json.loads((csv_sweep / "0" / "metrics.json").read_text())
    assert metrics["task"] == "classification" and metrics["main_metric"] == "val_acc" and metrics["val_size"] == 30
    out = evaluate(compose_cfg("evaluate", [f"ckpt={csv_sweep}", "~logger", *FAST_LATENCY]))
    evals = {Path(k).name: v for k, v in out["runs"].items()}
    assert set(evals) == {"0", "1", "compiled-r64"}
    for ev in evals.values():
        assert ev["classes"] == ["neg", "neu", "pos"] and len(ev["per_class_acc"]) == 3 and ev["val_size"] == 30
        confusion = ev["confusion"]
        assert len(confusion) == 3 and sum(map(sum, confusion)) == 30
        assert ev["val_acc"] == pytest.approx(sum(confusion[i][i] for i in range(3)) / 30)
        assert 0 <= ev["macro_f1"] <= 1
    assert 0 <= evals["compiled-r64"]["class_agreement"] <= 1
    assert evals["0"]["val_acc"] == pytest.approx(metrics["val_acc"], abs=1e-6)  # training and evaluate agree
    report = csv_sweep / "report" / "results.csv"
    assert report.is_file() and "metric" in report.read_text().splitlines()[0]


def _pairs(path: Path, n: int, offset: int = 0) -> Path:
    """An NLI-style JSON Lines file: two text columns, the label says whether the second repeats the first."""
    words = "red green blue black white grey".split()
    with path.open("w") as f:
        for i in range(n):
            a, b = words[i % 6], words[(i + 1 + offset) % 6]
            same = (i + offset) % 2 == 0
            f.write(json.dumps({"premise": f"the car is {a}", "hypothesis": f"it is {a if same else b}",
                                "label": "yes" if same else "no"}) + "\n")
    return path


@pytest.fixture(scope="module")
def pair_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    data = ["data=csv", f"data.train_file={_pairs(root / 'train.jsonl', 64)}",
            f"data.validation_file={_pairs(root / 'val.jsonl', 20, offset=1)}",
            "data.prompt='{premise}\nQuestion: {hypothesis}?\nAnswer:'", "data.classes=[yes,no]",
            "data.verbalizers=[' yes',' no']", "data.val_limit=null", "data.train_limit=null"]
    return _prefix_compiled(root, data, "llama_tiny", steps=6, calib_size=48, eval_size=16)


def test_pair_task_trains_compiles_and_evaluates_on_both_columns(pair_sweep):
    metrics = json.loads((pair_sweep / "0" / "metrics.json").read_text())
    assert metrics["task"] == "classification" and metrics["val_size"] == 20
    record = json.loads((pair_sweep / "0" / "compiled-r64" / "compile.json").read_text())
    assert record["task"] == "classification" and record["calibration"]["examples"] == 48
    out = evaluate(compose_cfg("evaluate", [f"ckpt={pair_sweep}", "~logger", "latency.enabled=false"]))
    evals = {Path(k).name: v for k, v in out["runs"].items()}
    assert set(evals) == {"0", "compiled-r64"}
    for ev in evals.values():
        assert ev["classes"] == ["yes", "no"] and sum(map(sum, ev["confusion"])) == 20
    assert evals["0"]["val_acc"] == pytest.approx(metrics["val_acc"], abs=1e-6)
    assert 0 <= evals["compiled-r64"]["class_agreement"] <= 1


@pytest.fixture(scope="module")
def e2e_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    data = ["data=e2e", "data.train_limit=64", "data.val_limit=6", "data.max_new_tokens=5", "data.batch_size=8"]
    return _prefix_compiled(root, data, "llama_tiny", steps=6, calib_size=32, eval_size=6)


def test_generation_trains_on_targets_compiles_and_scores_bleu(e2e_sweep):
    metrics = json.loads((e2e_sweep / "0" / "metrics.json").read_text())
    assert metrics["task"] == "generation" and metrics["main_metric"] == "val_token_acc" and metrics["val_size"] == 6
    record = json.loads((e2e_sweep / "0" / "compiled-r64" / "compile.json").read_text())
    assert record["task"] == "generation" and len(record["residuals"]["last"]) == 2
    out = evaluate(compose_cfg("evaluate", [f"ckpt={e2e_sweep}", "~logger", "latency.enabled=false"]))
    evals = {Path(k).name: v for k, v in out["runs"].items()}
    dirs = {"0": e2e_sweep / "0", "compiled-r64": e2e_sweep / "0" / "compiled-r64"}
    for name, run_dir in dirs.items():
        ev = evals[name]
        assert ev["task"] == "generation" and ev["main_metric"] == "bleu" and 0 <= ev["bleu"] <= 100
        lines = [json.loads(x) for x in (run_dir / "outputs.jsonl").read_text().splitlines()]
        assert len(lines) == 6 and all(set(x) >= {"input", "output", "references"} for x in lines)
        assert all(x["input"].startswith("Table: name[") and len(x["references"]) >= 1 for x in lines)
    compiled = evals["compiled-r64"]
    for key in ("identical_outputs", "token_agreement"):
        assert 0 <= compiled[key] <= 1
    lines = [json.loads(x) for x in (dirs["compiled-r64"] / "outputs.jsonl").read_text().splitlines()]
    same = sum(x["output"] == x["source_output"] for x in lines) / len(lines)
    assert compiled["identical_outputs"] == pytest.approx(same) and compiled["class_agreement"] is None
    prefix_lines = [json.loads(x) for x in (dirs["0"] / "outputs.jsonl").read_text().splitlines()]
    assert [x["source_output"] for x in lines] == [x["output"] for x in prefix_lines]  # read back, not re-decoded
    # On the source's own outputs, and the share of its BLEU gain kept: the source's BLEU is the prefix run's own.
    assert compiled["source_bleu"] == pytest.approx(evals["0"]["bleu"])
    assert 0 <= compiled["own_token_agreement"] <= 1 and compiled["own_token_kl"] >= 0
    gain = evals["0"]["bleu"] - compiled["base_bleu"]
    if abs(gain) > 1e-9:
        assert compiled["gain_recovered"] == pytest.approx((compiled["bleu"] - compiled["base_bleu"]) / gain)
    assert "on source outputs %" in (e2e_sweep / "report" / "results.md").read_text()
    assert (e2e_sweep / "report" / "metric_vs_latency.png").is_file()
