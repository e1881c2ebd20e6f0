"""The verdicts: what the measurements say about each FETA statement, and what the m × r grid says
about r and m. Every threshold a verdict turns on is named here.
"""

from __future__ import annotations

import torch

from feta.equivalence.attention import TARGETS

# Gating identity: max |module output − (1−λ)·Attn(content) − λ·Attn(prefix)| that still counts as exact.
GATING_TOL_FLOAT64 = 1e-12  # float64 all the way: the two sides differ by roundoff only
GATING_TOL_EAGER_FP32_SOFTMAX = 1e-6  # Llama's eager attention runs its softmax in float32 even on float64
GATING_TOL_LOW_PRECISION = 2e-6  # the analysis itself run below float64
# Linearity: a map linear to first order has a remainder that falls ∝ ε, i.e. ÷10 per decade of ε;
# the median fall per decade must lie in this range for the prefix, q and k.
LINEAR_DECAY_MIN, LINEAR_DECAY_MAX = 5, 20
EXACT_LINEAR_MAX = 1e-10  # v and o are exactly linear in ΔW: their remainders must stay at roundoff
# Content ratios: max |Δ log(a_ij / a_ik)| below this counts as kept (the prefix), above it as changed (LoRA q/k).
RATIO_CHANGE_TOL = 1e-8
# Conversion: a best held-out relative residual above this means the fit is only a projection.
CONVERSION_HELDOUT_MAX = 0.1
# The r = m boundary: a row of the grid shows one if every r ≤ m has an energy share outside the prefix
# span below SPAN_INSIDE_MAX (reproduced) and some r > m a share above SPAN_OUTSIDE_MIN (clearly not).
SPAN_INSIDE_MAX = 0.01
SPAN_OUTSIDE_MIN = 0.1


def gating_tol(dtype: torch.dtype, eager_fp32_softmax: bool) -> float:
    """The gating identity's tolerance for an analysis in `dtype`, through attention whose softmax may
    run in float32 (Llama's eager implementation)."""
    if dtype != torch.float64:
        return GATING_TOL_LOW_PRECISION
    return GATING_TOL_EAGER_FP32_SOFTMAX if eager_fp32_softmax else GATING_TOL_FLOAT64


def grid_summary(span: dict, ms: list[int], rs: list[int]) -> None:
    """What the grid says about r and m: per target, the mean change of the share outside from the
    smallest to the largest r (random directions, and the LoRA source cut to rank r) and from the
    smallest to the largest m (text init, mean over r); and whether any row shows an r = m boundary
    (every r ≤ m inside the span, some r > m clearly outside). Adds the keys to `span`."""
    grids = {key: {t: torch.tensor([p[key][t] for p in span["points"].values()], dtype=torch.float64)
                   for t in span["points"]["text"][key]} for key in ("outside", "source_outside")}
    for key, name in (("outside", "r_trend"), ("source_outside", "r_trend_source")):
        span[name] = {t: float((g[..., -1] - g[..., 0]).nanmean()) for t, g in grids[key].items()}
    text = span["points"]["text"]["outside"]
    span["m_trend"] = {t: [float(torch.tensor(text[t][i]).mean()) for i in (0, -1)] for t in TARGETS}
    below = lambda m: [ri for ri, r in enumerate(rs) if r <= m]  # noqa: E731
    above = lambda m: [ri for ri, r in enumerate(rs) if r > m]  # noqa: E731
    span["boundary_at_r_eq_m"] = any(
        bool((row[below(m)] < SPAN_INSIDE_MAX).all() and (row[above(m)] > SPAN_OUTSIDE_MIN).any())
        for kind in grids.values() for g in kind.values() for point in g for m, row in zip(ms, point)
        if below(m) and above(m) and not row.isnan().any())


def verdicts(res: dict) -> list[dict[str, str]]:
    """One row per statement: what it says, what was measured, and the verdict."""
    gat, lin, span, conv = res["gating"], res["linearity"], res["span"], res["conversion"]
    decay = {k: v for k, v in lin["decay"].items() if k in ("prefix", "q", "k")}
    flat = max(max(lin[w][t]) for w in ("at_prefix", "at_lora") for t in ("v", "o"))
    worst = {k: max((row[k] for row in res["content_ratios"] if k in row), default=float("nan"))
             for k in ("prefix_fixed_inputs", "lora_q", "lora_k")}  # NaN: the LoRA has no such target
    best = {}
    for way in ("prefix_to_lora", "lora_to_prefix"):
        cands = [(min(v["heldout"]), t + " (vacuous)" * v["vacuous"], v["fit"][v["heldout"].index(min(v["heldout"]))])
                 for t, v in conv[way].items()]
        best[way] = min(cands) if cands else None
    trend = ", ".join(f"{t} {v:+.2f}" for t, v in span["r_trend"].items())
    trend_src = ", ".join(f"{t} {v:+.2f}" for t, v in span["r_trend_source"].items())
    m_trend = ", ".join(f"{t} {a:.2f}→{b:.2f}" for t, (a, b) in span["m_trend"].items())
    lora_worst = max(v for v in (worst["lora_q"], worst["lora_k"], 0.0) if v == v)  # skip NaN
    return [
        {"statement": "gating identity (He et al. 2022)",
         "measured": f"max err {gat['max_abs_err']:.1e} (tol {gat['tol']:.0e}), "
                     f"λ in [{gat['lam_min']:.2f}, {gat['lam_max']:.2f}]",
         "verdict": "exact" if gat["max_abs_err"] <= gat["tol"] else "VIOLATED"},
        {"statement": "1. each method induces a linear map",
         "measured": ", ".join(f"{k} ÷{v:.1f}/decade" for k, v in decay.items()) + f"; v, o ≤ {flat:.0e}",
         "verdict": "true: prefix, q, k to first order; v, o exactly"
         if all(LINEAR_DECAY_MIN <= v <= LINEAR_DECAY_MAX for v in decay.values()) and flat <= EXACT_LINEAR_MAX
         else "not as expected: see linearity.png"},
        {"statement": "2'. a prefix keeps content attention ratios, LoRA q/k changes them",
         "measured": f"prefix {worst['prefix_fixed_inputs']:.0e}; LoRA "
                     + ", ".join(f"{t} " + ("n/a" if worst[f"lora_{t}"] != worst[f"lora_{t}"] else f"{worst[f'lora_{t}']:.1e}")
                                 for t in ("q", "k")),
         "verdict": "true" if worst["prefix_fixed_inputs"] < RATIO_CHANGE_TOL < lora_worst else "not as expected"},
        {"statement": "3. least squares converts between them at fixed data",
         "measured": "; ".join(f"{w} best {b[1]}: fit {b[2]:.2f}, held-out {b[0]:.2f}" for w, b in best.items() if b),
         "verdict": "not computed" if not any(best.values()) else "only as a projection"
         if any(b and b[0] > CONVERSION_HELDOUT_MAX for b in best.values()) else "converts"},
        {"statement": "4. prefix length m cannot reproduce LoRA rank > m",
         "measured": f"share outside at m = {span['ms'][0]}→{span['ms'][-1]} (text init): {m_trend}; "
                     f"r = {span['rs'][-1]} minus r = {span['rs'][0]}: random {trend}, LoRA source {trend_src}; "
                     f"r = m boundary: {span['boundary_at_r_eq_m']}",
         "verdict": "boundary at r = m: see span_grid.png" if span["boundary_at_r_eq_m"]
         else "false as stated: no r = m boundary"},
    ]

