"""Sweep directory → pandas table → markdown/CSV and three seaborn plots.

    from feta.report import build_report
    build_report(Path("multirun/2025-01-01/12-00-00"))   # writes <sweep>/report/

Reads the `eval.json` that evaluate.py writes in every run directory (training runs and their
`compiled-r<r>/` dirs); never reads tensors or loads models, so it runs in seconds anywhere.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on the cluster or in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from feta.runs import COMPILE, CONFIG, EVAL, is_finished, run_dirs  # noqa: E402

# -----------------------------------------------------------------------------
# contract and reference figures
REQUIRED_KEYS = ("kind", "name", "model", "val_acc")
# Deployed form first: a merged LoRA is what one ships; a prefix has only its adapter form.
DEPLOYED = ("merged", "adapter")
KIND_ORDER = ("base", "prefix", "prompt", "lora", "ia3", "compiled")
# Fixed colours per kind (seaborn "deep"), so a kind looks the same in every plot and every sweep.
KIND_COLORS = dict(zip(KIND_ORDER, ["#7f7f7f", "#4c72b0", "#64b5cd", "#dd8452", "#8172b3", "#55a868"]))
EXTRA_COLORS = ["#c44e52", "#937860", "#da8bc3", "#ccb974", "#8c8c8c"]
# The reference run (GPT-2 small, SST-2, on CUDA): (kind, m, r) -> (val acc %, latency µs/token).
REFERENCE = {
    ("prefix", 8, None): (66.7, 43.0), ("prefix", 16, None): (76.1, 44.1), ("prefix", 32, None): (79.5, 44.2),
    ("lora", None, 1): (91.4, 47.4), ("lora", None, 2): (90.6, 48.0), ("lora", None, 4): (91.7, 76.6),
    ("compiled", 32, 4): (77.1, 69.7),
}
REFERENCE_MODEL = "gpt2"
REFERENCE_NOTE = "reference run: GPT-2 small on CUDA, latency not comparable with another device"
REFERENCE_RESIDUALS = "0.6–0.98"
COLUMNS = [
    "name", "kind", "model", "m", "r", "trainable_params", "val_acc", "agreement",
    "latency_us", "latency_ratio", "latency_ratio_iqr", "decode_us", "decode_ratio", "decode_ratio_iqr",
    "residual_last_mean", "residual_last_max", "residual_content_mean", "ref_acc", "ref_latency_us", "ref_note",
    "latency_form", "device", "dtype", "threads", "val_size", "run",
]
# -----------------------------------------------------------------------------


def _check_eval(run_dir: Path) -> tuple[dict[str, Any] | None, str]:
    """(eval dict, "") for a valid evaluated run, else (None, reason)."""
    if (run_dir / CONFIG).is_file() and not is_finished(run_dir):
        return None, "training did not finish (no complete metrics.json); rerun train.py to resume it"
    path = run_dir / EVAL
    if not path.is_file():
        return None, f"not evaluated (no {EVAL}); run evaluate.py ckpt={run_dir}"
    try:
        ev = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        return None, f"{EVAL} is not valid JSON ({e}); rerun evaluate.py ckpt={run_dir}"
    if not isinstance(ev, dict):
        return None, f"{EVAL} holds a {type(ev).__name__}, not an object"
    missing = [k for k in REQUIRED_KEYS if ev.get(k) is None]
    if missing:
        return None, f"{EVAL} lacks {', '.join(missing)}; rerun evaluate.py ckpt={run_dir}"
    acc = ev["val_acc"]
    if not isinstance(acc, (int, float)) or not 0 <= acc <= 1:
        return None, f"{EVAL} val_acc={acc!r} is not a fraction in [0, 1]"
    return ev, ""


def _latency(lat: dict | None, phase: str, names: tuple[str, ...]) -> tuple[float, float, float, str | None]:
    """(µs/token, ratio to base, IQR of that ratio, form) of the first form in `names` at batch 1 in `phase`."""
    rows = (lat or {}).get("rows") or []
    for name in names:
        for row in rows:
            if row.get("name") == name and row.get("phase") == phase and row.get("batch", 1) == 1:
                get = lambda k: float(row[k]) if isinstance(row.get(k), (int, float)) else math.nan  # noqa: E731
                return get("us_per_token"), get("ratio_to_base"), get("ratio_iqr"), name
    return math.nan, math.nan, math.nan, None


def _pct(x: Any) -> float:
    return 100.0 * float(x) if isinstance(x, (int, float)) else math.nan


def _stat(values: Any, fn) -> float:
    arr = np.asarray(values if values else [], dtype=float)
    return float(fn(arr)) if arr.size else math.nan


def _row(ev: dict[str, Any], rel: str) -> dict[str, Any]:
    kind, model = str(ev["kind"]), str(ev["model"])
    lat = ev.get("latency")
    # The base model's own eval has only "base" rows; an adapter never falls back to them.
    names = ("base",) if kind == "base" else DEPLOYED
    latency_us, latency_ratio, latency_ratio_iqr, form = _latency(lat, "prefill", names)
    decode_us, decode_ratio, decode_ratio_iqr, _ = _latency(lat, "decode", names)
    res = ev.get("residuals") or {}
    m, r = ev.get("m"), ev.get("r")
    ref = REFERENCE.get((kind, m, r)) if model == REFERENCE_MODEL else None
    return {
        "name": str(ev["name"]), "kind": kind, "model": model, "m": m, "r": r,
        "trainable_params": ev.get("trainable_params"),
        "val_acc": _pct(ev["val_acc"]), "agreement": _pct(ev.get("agreement_with_source")),
        "latency_us": latency_us, "latency_ratio": latency_ratio, "latency_ratio_iqr": latency_ratio_iqr,
        "decode_us": decode_us, "decode_ratio": decode_ratio, "decode_ratio_iqr": decode_ratio_iqr,
        "residual_last_mean": _stat(res.get("last"), np.mean), "residual_last_max": _stat(res.get("last"), np.max),
        "residual_content_mean": _stat(res.get("content"), np.mean),
        "ref_acc": ref[0] if ref else math.nan, "ref_latency_us": ref[1] if ref else math.nan,
        "ref_note": (REFERENCE_NOTE + (f"; its residuals were {REFERENCE_RESIDUALS}" if kind == "compiled" else ""))
        if ref else None,
        "latency_form": form, "device": (lat or {}).get("device"), "dtype": (lat or {}).get("dtype"),
        "threads": (lat or {}).get("threads"), "val_size": ev.get("val_size"), "run": rel,
    }


def _kind_rank(kind: str) -> int:
    return KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)


def collect(sweep_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    """One row per evaluated run below `sweep_dir` (compiled dirs included) and the skipped dirs with reasons.

    Per-layer residuals of compiled runs are in `df.attrs["residuals"]`, keyed by the row's `run`
    (its path relative to `sweep_dir`), ready for `write_report`.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir}: no such directory; pass a sweep directory written by train.py -m")
    rows, residuals, skipped = [], {}, []
    for run_dir in run_dirs(sweep_dir, (CONFIG, COMPILE, EVAL)):
        rel = run_dir.relative_to(sweep_dir).as_posix()
        rel = sweep_dir.name if rel == "." else rel
        ev, reason = _check_eval(run_dir)
        if ev is None:
            skipped.append(f"{rel}: {reason}")
            continue
        rows.append(_row(ev, rel))
        if ev.get("residuals"):
            residuals[rel] = ev["residuals"]
    if not rows:
        hint = f"run train.py -m … then evaluate.py ckpt={sweep_dir}"
        if skipped:
            raise FileNotFoundError(f"no evaluated runs under {sweep_dir} ({len(skipped)} skipped: "
                                    + "; ".join(skipped) + f"); {hint}")
        raise FileNotFoundError(f"no runs under {sweep_dir}: {hint}")
    if skipped:
        warnings.warn(f"{len(skipped)} run(s) under {sweep_dir} skipped as unfinished or broken:\n  "
                      + "\n  ".join(skipped), stacklevel=2)
    df = pd.DataFrame(rows, columns=COLUMNS)
    for col in ("m", "r", "trainable_params", "threads", "val_size"):
        df[col] = df[col].astype("Int64")  # integers stay integers in the CSV, with <NA> where absent
    df = (df.assign(_k=df["kind"].map(_kind_rank)).sort_values(["model", "_k", "kind", "m", "r", "name", "run"])
          .drop(columns="_k").reset_index(drop=True))
    models = df["model"].unique().tolist()
    if len(models) > 1:
        # A prefix on one model and a LoRA on another are not a comparison; say so wherever the table goes.
        warnings.warn(f"the sweep under {sweep_dir} mixes base models ({', '.join(models)}); "
                      "compare rows only within one model", stacklevel=2)
    df.attrs["residuals"] = residuals
    return df, skipped


