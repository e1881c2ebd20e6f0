"""feta.report on synthetic sweeps (classification and generation): eval.json files written here, no model."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from feta.errors import UserError
from feta.report import build_report, collect, log_to_wandb, reference, write_report
from feta.report.plots import metric_summary_figure, metric_vs_latency_figure

N_LAYERS = 12


def latency(adapter_us: float, merged_us: float | None = None) -> dict:
    rows = [
        {"name": "base", "phase": "prefill", "batch": 1, "us_per_token": 1500.0, "iqr_us": 20.0, "ratio_to_base": 1.0},
        {"name": "adapter", "phase": "prefill", "batch": 1, "us_per_token": adapter_us, "iqr_us": 20.0,
         "ratio_to_base": adapter_us / 1500.0},
        {"name": "adapter", "phase": "prefill", "batch": 8, "us_per_token": 999.0, "iqr_us": 5.0, "ratio_to_base": 0.5},
        {"name": "base", "phase": "decode", "batch": 1, "us_per_token": 28000.0, "iqr_us": 300.0, "ratio_to_base": 1.0},
        {"name": "adapter", "phase": "decode", "batch": 1, "us_per_token": 29680.0, "iqr_us": 300.0,
         "ratio_to_base": 1.06},
    ]
    if merged_us is not None:
        rows += [
            {"name": "merged", "phase": "prefill", "batch": 1, "us_per_token": merged_us, "iqr_us": 20.0,
             "ratio_to_base": merged_us / 1500.0, "ratio_iqr": 0.03},
            {"name": "merged", "phase": "decode", "batch": 1, "us_per_token": 28000.0, "iqr_us": 300.0,
             "ratio_to_base": 1.0},
        ]
    return {"device": "cpu", "dtype": "float32", "threads": 2, "rows": rows}


def evaluation(run: Path, kind: str, name: str, val_acc: float, model: str = "gpt2", m=None, r=None, **extra) -> dict:
    ev = {"run": str(run), "kind": kind, "name": name, "model": model, "m": m, "r": r, "trainable_params": 1234,
          "val_acc": val_acc, "macro_f1": round(val_acc - 0.006, 4), "val_size": 872,
          "per_class_acc": [val_acc - 0.01, val_acc + 0.01],
          "confusion": [[400, 28], [80, 364]], "class_agreement": None, "latency": None, "residuals": None}
    return ev | extra


def train_run(path: Path, ev: dict | None, raw: str | None = None, finished: bool = True) -> Path:
    """A training run dir as train.py + evaluate.py leave it, with Hydra's and W&B's own config.yaml decoys."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("model: {name: gpt2}\nadapter: {kind: prefix}\ndata: {name: sst2}\n")
    (path / ".hydra").mkdir()
    (path / ".hydra" / "config.yaml").write_text("model: {}\n")
    (path / "wandb" / "offline-run-1" / "files").mkdir(parents=True)
    (path / "wandb" / "offline-run-1" / "files" / "config.yaml").write_text("x: 1\n")
    if finished:
        (path / "metrics.json").write_text(json.dumps({"val_acc": 0.8, "global_step": 10, "trainable_params": 1234}))
    if raw is not None:
        (path / "eval.json").write_text(raw)
    elif ev is not None:
        (path / "eval.json").write_text(json.dumps(ev))
    return path


def residual_curve(start: float, end: float) -> list[float]:
    return np.linspace(start, end, N_LAYERS).round(3).tolist()


