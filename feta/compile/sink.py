"""`method=sink`: fold a prefix into the attention sink's key/value slot, in closed form.

Per head, a prefix takes a query-dependent share λ_t of the attention away from the content and spends
it on its own values; no map of the attention output reproduces a query-dependent gate. But every
sequence already holds a slot that attention treats as a constant: the attention sink (in SmolLM2 the
first token, position 0, where RoPE is the identity). The prefix's m slots and the sink merge into it,
per layer and key/value head:

- key: a new sink key k_sink + δ_k with, for the calibration queries (every query head of the group,
  every content token t, rows weighted by the merged attention mass),
      q_t·(k_sink + δ_k)/√d ≈ logsumexp(q_t·k_sink/√d, q'_t·k_p1/√d, …, q'_t·k_pm/√d)
  (q'_t: the same query rotated to the prefix model's position m + t): a linear least squares in δ_k;
  then every content key keeps exactly its share of attention;
- value: the sink value v_sink + δ_v, the least-squares compromise (weights mass²) of the
  prefix-weighted mix of {v_sink, v_p1…v_pm} over those queries;
- edit: δ_k and δ_v become rank-1 LoRAs on k_proj and v_proj, ΔW = δ uᵀ, with u solving uᵀx_sink = 1
  and uᵀx_t ≈ 0 on every later input (ridge), so they act on the first token's slot alone. "Every later
  input" includes the later sinks that long inputs grow (AG News: ~1 per article): their states resemble
  the first token's, and an edit left free on them would hand them the prefix's share of attention too.
Layers are fitted from the bottom, each on the inputs the already edited layers produce
(feta/compile/layers.py); the `o_proj` rank-r fit then runs on top, for what is left.
The targets come from the prefix's keys and values as PEFT caches them, against the compiled model's own
queries: no gradient steps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from feta.attention import rotate

# PEFT kinds whose source is key/value slots in every layer (feta/compile/views.py).
SLOT_KINDS = ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING")
# Ridges, relative to the mean eigenvalue of the Gram matrix: the key fit is well posed (rows ≫ d_head),
# the sink direction u needs more, since content inputs span most directions.
KEY_RIDGE = 1e-6
EDIT_RIDGE = 1e-3
# The sink rows of the edit's least squares count this much more than all content rows together.
SINK_WEIGHT = 100.0


# ---------------------------------------------------------------------------------------------
# Pure math, per key/value head: rows are (query head of the group, content token) pairs. Each fit adds
# its rows' float64 sums micro-batch by micro-batch, then solves once (the same fit as on all rows at once).


class KeyValueStats:
    """The sums the merged key and value of one key/value head need, over every micro-batch's rows."""

    def __init__(self) -> None:
        self.parts: dict[str, Tensor | float] = {}

    def add(self, q: Tensor, q_shift: Tensor, k_sink: Tensor, v_sink: Tensor, pk: Tensor, pv: Tensor,
            content_lse: Tensor, scale: float) -> None:
        """q: (n, d) queries at the compiled positions; q_shift: the same at the prefix model's positions;
        k_sink, v_sink: (n, d) the sink's key and value in each row's sequence; pk, pv: (m, d) the prefix;
        content_lse: (n,) logsumexp of each query's logits over its content keys (for the merged mass)."""
        q, q_shift, k_sink, v_sink, pk, pv, content_lse = (t.double() for t in (q, q_shift, k_sink, v_sink, pk, pv,
                                                                                 content_lse))
        s_sink = (q * k_sink).sum(-1) * scale  # (n,)
        logits = torch.cat([s_sink[:, None], q_shift @ pk.T * scale], 1)  # (n, 1 + m)
        lse = torch.logsumexp(logits, 1)  # (n,) the merged slot's logit
        mass = torch.sigmoid(lse - content_lse)  # share of attention the sink + prefix take
        A, y = q * scale, lse - s_sink  # q_t·δ_k·scale ≈ lse − s_sink
        mix_w = torch.softmax(logits, 1)  # (n, 1 + m)
        mix = mix_w[:, :1] * v_sink + mix_w[:, 1:] @ pv  # (n, d) what the prefix model's slots return
        w2 = mass.pow(2)
        sums = {"gram": (A * mass[:, None]).T @ A, "rhs": (A * mass[:, None]).T @ y, "yy": (mass * y * y).sum(),
                "mass": mass.sum(), "rows": float(len(mass)), "v_num": (w2[:, None] * (mix - v_sink)).sum(0),
                "w2": w2.sum()}
        for key, value in sums.items():
            self.parts[key] = self.parts[key] + value if key in self.parts else value

    def solve(self) -> tuple[Tensor, Tensor, dict[str, float]]:
        """δ_k, δ_v (d,) that merge the prefix into the sink slot, and the key fit's residual."""
        p = self.parts
        gram = p["gram"]
        ridge = KEY_RIDGE * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        delta_k = torch.linalg.solve(gram + ridge, p["rhs"])
        delta_v = p["v_num"] / p["w2"]
        err = float(delta_k @ gram @ delta_k - 2 * delta_k @ p["rhs"] + p["yy"])  # Σ mass·(q·δ_k·scale − y)²
        stats = {"key_fit_residual": max(err, 0.0) ** 0.5 / max(float(p["yy"]), 1e-60) ** 0.5,
                 "mass_mean": float(p["mass"]) / p["rows"]}
        return delta_k, delta_v, stats


