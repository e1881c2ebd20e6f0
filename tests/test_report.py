"""feta.report on synthetic sweeps: eval.json files written here, no model, no training."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from feta.report import build_report, collect, log_to_wandb, write_report

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
          "val_acc": val_acc, "val_size": 872, "per_class_acc": [val_acc - 0.01, val_acc + 0.01],
          "confusion": [[400, 28], [80, 364]], "agreement_with_source": None, "latency": None, "residuals": None}
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
        compiled, "compiled", "compiled-m16-r4", 0.742, m=16, r=4, agreement_with_source=0.958,
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


def test_collect_rows_and_skipped(sweep: Path) -> None:
    with pytest.warns(UserWarning, match="4 run\\(s\\) under .* skipped") as rec:
        df, skipped = collect(sweep)
    assert not any("mixes base models" in str(w.message) for w in rec)
    assert sorted(df["name"]) == ["compiled-m16-r4", "lora-r4", "prefix-m16"]
    assert list(df["kind"]) == ["prefix", "lora", "compiled"]  # sorted by kind within the model
    row = df.set_index("name")
    assert row.loc["lora-r4", "val_acc"] == pytest.approx(87.6)
    assert row.loc["lora-r4", "latency_us"] == pytest.approx(1510.0)  # merged row, not adapter (2100)
    assert row.loc["lora-r4", "latency_ratio"] == pytest.approx(1510.0 / 1500.0)
    assert row.loc["lora-r4", "latency_form"] == "merged"
    assert row.loc["lora-r4", "latency_ratio_iqr"] == pytest.approx(0.03)
    assert pd.isna(row.loc["prefix-m16", "latency_ratio_iqr"])
    assert row.loc["lora-r4", "decode_ratio"] == pytest.approx(1.0)
    assert row.loc["prefix-m16", "latency_us"] == pytest.approx(1560.0)  # adapter form, batch 1 (not 999 at batch 8)
    assert row.loc["prefix-m16", "latency_form"] == "adapter"
    assert row.loc["prefix-m16", "decode_us"] == pytest.approx(29680.0)
    assert row.loc["prefix-m16", "m"] == 16 and pd.isna(row.loc["prefix-m16", "r"])
    assert row.loc["compiled-m16-r4", "agreement"] == pytest.approx(95.8)
    assert pd.isna(row.loc["lora-r4", "agreement"])
    assert row.loc["compiled-m16-r4", "residual_last_mean"] == pytest.approx(0.55, abs=1e-3)
    assert row.loc["compiled-m16-r4", "residual_last_max"] == pytest.approx(0.9)
    assert row.loc["compiled-m16-r4", "residual_content_mean"] == pytest.approx(0.3, abs=1e-3)
    assert pd.isna(row.loc["lora-r4", "residual_last_mean"])
    # Reference figures (GPT-2 on CUDA) where the setting matches; compiled m=16 has none (reference is m=32).
    assert row.loc["prefix-m16", "ref_acc"] == pytest.approx(76.1)
    assert row.loc["prefix-m16", "ref_latency_us"] == pytest.approx(44.1)
    assert row.loc["lora-r4", "ref_acc"] == pytest.approx(91.7)
    assert row.loc["lora-r4", "ref_latency_us"] == pytest.approx(76.6)
    assert "CUDA" in row.loc["lora-r4", "ref_note"]
    assert pd.isna(row.loc["compiled-m16-r4", "ref_acc"])
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
    assert set(files) == {"csv", "md", "acc_vs_latency", "accuracy_summary", "equiv_heatmap"}
    assert all(p.parent == out for p in files.values())
    csv = pd.read_csv(files["csv"])
    assert len(csv) == 3
    assert csv.set_index("name").loc["lora-r4", "val_acc"] == pytest.approx(87.6)
    md = files["md"].read_text()
    assert "| lora-r4 | 87.6 | 1510 | 1.01× ±0.03 | 28000 | 1.00× |" in md
    assert "| prefix-m16 | 76.1 | 1560 |" in md and "| 76.1 | 44.1 |" in md
    assert "cpu, float32, 2 threads" in md
    assert "mixes" not in md
    for bad in ("- 2: ", "- 3: ", "- 4: ", "- 5: "):
        assert bad in md
    for key in ("acc_vs_latency", "accuracy_summary", "equiv_heatmap"):
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
    assert df.loc[0, "ref_acc"] == pytest.approx(66.7)
    assert pd.isna(df.loc[2, "ref_acc"])  # smollm2 LoRA r=4: the reference is GPT-2 only
    assert df["latency_us"].isna().all()
    md = report["files"]["md"].read_text()
    assert "mixes base models (gpt2, smollm2)" in md
    assert "## gpt2" in md and "## smollm2" in md
    assert "No latency was measured." in md
    assert report["skipped"] == [] and "None." in md
    check_png(report["files"]["accuracy_summary"])
    # No latency and no compiled run: both plots become a readable placeholder instead of crashing.
    check_png(report["files"]["acc_vs_latency"], min_bytes=5_000)
    check_png(report["files"]["equiv_heatmap"], min_bytes=5_000)


def test_heatmap_placeholder_direct(tmp_path: Path) -> None:
    df = pd.DataFrame([{"name": "lora-r4", "kind": "lora", "model": "gpt2", "run": "0", "val_acc": 90.0,
                        "latency_us": 1500.0, "ref_acc": np.nan, "ref_latency_us": np.nan, "device": "cpu",
                        "dtype": "float32", "threads": 2, "val_size": 872, "m": pd.NA, "r": 4}])
    files = write_report(df, {}, tmp_path, skipped=[])
    img = check_png(files["equiv_heatmap"], min_bytes=5_000)
    assert img.shape[1] > img.shape[0]  # the wide placeholder, not a layers × runs grid


def test_no_runs(tmp_path: Path) -> None:
    empty = tmp_path / "sweep"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"no runs under {empty}"):
        collect(empty)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        collect(tmp_path / "missing")
    train_run(empty / "0", None)
    with pytest.raises(FileNotFoundError, match="no evaluated runs under .*0: not evaluated"):
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