def make_sweep(root: Path) -> Path:
    """A prefix, a LoRA, a compiled run with residuals, and four unfinished or broken runs."""
    prefix = root / "0"
    train_run(prefix, evaluation(prefix, "prefix", "prefix-m16", 0.761, m=16, latency=latency(1560.0)))
    lora = root / "1"
    train_run(lora, evaluation(lora, "lora", "lora-r4", 0.876, r=4, latency=latency(2100.0, merged_us=1510.0)))
    compiled = prefix / "compiled-r4"
    compiled.mkdir()
    (compiled / "compile.json").write_text("{}")
    residuals = {"last": residual_curve(0.2, 0.9), "content": residual_curve(0.1, 0.5),
                 "all": residual_curve(0.05, 0.2)}
    (compiled / "eval.json").write_text(json.dumps(evaluation(
        compiled, "compiled", "compiled-m16-r4", 0.742, m=16, r=4, class_agreement=0.958,
        latency=latency(1700.0, merged_us=1505.0), residuals=residuals)))
    train_run(root / "2", None)  # trained, never evaluated
    train_run(root / "3", None, raw='{"kind": "lora", "val_acc": 0.9')  # evaluate.py died mid-write
    train_run(root / "4", evaluation(root / "4", "lora", "lora-r2", 0.9, r=2), finished=False)
    train_run(root / "5", {"kind": "lora", "name": "lora-r1"})  # no val_acc / model
    return root


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    return make_sweep(tmp_path / "multirun" / "2025-01-01" / "12-00-00")


def check_png(path: Path, min_bytes: int = 10_000) -> np.ndarray:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > min_bytes, (path, path.stat().st_size)
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300, img.shape
    assert img[..., :3].std() > 0.02, "image is one flat colour"
    assert len(np.unique(img[..., :3].reshape(-1, 3), axis=0)) > 20
    return img