# -----------------------------------------------------------------------------
# markdown


def _fmt(x: Any, spec: str = "", suffix: str = "") -> str:
    if x is None or (not isinstance(x, str) and pd.isna(x)):
        return "—"
    return f"{x:{spec}}{suffix}"


def _fmt_us(x: Any) -> str:
    return _fmt(x, ".0f" if not pd.isna(x) and x >= 100 else ".1f")


def _fmt_ratio(ratio: Any, iqr: Any) -> str:
    # The IQR beside the ratio: on CPU most ratios sit within the noise (notes/findings.md).
    return _fmt(ratio, ".2f", "×") + ("" if pd.isna(iqr) or pd.isna(ratio) else f" ±{iqr:.2f}")


def _setup_line(df: pd.DataFrame) -> str:
    setups = df.dropna(subset=["device"])[["device", "dtype", "threads"]].drop_duplicates()
    if setups.empty:
        return "No latency was measured."
    text = "; ".join(f"{s.device}, {s.dtype}, {_fmt(s.threads)} threads" for s in setups.itertuples())
    warn = " (more than one setup: latencies are not comparable across them)" if len(setups) > 1 else ""
    return (f"Latency: µs/token at prefill, batch 1, in the deployed form (merged LoRA where measured, else the "
            f"adapter), and its ratio to the base model timed in the same process (± the IQR of that ratio where "
            f"measured); measured on {text}{warn}.")