def merged_key_value(q: Tensor, q_shift: Tensor, k_sink: Tensor, v_sink: Tensor, pk: Tensor, pv: Tensor,
                     content_lse: Tensor, scale: float) -> tuple[Tensor, Tensor, dict[str, float]]:
    """δ_k, δ_v (d,) that merge the prefix (pk, pv: (m, d)) into the sink slot, from rows held at once
    (see KeyValueStats.add)."""
    stats = KeyValueStats()
    stats.add(q, q_shift, k_sink, v_sink, pk, pv, content_lse, scale)
    return stats.solve()


class DirectionStats:
    """The sums the sink direction u needs: X_rᵀX_r over every later input, X_sᵀX_s and ΣX_s over the
    first-token inputs."""

    def __init__(self) -> None:
        self.rr = self.ss = self.s = None
        self.n_rest = self.n_sink = 0

    def add(self, x_rest: Tensor, x_sink: Tensor) -> None:
        X_r, X_s = x_rest.double(), x_sink.double()
        parts = (X_r.T @ X_r, X_s.T @ X_s, X_s.sum(0))
        self.rr, self.ss, self.s = parts if self.rr is None else (self.rr + parts[0], self.ss + parts[1], self.s + parts[2])
        self.n_rest, self.n_sink = self.n_rest + X_r.shape[0], self.n_sink + X_s.shape[0]

    def solve(self) -> tuple[Tensor, dict[str, float]]:
        """u (D,) with uᵀx_sink ≈ 1 for every first-token input and uᵀx ≈ 0 for the rest: the ridge solution
        of min ‖X_r u‖² + β‖X_s u − 1‖² + λ‖u‖² (β = SINK_WEIGHT · n_rest / n_sink), and the rms leak."""
        beta = SINK_WEIGHT * self.n_rest / max(self.n_sink, 1)
        gram = self.rr + beta * self.ss
        lam = EDIT_RIDGE * gram.diagonal().mean()
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        u = torch.linalg.solve(gram + lam * eye, beta * self.s)
        u = u / (self.s @ u / self.n_sink)  # exactly 1 on the mean sink input
        return u, {"leak_rms": max(float(u @ self.rr @ u), 0.0) ** 0.5 / max(self.n_rest, 1) ** 0.5}


def leak(u: Tensor, x_rest: Tensor, x_sink: Tensor) -> dict[str, float]:
    """How far u is from acting on the first token alone, on these rows: the largest |uᵀx| of a later
    input and the smallest uᵀx_sink."""
    return {"leak_max": float((x_rest.double() @ u).abs().max()) if len(x_rest) else 0.0,
            "sink_gain_min": float((x_sink.double() @ u).min())}


def sink_direction(x_rest: Tensor, x_sink: Tensor) -> tuple[Tensor, dict[str, float]]:
    """u (see DirectionStats.solve) from rows held at once: x_rest (n, D) every later input, x_sink the
    first-token inputs."""
    stats = DirectionStats()
    stats.add(x_rest, x_sink)
    u, record = stats.solve()
    return u, {**record, **leak(u, x_rest, x_sink)}


# ---------------------------------------------------------------------------------------------
# One layer of a Llama-style model: what a micro-batch contributes, and the fit over all of them.