def md_table(md: str, model: str) -> pd.DataFrame:
    """The pipe table under `## <model>` in results.md, as strings indexed by run name."""
    lines = md.split(f"## {model}\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    assert set(lines[1]) <= set("|-: "), lines[1]  # the header rule
    return pd.DataFrame(cells[2:], columns=cells[0]).set_index("run")


def test_collect_rows_and_skipped(sweep: Path) -> None:
    with pytest.warns(UserWarning, match="4 run\\(s\\) under .* skipped") as rec:
        df, skipped = collect(sweep)
    assert not any("mixes base models" in str(w.message) for w in rec)
    assert sorted(df["name"]) == ["compiled-m16-r4", "lora-r4", "prefix-m16"]
    assert list(df["kind"]) == ["prefix", "lora", "compiled"]  # sorted by kind within the model
    assert set(df["task"]) == {"classification"} and set(df["metric_name"]) == {"accuracy"}
    assert df["metric"].tolist() == pytest.approx([76.1, 87.6, 74.2])  # val_acc in %, eval.json has no main_metric
    assert df["metric"].tolist() == df["val_acc"].tolist() and df["bleu"].isna().all()
    row = df.set_index("name")
    assert row.loc["lora-r4", "val_acc"] == pytest.approx(87.6)
    assert row.loc["lora-r4", "macro_f1"] == pytest.approx(87.0)
    assert row.loc["lora-r4", "latency_us"] == pytest.approx(1510.0)  # merged row, not adapter (2100)
    assert row.loc["lora-r4", "latency_ratio"] == pytest.approx(1510.0 / 1500.0)
    assert row.loc["lora-r4", "latency_form"] == "merged"
    assert row.loc["lora-r4", "latency_ratio_iqr"] == pytest.approx(0.03)
    assert pd.isna(row.loc["prefix-m16", "latency_ratio_iqr"])
    assert row.loc["lora-r4", "decode_ratio"] == pytest.approx(1.0)
    assert row.loc["prefix-m16", "latency_us"] == pytest.approx(1560.0)  # adapter form, batch 1 (not 999 at batch 8)
    assert row.loc["prefix-m16", "latency_form"] == "adapter"
    assert row.loc["prefix-m16", "decode_us"] == pytest.approx(29680.0)
    assert row.loc["prefix-m16", "decode_ms"] == pytest.approx(29.68)
    assert row.loc["prefix-m16", "m"] == 16 and pd.isna(row.loc["prefix-m16", "r"])
    assert row.loc["compiled-m16-r4", "class_agreement"] == pytest.approx(95.8)
    assert pd.isna(row.loc["lora-r4", "class_agreement"])
    assert row.loc["compiled-m16-r4", "residual_last_mean"] == pytest.approx(0.55, abs=1e-3)
    assert row.loc["compiled-m16-r4", "residual_last_max"] == pytest.approx(0.9)
    assert row.loc["compiled-m16-r4", "residual_content_mean"] == pytest.approx(0.3, abs=1e-3)
    assert pd.isna(row.loc["lora-r4", "residual_last_mean"])
    # Reference figures (GPT-2 on CUDA) where the setting matches; compiled m=16 has none (reference is m=32).
    assert row.loc["prefix-m16", "ref_metric"] == pytest.approx(76.1)
    assert row.loc["prefix-m16", "ref_latency_us"] == pytest.approx(44.1)
    assert row.loc["lora-r4", "ref_metric"] == pytest.approx(91.7)
    assert row.loc["lora-r4", "ref_latency_us"] == pytest.approx(76.6)
    assert "CUDA" in row.loc["lora-r4", "ref_note"]
    assert pd.isna(row.loc["compiled-m16-r4", "ref_metric"])
    assert row.loc["compiled-m16-r4", "run"] == "0/compiled-r4"
    residuals = df.attrs["residuals"]
    assert list(residuals) == ["0/compiled-r4"] and len(residuals["0/compiled-r4"]["last"]) == N_LAYERS

    reasons = dict(s.split(": ", 1) for s in skipped)
    assert sorted(reasons) == ["2", "3", "4", "5"]  # no .hydra/ or wandb/ decoys, no valid run
    assert "no eval.json" in reasons["2"]
    assert "not valid JSON" in reasons["3"]
    assert "metrics.json" in reasons["4"]
    assert "model" in reasons["5"] and "val_acc" in reasons["5"]


def test_build_report_files(sweep: Path) -> None:
    with pytest.warns(UserWarning, match="skipped"):
        report = build_report(sweep)
    out = sweep / "report"
    files = report["files"]
    assert set(files) == {"csv", "md", "metric_vs_latency", "metric_summary", "equiv_heatmap"}
    assert all(p.parent == out for p in files.values())
    csv = pd.read_csv(files["csv"])
    assert len(csv) == 3
    assert csv.set_index("name").loc["lora-r4", "val_acc"] == pytest.approx(87.6)
    md = files["md"].read_text()
    table = md_table(md, "gpt2")
    assert table.loc["lora-r4", ["accuracy %", "latency µs/token", "ratio to base", "decode µs/token",
                                 "decode ratio"]].tolist() == ["87.6", "1510", "1.01× ±0.03", "28000", "1.00×"]
    assert table.loc["prefix-m16", ["accuracy %", "latency µs/token", "ref accuracy %", "ref latency µs/token"]
                     ].tolist() == ["76.1", "1560", "76.1", "44.1"]
    assert table.loc["compiled-m16-r4", "class agreement %"] == "95.8" and table.loc["lora-r4", "class agreement %"] == "—"
    assert table.loc["lora-r4", "trainable params"] == "1,234"
    assert "cpu, float32, 2 threads" in md
    assert "mixes" not in md
    for bad in ("- 2: ", "- 3: ", "- 4: ", "- 5: "):
        assert bad in md
    for key in ("metric_vs_latency", "metric_summary", "equiv_heatmap"):
        check_png(files[key])
    # Re-running over a sweep that already holds report/ gives the same table.
    with pytest.warns(UserWarning, match="4 run"):
        assert len(build_report(sweep)["table"]) == 3


def test_mixed_models_and_unknown_kind(tmp_path: Path) -> None:
    runs = [("gpt2", "prefix", "prefix-m8", 0.667), ("smollm2", "lora", "lora-r4", 0.877),
            ("smollm2", "base", "base", 0.786), ("smollm2", "ia3", "ia3", 0.85)]
    for i, (model, kind, name, acc) in enumerate(runs):
        train_run(tmp_path / str(i), evaluation(tmp_path / str(i), kind, name, acc, model=model,
                                                m=8 if kind == "prefix" else None, r=4 if kind == "lora" else None))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        report = build_report(tmp_path, tmp_path / "out")
    assert any("mixes base models (gpt2, smollm2)" in str(w.message) for w in rec)
    df = report["table"]
    assert list(df["model"]) == ["gpt2", "smollm2", "smollm2", "smollm2"]  # grouped by model, base first
    assert list(df["kind"]) == ["prefix", "base", "lora", "ia3"]
    assert df.loc[0, "ref_metric"] == pytest.approx(66.7)
    assert pd.isna(df.loc[2, "ref_metric"])  # smollm2 LoRA r=4: the reference is GPT-2 only
    assert df["latency_us"].isna().all()
    md = report["files"]["md"].read_text()
    assert "mixes base models (gpt2, smollm2)" in md
    assert "## gpt2" in md and "## smollm2" in md
    assert "No latency was measured." in md
    assert report["skipped"] == [] and "None." in md
    check_png(report["files"]["metric_summary"])
    # No latency and no compiled run: both plots become a readable placeholder instead of crashing.
    check_png(report["files"]["metric_vs_latency"], min_bytes=5_000)
    check_png(report["files"]["equiv_heatmap"], min_bytes=5_000)


def test_heatmap_placeholder_direct(tmp_path: Path) -> None:
    df = pd.DataFrame([{"name": "lora-r4", "kind": "lora", "model": "gpt2", "run": "0", "val_acc": 90.0,
                        "latency_us": 1500.0, "ref_metric": np.nan, "ref_latency_us": np.nan, "device": "cpu",
                        "dtype": "float32", "threads": 2, "val_size": 872, "m": pd.NA, "r": 4}])
    files = write_report(df, {}, tmp_path, skipped=[])
    img = check_png(files["equiv_heatmap"], min_bytes=5_000)
    assert img.shape[1] > img.shape[0]  # the wide placeholder, not a layers × runs grid


def test_no_runs(tmp_path: Path) -> None:
    empty = tmp_path / "sweep"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"{empty}: holds no runs"):
        collect(empty)
    with pytest.raises(ValueError, match="missing: no such directory"):
        collect(tmp_path / "missing")
    train_run(empty / "0", None)
    with pytest.raises(ValueError, match=r"sweep: holds no evaluated runs \(1 skipped: 0: not evaluated"):
        collect(empty)