def _markdown(df: pd.DataFrame, skipped: list[str]) -> str:
    models = df["model"].unique().tolist()
    sizes = sorted({int(v) for v in df["val_size"].dropna()})
    lines = ["# feta results", ""]
    if len(models) > 1:
        lines += [f"**Warning: this table mixes base models ({', '.join(models)}); compare rows only within one "
                  "model's section.**", ""]
    lines += [
        f"Validation accuracy (%) on {' / '.join(map(str, sizes)) or 'an unknown number of'} examples; "
        f"{len(df)} evaluated run(s). " + _setup_line(df),
        "Agreement: share of a compiled model's predictions equal to its source prefix's. Reference columns: "
        "the reference run (GPT-2 small on CUDA, so its latency is not comparable with another device; its "
        f"compiled residuals were {REFERENCE_RESIDUALS}), filled only where model and setting match.", "",
    ]
    head = ["model", "acc %", "latency µs/token", "ratio to base", "decode µs/token", "decode ratio",
            "trainable params", "agreement %", "residual (last) mean / max", "ref acc %", "ref latency µs/token"]
    for model, g in df.groupby("model", sort=False):
        lines += [f"## {model}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in g.itertuples():
            res = (f"{row.residual_last_mean:.2f} / {row.residual_last_max:.2f}"
                   if not pd.isna(row.residual_last_mean) else "—")
            cells = [row.name, _fmt(row.val_acc, ".1f"), _fmt_us(row.latency_us),
                     _fmt_ratio(row.latency_ratio, row.latency_ratio_iqr), _fmt_us(row.decode_us),
                     _fmt_ratio(row.decode_ratio, row.decode_ratio_iqr), _fmt(row.trainable_params, ","),
                     _fmt(row.agreement, ".1f"), res, _fmt(row.ref_acc, ".1f"), _fmt(row.ref_latency_us, ".1f")]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Skipped runs", ""] + ([f"- {s}" for s in skipped] or ["None."]) + [""]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# plots


def _palette(kinds) -> dict[str, str]:
    extra = iter(EXTRA_COLORS * 4)
    return {k: KIND_COLORS.get(k) or next(extra) for k in sorted(set(kinds), key=lambda k: (_kind_rank(k), k))}


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return path


def _placeholder(path: Path, title: str, text: str) -> Path:
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.set_axis_off()
    ax.set_title(title, fontsize=13)
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=12,
            bbox=dict(boxstyle="round,pad=0.8", facecolor="#f3f3f3", edgecolor="#999999"))
    return _save(fig, path)


