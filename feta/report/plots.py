"""The report's seaborn figures: main metric vs latency, main metric per run, compile residual heatmap.

Each `*_figure` builds a matplotlib Figure from a one-task table (axes labelled with the task's metric and
latency); each `plot_*` saves it as a PNG and closes it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on the cluster or in CI; must precede the pyplot import
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from feta.report.table import KIND_ORDER, kind_rank, setups, task_axes  # noqa: E402

# Fixed colours per kind (seaborn "deep"), so a kind looks the same in every plot and every sweep.
KIND_COLORS = dict(zip(KIND_ORDER, ["#7f7f7f", "#4c72b0", "#64b5cd", "#da8bc3", "#dd8452", "#8172b3", "#55a868"]))
EXTRA_COLORS = ["#c44e52", "#937860", "#ccb974", "#8c8c8c"]


def _palette(kinds) -> dict[str, str]:
    extra = iter(EXTRA_COLORS * 4)
    return {k: KIND_COLORS.get(k) or next(extra) for k in sorted(set(kinds), key=lambda k: (kind_rank(k), k))}


def save(fig: Figure, path: Path) -> Path:
    """Write `fig` as a PNG and close it."""
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return path


def _placeholder(title: str, text: str) -> Figure:
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.set_axis_off()
    ax.set_title(title, fontsize=13)
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=12,
            bbox=dict(boxstyle="round,pad=0.8", facecolor="#f3f3f3", edgecolor="#999999"))
    return fig


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


def metric_vs_latency_figure(df: pd.DataFrame) -> Figure:
    """The main metric against the deployed latency (prefill µs/token, or decode ms/token for generation)."""
    _, metric, lat = task_axes(df)
    x = lat.column
    name = metric.name[:1].upper() + metric.name[1:]  # "Accuracy", "BLEU"
    title = f"{name} vs latency"
    d = df.dropna(subset=[x, "metric"])
    if d.empty:
        return _placeholder(title, "no run has a latency measurement:\n"
                            "run evaluate.py with latency on to fill this plot")
    # The reference is prefill µs/token; it shares the axis only where the headline latency is the same.
    ref = df.dropna(subset=["ref_latency_us", "ref_metric"]).drop_duplicates(["kind", "m", "r"])
    if x != "latency_us":
        ref = ref.iloc[0:0]
    palette = _palette(pd.concat([d["kind"], ref["kind"]]))
    multi = df["model"].nunique() > 1
    fig, ax = plt.subplots(figsize=(9, 6))
    sns.scatterplot(data=d, x=x, y="metric", hue="kind", hue_order=list(palette),
                    style="model" if multi else None, palette=palette, s=90, ax=ax, zorder=3)
    for row in ref.itertuples():
        ax.scatter(row.ref_latency_us, row.ref_metric, s=90, facecolors="none", edgecolors=palette[row.kind],
                   linewidths=1.6, zorder=3)
    base = df[(df["kind"] == "base") & df["metric"].notna()]
    for row in base.itertuples():
        ax.axhline(row.metric, color=palette.get("base", "#7f7f7f"), ls="--", lw=1, zorder=1)
    handles, labels = ax.get_legend_handles_labels()
    if not ref.empty:
        handles.append(plt.Line2D([], [], ls="", marker="o", mfc="none", mec="#444444", ms=9))
        labels.append("reference (hollow): GPT-2 on CUDA")
    if not base.empty:
        handles.append(plt.Line2D([], [], ls="--", color="#7f7f7f"))
        labels.append("base model (zero-shot)")
    ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    xs = pd.concat([d[x], ref["ref_latency_us"]])
    log = xs.min() > 0 and xs.max() / xs.min() > 20  # CUDA reference (~45 µs) next to CPU runs (~1500 µs)
    if log:
        ax.set_xscale("log")
    ax.margins(x=0.15, y=0.08)  # room for the labels right of the rightmost points
    how = "greedy, batch 1" if lat.phase == "decode" else "prefill, batch 1"
    ax.set_xlabel(f"{'decode ' if lat.phase == 'decode' else ''}latency, {lat.unit} ({how}, merged LoRA where "
                  "measured)" + (", log scale" if log else ""))
    ax.set_ylabel(metric.label)
    setup = "; ".join(setups(df))
    ax.set_title(f"{name} vs deployed latency" + (f"\nmeasured on {setup}" if setup else ""), fontsize=11)
    missing = len(df) - len(d)
    if missing:
        ax.text(0.01, 0.01, f"{missing} run(s) without latency not shown", transform=ax.transAxes, fontsize=8,
                color="#555555")
    ax.grid(alpha=0.3)
    items = [(getattr(row, x), row.metric, label, {}) for row, label in zip(d.itertuples(), _labels(d))]
    items += [(row.ref_latency_us, row.ref_metric, "ref " + _setting(row.kind, row.m, row.r), {"color": "#666666"})
              for row in ref.itertuples()]
    _fit_labels_right(ax, items)
    _place_labels(ax, items)
    return fig


def metric_summary_figure(df: pd.DataFrame) -> Figure:
    """Bars of the main metric per run, one panel per base model, zero-shot line where a base row exists."""
    _, metric, _ = task_axes(df)
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
        sns.barplot(data=bars, x="label", y="metric", hue="kind", palette=palette, dodge=False, ax=ax,
                    hue_order=[k for k in palette if k in set(bars["kind"])])
        # Values inside the bar tops, so the reference ticks just above stay readable; above a bar too short.
        for i, value in enumerate(bars["metric"]):
            inside = value >= 10
            ax.text(i, value - 1.5 if inside else value + 1.5, f"{value:.1f}", ha="center",
                    va="top" if inside else "bottom", fontsize=8, color="white" if inside else "#333333",
                    fontweight="bold")
        ref = bars["ref_metric"].to_numpy(dtype=float)
        if np.isfinite(ref).any():
            ax.scatter(np.arange(len(bars)), ref, marker="_", s=500, linewidths=2, color="black", zorder=4,
                       label="reference (GPT-2, CUDA)")
        for row in g[(g["kind"] == "base") & g["metric"].notna()].itertuples():
            ax.axhline(row.metric, color="#333333", ls="--", lw=1.2,
                       label=f"base model, zero-shot ({row.metric:.1f})")
        ax.set_title(f"{model}", fontsize=11)
        ax.set_xlabel("")
        ax.set_ylabel(metric.label)
        ax.set_ylim(0, 100)  # accuracy in % and BLEU share the 0-100 range
        ax.tick_params(axis="x", rotation=30)
        for t in ax.get_xticklabels():
            t.set_ha("right")
            t.set_rotation_mode("anchor")
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    # One legend for all panels, outside the bars: the kinds, the reference ticks, every base line.
    legend = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    keys = [k for k in palette if k in legend] + [k for k in legend if k not in palette]
    axes[0][-1].legend([legend[k] for k in keys], keys, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1),
                       borderaxespad=0)
    fig.suptitle(f"Validation {metric.name} per run" + (" (one panel per base model)" if len(models) > 1 else ""),
                 fontsize=12)
    fig.tight_layout()
    return fig


def equiv_heatmap_figure(df: pd.DataFrame, residuals: dict[str, dict], position: str = "last") -> Figure:
    """Layers × compiled runs of the relative residual at `position` ("last", "content" or "all")."""
    names = dict(zip(df["run"], _labels(df, sep="\n")))
    order = {run: i for i, run in enumerate(df["run"])}  # the table's order: by model, then m, then r
    runs = sorted((run for run, res in residuals.items() if res and res.get(position)),
                  key=lambda run: (order.get(run, len(order)), run))
    cols = {names.get(run, run): residuals[run][position] for run in runs}
    if not cols:
        return _placeholder("Prefix → LoRA equivalence",
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
    return fig


def plot_metric_vs_latency(df: pd.DataFrame, path: Path) -> Path:
    """`metric_vs_latency_figure` saved as a PNG at `path`."""
    return save(metric_vs_latency_figure(df), path)


def plot_metric_summary(df: pd.DataFrame, path: Path) -> Path:
    """`metric_summary_figure` saved as a PNG at `path`."""
    return save(metric_summary_figure(df), path)


def plot_equiv_heatmap(df: pd.DataFrame, residuals: dict[str, dict], path: Path, position: str = "last") -> Path:
    """`equiv_heatmap_figure` saved as a PNG at `path`."""
    return save(equiv_heatmap_figure(df, residuals, position), path)