def collect_rows(attn, rotary, hidden: Tensor, position_embeddings: tuple[Tensor, Tensor], mask: Tensor, m: int,
                 content: Tensor) -> dict[str, Any]:
    """This micro-batch's rows for layer `attn`: per key/value head, the queries (compiled and prefix
    positions), the sink's key and value, the content logsumexp; and the inputs x at the first position
    and at every later real one. hidden: (B, T, D) the attention's input (after its norm); mask: (B, T)
    bool, the real tokens; content: (B, T) bool, the query rows (real tokens that are not sinks)."""
    B, T, _ = hidden.shape
    d, n_kv = attn.head_dim, attn.config.num_key_value_heads
    group = attn.num_key_value_groups
    q = attn.q_proj(hidden).view(B, T, -1, d).transpose(1, 2)  # (B, H, T, d)
    k = attn.k_proj(hidden).view(B, T, -1, d).transpose(1, 2)  # (B, n_kv, T, d)
    v = attn.v_proj(hidden).view(B, T, -1, d).transpose(1, 2)
    cos, sin = position_embeddings
    positions = torch.arange(T, device=hidden.device)[None].expand(B, T)
    cos_m, sin_m = rotary(hidden, positions + m)  # the prefix model's positions m + t
    q_rot, q_shift, k_rot = rotate(q, cos, sin), rotate(q, cos_m, sin_m), rotate(k, cos, sin)
    # Content keys: real tokens after the sink, causal.
    keys = mask.clone()
    keys[:, 0] = False
    causal = torch.ones(T, T, dtype=torch.bool, device=hidden.device).tril()
    allowed = keys[:, None, None, :] & causal[None, None]  # (B, 1, T, T)
    rows = {}
    for g in range(n_kv):
        heads = slice(g * group, (g + 1) * group)
        logits = q_rot[:, heads] @ k_rot[:, g, None].transpose(-1, -2) * attn.scaling  # (B, group, T, T)
        lse = torch.logsumexp(logits.masked_fill(~allowed, float("-inf")), -1)  # (B, group, T)
        sel = content[:, None].expand(B, group, T)  # (B, group, T)
        k0 = k_rot[:, g, 0][:, None, None].expand(B, group, T, d)
        v0 = v[:, g, 0][:, None, None].expand(B, group, T, d)
        rows[g] = {"q": q_rot[:, heads][sel], "q_shift": q_shift[:, heads][sel], "k_sink": k0[sel],
                   "v_sink": v0[sel], "lse": lse[sel]}
    return {"heads": rows, "x_rest": hidden[keys], "x_sink": hidden[:, 0]}


class LayerStats:
    """One layer's sums over every micro-batch's rows (collect_rows): a KeyValueStats per key/value head
    and the DirectionStats of the edit. pk, pv: (n_kv, m, d), the prefix's keys and values at this layer."""

    def __init__(self, pk: Tensor, pv: Tensor, scale: float) -> None:
        self.pk, self.pv, self.scale = pk, pv, scale
        self.heads = [KeyValueStats() for _ in range(pk.shape[0])]
        self.direction = DirectionStats()

    def add(self, rows: dict[str, Any]) -> None:
        for g, head in enumerate(self.heads):
            r = rows["heads"][g]
            head.add(r["q"], r["q_shift"], r["k_sink"], r["v_sink"], self.pk[g], self.pv[g], r["lse"], self.scale)
        self.direction.add(rows["x_rest"], rows["x_sink"])

    def solve(self) -> tuple[Tensor, Tensor, Tensor, dict]:
        """(δ_k, δ_v over all key/value heads (n_kv·d,), u (D,), stats)."""
        solved = [head.solve() for head in self.heads]
        u, edit = self.direction.solve()
        stats = {f"head{g}": s for g, (_, _, s) in enumerate(solved)}
        return torch.cat([dk for dk, _, _ in solved]), torch.cat([dv for _, dv, _ in solved]), u, {**edit, **stats}


def fit_layer(parts: list[dict[str, Any]], pk: Tensor, pv: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor, dict]:
    """LayerStats over the micro-batches' rows `parts` held at once, solved, with the edit's leak on them."""
    stats = LayerStats(pk, pv, scale)
    for rows in parts:
        stats.add(rows)
    dk, dv, u, record = stats.solve()
    x_rest, x_sink = (torch.cat([p[key] for p in parts]) for key in ("x_rest", "x_sink"))
    return dk, dv, u, {**record, **leak(u, x_rest, x_sink)}


def supports(peft_type: str, arch: str) -> str | None:
    """None when method=sink applies to this source, else the reason it does not."""
    if arch != "llama":
        return (f"{arch} has absolute position embeddings and no rotary-identity sink slot; the sink fit is "
                "written for rotary (Llama-style) attention")
    if peft_type not in SLOT_KINDS:
        return f"a {peft_type} adapter has no key/value slots to merge (its gated attention has its own softmax)"
    return None