def _setup_title(df: pd.DataFrame) -> str:
    setups = df.dropna(subset=["device"])[["device", "dtype", "threads"]].drop_duplicates()
    return "; ".join(f"{s.device}, {s.dtype}, {_fmt(s.threads)} threads" for s in setups.itertuples())


def _place_labels(ax, items: list[tuple[float, float, str, dict]], fontsize: float = 8) -> None:
    """Label points to their right, pushing a label up until it clears the ones already placed.

    Runs on CPU land within a few percent of each other in latency, so naive labels pile up.
    Works in display pixels, converted to points so the layout survives savefig's dpi.
    """
    ax.figure.canvas.draw()  # settle limits and scales before reading transData
    px = ax.figure.dpi / 72.0  # pixels per point
    h = 1.25 * fontsize * px
    placed: list[tuple[float, float, float]] = []  # (x0, x1, y) of placed labels, pixels
    # A hair under h: (c + h) - c can round below h, and the loop below would then never move on.
    h_clear = h * (1 - 1e-9)
    pts = [(*ax.transData.transform((x, y)), text, kw) for x, y, text, kw in items]
    for x, y, text, kw in sorted(pts, key=lambda p: p[1]):
        x0, x1, y_lab = x + 7 * px, x + 7 * px + 0.62 * fontsize * px * len(text), y
        while any(a < x1 and x0 < b and abs(y_lab - c) < h_clear for a, b, c in placed):
            y_lab = max(c for a, b, c in placed if a < x1 and x0 < b and abs(y_lab - c) < h_clear) + h
        placed.append((x0, x1, y_lab))
        moved = abs(y_lab - y) > 0.5 * h
        ax.annotate(text, ax.transData.inverted().transform((x, y)), xytext=(7, (y_lab - y) / px),
                    textcoords="offset points", fontsize=fontsize, va="center",
                    arrowprops=dict(arrowstyle="-", color="#aaaaaa", lw=0.6, shrinkB=4) if moved else None, **kw)


def _labels(df: pd.DataFrame, sep: str = " ") -> pd.Series:
    """A unique label per row: the run name, plus the base model if names repeat across models, plus the run path."""
    label = df["name"].astype(str)
    dup = label.duplicated(keep=False)
    label = label.where(~dup, label + sep + "(" + df["model"].astype(str) + ")")
    dup = label.duplicated(keep=False)
    return label.where(~dup, label + sep + "[" + df["run"].astype(str) + "]")