def test_log_to_wandb(sweep: Path, tmp_path: Path, monkeypatch) -> None:
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with pytest.warns(UserWarning):
        report = build_report(sweep)
    run = wandb.init(mode="offline", dir=tmp_path, project="feta-test")
    try:
        log_to_wandb(report, run)
        assert run.summary["best_acc/gpt2/lora"] == pytest.approx(87.6)
        assert run.summary["report/n_skipped"] == 4
        run_dir = Path(run.dir)
    finally:
        run.finish()
    media = run_dir / "media"
    assert len(list((media / "images").rglob("*.png"))) == 3
    assert list((media / "table").rglob("*.table.json"))


# -----------------------------------------------------------------------------
# generation sweeps: BLEU as the main metric, decode ms/token as the latency


def decode_latency(adapter_us: float, merged_us: float | None = None) -> dict:
    """Prefill rows too, so a test sees that a generation row reads the decode ones."""
    rows = [
        {"name": "base", "phase": "prefill", "batch": 1, "us_per_token": 1500.0, "ratio_to_base": 1.0},
        {"name": "adapter", "phase": "prefill", "batch": 1, "us_per_token": 1600.0, "ratio_to_base": 1.07},
        {"name": "base", "phase": "decode", "batch": 1, "us_per_token": 20000.0, "ratio_to_base": 1.0},
        {"name": "adapter", "phase": "decode", "batch": 1, "us_per_token": adapter_us,
         "ratio_to_base": adapter_us / 20000.0, "ratio_iqr": 0.02},
    ]
    if merged_us is not None:
        rows.append({"name": "merged", "phase": "decode", "batch": 1, "us_per_token": merged_us,
                     "ratio_to_base": merged_us / 20000.0, "ratio_iqr": 0.01})
    return {"device": "cpu", "dtype": "float32", "threads": 2, "rows": rows}


def generation_eval(run: Path, kind: str, name: str, bleu: float, rouge_l: float, m=None, r=None, **extra) -> dict:
    ev = {"run": str(run), "kind": kind, "name": name, "model": "gpt2", "task": "generation", "main_metric": "bleu",
          "m": m, "r": r, "trainable_params": 4321, "bleu": bleu, "rouge_l": rouge_l, "val_size": 50,
          "outputs": "outputs.jsonl", "identical_outputs": None, "latency": None, "residuals": None}
    return ev | extra


