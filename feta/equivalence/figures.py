"""The analysis figures: linearity remainders against the step, the m × r grid of energy shares outside
the prefix span, and the prefix span's singular spectrum and ranks against m.

Drawn on matplotlib's object API (Figure, not pyplot): no global backend or figure state is touched,
and PNGs render without a display.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import seaborn as sns
from matplotlib.figure import Figure

from feta.equivalence.attention import TARGETS


def draw_figures(res: dict, spectrum: dict, out_dir: Path) -> None:
    """linearity.png, span_grid.png and prefix_spectrum.png in out_dir, from the results and the σ of
    `prefix_spectrum` (which the JSON leaves out)."""
    sns.set_theme(style="whitegrid")
    lin = res["linearity"]
    fig = Figure(figsize=(11, 4.5))
    axes = fig.subplots(1, 2, sharey=True)
    titles = ("the trained prefix", f"the LoRA ({res['setup']['lora']})")
    for ax, where, title in zip(axes, ("at_prefix", "at_lora"), titles):
        for name, r in lin[where].items():
            ax.loglog(lin["eps"], np.maximum(r, 1e-17), marker="o", label=f"{name} (worst layer)")
        ax.loglog(lin["eps"], np.array(lin["eps"]) * 0.1, "k--", lw=1, label="∝ ε (first-order map)")
        ax.set(title=f"Linearity at {title}"[:70], xlabel="step ε (relative to the direction's norm)")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("remainder ‖f(θ+εx) − f(θ) − εJx‖ / ‖f(θ+εx) − f(θ)‖")
    fig.tight_layout()
    fig.savefig(out_dir / "linearity.png", dpi=150)

    span, ms, rs = res["span"], res["span"]["ms"], res["span"]["rs"]
    rows = [(key, p) for key in ("outside", "source_outside") for p in span["points"]]
    fig = Figure(figsize=(17, 3.9 * len(rows)))
    axes = fig.subplots(len(rows), 4, squeeze=False)
    for (ri, (key, p)), (ti, t) in ((a, b) for a in enumerate(rows) for b in enumerate(TARGETS)):
        ax = axes[ri, ti]
        if t not in span["points"][p][key]:
            ax.set_axis_off()
            ax.set_title(f"no LoRA on {t}")
            continue
        grid = np.array(span["points"][p][key][t], dtype=float)  # (m, r)
        grid = np.column_stack([grid, np.array(span["points"][p]["baseline"], dtype=float)])
        sns.heatmap(grid, ax=ax, vmin=0, vmax=1, annot=True, fmt=".2f", cmap="viridis", annot_kws={"fontsize": 6},
                    xticklabels=[*map(str, rs), "rand"], yticklabels=list(map(str, ms)),
                    cbar_kws={"label": "energy share outside the prefix span"})
        diag = [(rs.index(m) + 0.5, mi + 0.5) for mi, m in enumerate(ms) if m in rs]
        if diag:
            ax.plot(*zip(*diag), "r-", lw=1.5, label="r = m: where a rank bound would cut")
        what = "random rank-r LoRA" if key == "outside" else f"{res['setup']['lora'].split(',')[0]} cut to rank r"
        ax.set(title=f"{what} on {t}, {p} prefix", xlabel="LoRA rank r (last column: random vector)",
               ylabel="prefix length m (tokens)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(out_dir / "span_grid.png", dpi=110)

    fig = Figure(figsize=(12, 4.5))
    axes = fig.subplots(1, 2)
    for m, s in zip(spectrum["ms"], spectrum["spectrum"]):
        axes[0].semilogy(np.arange(1, len(s) + 1), np.maximum(s, 1e-18), label=f"m = {m}")
    axes[0].axhline(res["setup"]["rtol"], color="k", ls="--", lw=1, label=f"rank cut-off rtol = {res['setup']['rtol']:.0e}")
    axes[0].set(title=f"Prefix span spectrum, layer {spectrum['layer']} ({spectrum['point']} prefix)",
                xlabel="singular value index", ylabel="σ_i / σ_1 (ratio)")
    axes[0].legend(fontsize=7)
    for part, color in [("total", "k"), ("key", "C0"), ("value", "C1")]:
        axes[1].plot(spectrum["ms"], spectrum[f"formula_{part}"], "--", color=color, label=f"{part}: formula")
        axes[1].plot(spectrum["ms"], spectrum[f"rank_{part}"], "o", color=color, label=f"{part}: measured")
    axes[1].set(xscale="log", yscale="log", title="Rank vs m: value d·min(m, N), key m·heads·min(d_head, N)",
                xlabel="prefix length m (tokens)", ylabel="numerical rank (dimensions)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "prefix_spectrum.png", dpi=150)