def _fit_labels_right(ax, items: list[tuple[float, float, str, dict]], fontsize: float = 8) -> None:
    """Widen the x range so labels right of the rightmost points stay inside the axes (the legend sits outside)."""
    ax.figure.canvas.draw()
    scale = ax.xaxis.get_transform()  # linear or log: the axes is linear in scaled coordinates
    x0, x1 = scale.transform(np.array(ax.get_xlim(), dtype=float))
    W = ax.bbox.width
    px = ax.figure.dpi / 72.0
    need = x1
    for x, _, text, _ in items:
        room = W - (12 + 0.62 * fontsize * len(text)) * px  # pixels left for the point itself
        fx = float(scale.transform(np.array([x], dtype=float))[0])
        if room > 0.3 * W:
            need = max(need, x0 + (fx - x0) * W / room)
    if need > x1:
        ax.set_xlim(ax.get_xlim()[0], float(scale.inverted().transform(np.array([need]))[0]))


def _setting(kind: str, m: Any, r: Any) -> str:
    return " ".join([kind] + [f"{k}={v}" for k, v in (("m", m), ("r", r)) if not pd.isna(v)])


def plot_acc_vs_latency(df: pd.DataFrame, path: Path) -> Path:
    """Accuracy (%) against deployed prefill latency (µs/token, batch 1), one point per run, hue = kind."""
    d = df.dropna(subset=["latency_us", "val_acc"])
    if d.empty:
        return _placeholder(path, "Accuracy vs latency", "no run has a latency measurement:\n"
                            "run evaluate.py with latency on to fill this plot")
    ref = df.dropna(subset=["ref_latency_us", "ref_acc"]).drop_duplicates(["kind", "m", "r"])
    palette = _palette(pd.concat([d["kind"], ref["kind"]]))
    multi = df["model"].nunique() > 1
    fig, ax = plt.subplots(figsize=(9, 6))
    sns.scatterplot(data=d, x="latency_us", y="val_acc", hue="kind", hue_order=list(palette),
                    style="model" if multi else None, palette=palette, s=90, ax=ax, zorder=3)
    for row in ref.itertuples():
        ax.scatter(row.ref_latency_us, row.ref_acc, s=90, facecolors="none", edgecolors=palette[row.kind],
                   linewidths=1.6, zorder=3)
    base = df[df["kind"] == "base"]
    for row in base.itertuples():
        ax.axhline(row.val_acc, color=palette.get("base", "#7f7f7f"), ls="--", lw=1, zorder=1)
    handles, labels = ax.get_legend_handles_labels()
    if not ref.empty:
        handles.append(plt.Line2D([], [], ls="", marker="o", mfc="none", mec="#444444", ms=9))
        labels.append("reference (hollow): GPT-2 on CUDA")
    if not base.empty:
        handles.append(plt.Line2D([], [], ls="--", color="#7f7f7f"))
        labels.append("base model (zero-shot)")
    ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    xs = pd.concat([d["latency_us"], ref["ref_latency_us"]])
    log = xs.min() > 0 and xs.max() / xs.min() > 20  # CUDA reference (~45 µs) next to CPU runs (~1500 µs)
    if log:
        ax.set_xscale("log")
    ax.margins(x=0.15, y=0.08)  # room for the labels right of the rightmost points
    ax.set_xlabel("latency, µs/token (prefill, batch 1, merged LoRA where measured)" + (", log scale" if log else ""))
    ax.set_ylabel("validation accuracy (%)")
    setup = _setup_title(df)
    ax.set_title("Accuracy vs deployed latency" + (f"\nmeasured on {setup}" if setup else ""), fontsize=11)
    missing = len(df) - len(d)
    if missing:
        ax.text(0.01, 0.01, f"{missing} run(s) without latency not shown", transform=ax.transAxes, fontsize=8,
                color="#555555")
    ax.grid(alpha=0.3)
    items = [(row.latency_us, row.val_acc, label, {}) for row, label in zip(d.itertuples(), _labels(d))]
    items += [(row.ref_latency_us, row.ref_acc, "ref " + _setting(row.kind, row.m, row.r), {"color": "#666666"})
              for row in ref.itertuples()]
    _fit_labels_right(ax, items)
    _place_labels(ax, items)
    return _save(fig, path)