BLEU = {"base": 3.4, "prefix-m16": 21.5, "lora-r4": 27.3, "compiled-m16-r4": 19.8}


def make_generation_sweep(root: Path) -> Path:
    """A base, a prefix, a LoRA and a compiled run on a generation task, and one eval.json without its BLEU."""
    train_run(root / "0", generation_eval(root / "0", "base", "base", BLEU["base"], 12.0,
                                          latency=decode_latency(20000.0)))
    prefix = train_run(root / "1", generation_eval(root / "1", "prefix", "prefix-m16", BLEU["prefix-m16"], 40.5,
                                                   m=16, latency=decode_latency(23000.0)))
    train_run(root / "2", generation_eval(root / "2", "lora", "lora-r4", BLEU["lora-r4"], 47.0, r=4,
                                          latency=decode_latency(26000.0, merged_us=20400.0)))
    compiled = prefix / "compiled-r4"
    compiled.mkdir()
    (compiled / "compile.json").write_text("{}")
    (compiled / "eval.json").write_text(json.dumps(generation_eval(
        compiled, "compiled", "compiled-m16-r4", BLEU["compiled-m16-r4"], 38.0, m=16, r=4,
        identical_outputs=0.42, token_agreement=0.91, bleu_vs_source=64.0,
        latency=decode_latency(25000.0, merged_us=20600.0),
        residuals={"last": residual_curve(0.3, 0.8), "content": residual_curve(0.1, 0.4)})))
    train_run(root / "3", generation_eval(root / "3", "lora", "lora-r8", None, 50.0, r=8))  # no BLEU
    return root


def test_generation_sweep_reports_bleu(tmp_path: Path) -> None:
    sweep = make_generation_sweep(tmp_path / "gen")
    with pytest.warns(UserWarning, match="1 run\\(s\\) under .* skipped"):
        report = build_report(sweep)
    df = report["table"]
    assert "lacks bleu" in report["skipped"][0]
    assert list(df["kind"]) == ["base", "prefix", "lora", "compiled"]
    assert set(df["task"]) == {"generation"} and set(df["metric_name"]) == {"BLEU"}
    assert df["metric"].tolist() == pytest.approx([BLEU[n] for n in df["name"]])
    assert df["metric"].tolist() == df["bleu"].tolist() and df["val_acc"].isna().all()
    row = df.set_index("name")
    assert row.loc["lora-r4", "rouge_l"] == pytest.approx(47.0)
    # The headline latency is decode ms/token in the deployed (merged) form, not prefill.
    assert row.loc["lora-r4", "decode_ms"] == pytest.approx(20.4)
    assert row.loc["lora-r4", "decode_ratio"] == pytest.approx(1.02)
    assert row.loc["lora-r4", "latency_form"] == "merged"
    assert row.loc["prefix-m16", "decode_ms"] == pytest.approx(23.0)
    assert row.loc["prefix-m16", "latency_form"] == "adapter"
    assert row.loc["base", "decode_ratio"] == pytest.approx(1.0)
    assert row.loc["compiled-m16-r4", "identical_outputs"] == pytest.approx(42.0)
    assert row.loc["compiled-m16-r4", "token_agreement"] == pytest.approx(91.0)
    assert row.loc["compiled-m16-r4", "bleu_vs_source"] == pytest.approx(64.0)
    assert df["ref_metric"].isna().all()  # the reference is a classification run: no BLEU to compare with

    files = report["files"]
    csv = pd.read_csv(files["csv"]).set_index("name")
    assert csv.loc["lora-r4", "metric"] == pytest.approx(27.3) and csv.loc["lora-r4", "metric_name"] == "BLEU"
    table = md_table(files["md"].read_text(), "gpt2")
    assert list(table.columns[:5]) == ["BLEU", "ROUGE-L", "decode ms/token", "ratio to base", "trainable params"]
    assert table["BLEU"].tolist() == ["3.4", "21.5", "27.3", "19.8"]
    assert table.loc["lora-r4", ["decode ms/token", "ratio to base"]].tolist() == ["20.4", "1.02× ±0.01"]
    assert table.loc["compiled-m16-r4", ["identical outputs %", "token agreement %", "BLEU vs source"]].tolist() == [
        "42.0", "91.0", "64.0"]
    assert "accuracy" not in table.columns and "ref latency µs/token" not in table.columns
    for key in ("metric_vs_latency", "metric_summary", "equiv_heatmap"):
        check_png(files[key])

    scatter = metric_vs_latency_figure(df).axes[0]
    assert scatter.get_ylabel() == "BLEU (0-100)"
    assert scatter.get_xlabel().startswith("decode latency, ms/token")
    xs, ys = np.concatenate([c.get_offsets() for c in scatter.collections if len(c.get_offsets())]).T
    assert sorted(ys) == pytest.approx(sorted(BLEU.values()))
    assert sorted(xs) == pytest.approx([20.0, 20.4, 20.6, 23.0])  # decode ms/token, merged where measured
    bars = metric_summary_figure(df).axes[0]
    assert bars.get_ylabel() == "BLEU (0-100)"
    assert sorted(p.get_height() for p in bars.patches if p.get_height() > 0) == pytest.approx(
        sorted(v for k, v in BLEU.items() if k != "base"))
    plt.close("all")