def plot_accuracy_summary(df: pd.DataFrame, path: Path) -> Path:
    """Bars of validation accuracy per run, one panel per base model, zero-shot line where a base row exists."""
    models = df["model"].unique().tolist()
    palette = _palette(df["kind"])
    n_bars = [max(1.5, int(((df["model"] == m) & (df["kind"] != "base")).sum())) for m in models]
    # ~0.8 inch per bar keeps the rotated names apart; panels as wide as their bar count.
    fig, axes = plt.subplots(1, len(models), figsize=(max(6.0, 1.5 + 0.8 * sum(n_bars)), 5), sharey=True,
                             squeeze=False, gridspec_kw={"width_ratios": n_bars})
    for ax, model in zip(axes[0], models):
        g = df[df["model"] == model]
        bars = g[g["kind"] != "base"]
        bars = bars.assign(label=_labels(bars))
        sns.barplot(data=bars, x="label", y="val_acc", hue="kind", palette=palette, dodge=False, ax=ax,
                    hue_order=[k for k in palette if k in set(bars["kind"])])
        # Values inside the bar tops, so the reference ticks just above stay readable.
        for i, acc in enumerate(bars["val_acc"]):
            ax.text(i, acc - 1.5, f"{acc:.1f}", ha="center", va="top", fontsize=8, color="white", fontweight="bold")
        ref = bars["ref_acc"].to_numpy(dtype=float)
        if np.isfinite(ref).any():
            ax.scatter(np.arange(len(bars)), ref, marker="_", s=500, linewidths=2, color="black", zorder=4,
                       label="reference (GPT-2, CUDA)")
        for row in g[g["kind"] == "base"].itertuples():
            ax.axhline(row.val_acc, color="#333333", ls="--", lw=1.2,
                       label=f"base model, zero-shot ({row.val_acc:.1f}%)")
        ax.set_title(f"{model}", fontsize=11)
        ax.set_xlabel("")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_ylim(0, 100)
        ax.tick_params(axis="x", rotation=30)
        for t in ax.get_xticklabels():
            t.set_ha("right")
            t.set_rotation_mode("anchor")
        ax.get_legend().remove()
    # One legend for all panels, outside the bars: the kinds, the reference ticks, every base line.
    legend = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    keys = [k for k in palette if k in legend] + [k for k in legend if k not in palette]
    axes[0][-1].legend([legend[k] for k in keys], keys, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1),
                       borderaxespad=0)
    fig.suptitle("Validation accuracy per run" + (" (one panel per base model)" if len(models) > 1 else ""),
                 fontsize=12)
    fig.tight_layout()
    return _save(fig, path)


def plot_equiv_heatmap(df: pd.DataFrame, residuals: dict[str, dict], path: Path, position: str = "last") -> Path:
    """Layers × compiled runs of the relative residual at `position` ("last", "content" or "all")."""
    names = dict(zip(df["run"], _labels(df, sep="\n")))
    order = {run: i for i, run in enumerate(df["run"])}  # the table's order: by model, then m, then r
    runs = sorted((run for run, res in residuals.items() if res and res.get(position)),
                  key=lambda run: (order.get(run, len(order)), run))
    cols = {names.get(run, run): residuals[run][position] for run in runs}
    if not cols:
        return _placeholder(path, "Prefix → LoRA equivalence",
                            "no compiled runs with residuals in this sweep:\nrun compile.py ckpt=<prefix run dir>, "
                            "then evaluate.py ckpt=<sweep dir>")
    n_layers = max(len(v) for v in cols.values())
    table = pd.DataFrame({k: list(v) + [math.nan] * (n_layers - len(v)) for k, v in cols.items()}, dtype=float)
    table.index.name = "layer"
    annot = table.size <= 400
    longest = max(len(c) for c in table.columns)
    rotate = longest > 18 or table.shape[1] > 6  # ~18 characters fit a 1.9-inch column at this font size
    fig, ax = plt.subplots(figsize=(max(6.0, 2.5 + (0.9 if rotate else 1.9) * table.shape[1]),
                                    max(4.0, 1.2 + 0.28 * n_layers)))
    # Residuals above 1 (worse than the base model) happen; cap the colour scale there only if they do.
    vmax = max(1.0, float(np.nanmax(table.to_numpy())))
    ax.grid(False)
    ax.set_facecolor("#f0f0f0")  # a model with fewer layers leaves its column's bottom empty, not white-on-white
    sns.heatmap(table, ax=ax, cmap="rocket_r", vmin=0, vmax=vmax, annot=annot, fmt=".2f",
                annot_kws={"fontsize": 7}, linewidths=0.3, cbar_kws={"label": "relative residual (0 = exact)"})
    ax.set_xlabel("compiled run")
    ax.set_ylabel("layer")
    ax.tick_params(axis="y", rotation=0)
    ax.tick_params(axis="x", rotation=30 if rotate else 0)
    if rotate:
        for t in ax.get_xticklabels():
            t.set_ha("right")
            t.set_rotation_mode("anchor")
    where = {"last": "classified (last) position", "content": "content tokens", "all": "all tokens"}.get(
        position, position)
    ax.set_title(f"Compile residual per layer, {where}\n‖h_compiled − h_prefix‖ / ‖h_prefix − h_base‖ "
                 "(1 = no better than the base model)", fontsize=10)
    return _save(fig, path)