def test_mixed_tasks_are_refused_or_split(tmp_path: Path) -> None:
    train_run(tmp_path / "0", evaluation(tmp_path / "0", "lora", "lora-r4", 0.9, r=4))
    train_run(tmp_path / "1", generation_eval(tmp_path / "1", "lora", "lora-r4-gen", 25.0, 45.0, r=4))
    with pytest.raises(UserError, match=r"mixes tasks.*classification \(accuracy\): 0; generation \(BLEU\): 1"
                                        r".*task='generation'"):
        collect(tmp_path)
    gen = build_report(tmp_path, tmp_path / "gen", task="generation")
    assert gen["table"]["name"].tolist() == ["lora-r4-gen"] and gen["table"]["metric"].tolist() == [25.0]
    cls, _ = collect(tmp_path, task="classification")
    assert cls["name"].tolist() == ["lora-r4"] and cls["metric"].tolist() == pytest.approx([90.0])
    with pytest.raises(UserError, match="unknown task 'translation'"):
        collect(tmp_path, task="translation")


def test_reference_rows_come_from_the_csv(tmp_path: Path) -> None:
    ref = reference()
    shipped = pd.read_csv(Path(__file__).parents[1] / "feta" / "report" / "reference.csv")
    assert len(ref) == len(shipped) == 7
    lora1 = ref[(ref["kind"] == "lora") & (ref["r"] == 1)]
    assert lora1["metric"].tolist() == [91.4] and lora1["latency_us"].tolist() == [47.4]
    compiled = ref[ref["kind"] == "compiled"].iloc[0]
    assert (compiled["m"], compiled["r"], compiled["residuals"]) == (32, 4, "0.6–0.98")
    train_run(tmp_path / "0", evaluation(tmp_path / "0", "lora", "lora-r1", 0.88, r=1))
    train_run(tmp_path / "1", evaluation(tmp_path / "1", "compiled", "compiled-m32-r4", 0.75, m=32, r=4))
    train_run(tmp_path / "2", evaluation(tmp_path / "2", "lora", "lora-r1", 0.87, model="smollm2", r=1))
    with pytest.warns(UserWarning, match="mixes base models"):
        df, _ = collect(tmp_path)
    row = df.set_index(["model", "name"])
    assert row.loc[("gpt2", "lora-r1"), "ref_metric"] == pytest.approx(91.4)
    assert row.loc[("gpt2", "lora-r1"), "ref_latency_us"] == pytest.approx(47.4)
    assert "0.6–0.98" in row.loc[("gpt2", "compiled-m32-r4"), "ref_note"]
    assert "residuals" not in row.loc[("gpt2", "lora-r1"), "ref_note"]
    assert pd.isna(row.loc[("smollm2", "lora-r1"), "ref_metric"])