# -----------------------------------------------------------------------------
# public entry points


def write_report(df: pd.DataFrame, residuals: dict[str, dict], out_dir: Path, skipped: list[str],
                 *, position: str = "last") -> dict[str, Path]:
    """Write results.csv, results.md and the three PNGs into `out_dir`; returns {file stem: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # A hand-made or filtered table may lack columns; absent ones read as "not measured".
    df = df.reindex(columns=COLUMNS + [c for c in df.columns if c not in COLUMNS])
    files = {"csv": out_dir / "results.csv", "md": out_dir / "results.md"}
    df.to_csv(files["csv"], index=False)
    files["md"].write_text(_markdown(df, skipped))
    sns.set_theme(style="whitegrid", context="notebook")
    files["acc_vs_latency"] = plot_acc_vs_latency(df, out_dir / "acc_vs_latency.png")
    files["accuracy_summary"] = plot_accuracy_summary(df, out_dir / "accuracy_summary.png")
    files["equiv_heatmap"] = plot_equiv_heatmap(df, residuals, out_dir / "equiv_heatmap.png", position)
    return files


def build_report(sweep_dir: Path, out_dir: Path | None = None) -> dict[str, Any]:
    """collect + write_report into `sweep_dir/report/` by default: {"table": df, "files": {...}, "skipped": [...]}."""
    sweep_dir = Path(sweep_dir)
    df, skipped = collect(sweep_dir)
    files = write_report(df, df.attrs.get("residuals", {}), Path(out_dir or sweep_dir / "report"), skipped)
    return {"table": df, "files": files, "skipped": skipped}


def log_to_wandb(report: dict[str, Any], run) -> None:
    """Log the table (wandb.Table), the PNGs (wandb.Image) and best accuracy per kind to an initialized W&B run."""
    import wandb

    df = report["table"]
    # wandb.Table rejects pandas' <NA>; plain objects with None log as empty cells.
    table = wandb.Table(dataframe=df.astype(object).where(df.notna(), None))
    images = {f"report/{k}": wandb.Image(str(p), caption=k) for k, p in report["files"].items()
              if str(p).endswith(".png")}
    run.log({"report/results": table, **images})
    for (model, kind), g in df.groupby(["model", "kind"]):
        best = g.loc[g["val_acc"].idxmax()]
        run.summary[f"best_acc/{model}/{kind}"] = float(best["val_acc"])
        if not pd.isna(best["latency_ratio"]):
            run.summary[f"latency_ratio/{model}/{kind}"] = float(best["latency_ratio"])
    run.summary["report/n_runs"] = len(df)
    run.summary["report/n_skipped"] = len(report["skipped"])
