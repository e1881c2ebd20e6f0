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
Layers are fitted from the bottom, each on the inputs the already edited layers produce (the barrier
scheme of feta/compile/fit.py); the `o_proj` rank-r fit then runs on top, for what is left.
The targets come from the prefix's keys and values as PEFT caches them, against the compiled model's own
queries: no gradient steps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from feta.equivalence.attention import rotate

# Ridges, relative to the mean eigenvalue of the Gram matrix: the key fit is well posed (rows ≫ d_head),
# the sink direction u needs more, since content inputs span most directions.
KEY_RIDGE = 1e-6
EDIT_RIDGE = 1e-3
# The sink rows of the edit's least squares count this much more than all content rows together.
SINK_WEIGHT = 100.0


# ---------------------------------------------------------------------------------------------
# Pure math, per key/value head: rows are (query head of the group, content token) pairs.


def merged_key_value(q: Tensor, q_shift: Tensor, k_sink: Tensor, v_sink: Tensor, pk: Tensor, pv: Tensor,
                     content_lse: Tensor, scale: float) -> tuple[Tensor, Tensor, dict[str, float]]:
    """δ_k, δ_v (d,) that merge the prefix (pk, pv: (m, d)) into the sink slot.

    q: (n, d) queries at the compiled positions; q_shift: the same at the prefix model's positions;
    k_sink, v_sink: (n, d) the sink's key and value in each row's sequence; content_lse: (n,) logsumexp of
    each query's logits over its content keys (for the merged attention mass). float64 inside.
    """
    q, q_shift, k_sink, v_sink, pk, pv, content_lse = (t.double() for t in (q, q_shift, k_sink, v_sink, pk, pv, content_lse))
    s_sink = (q * k_sink).sum(-1) * scale  # (n,)
    s_prefix = q_shift @ pk.T * scale  # (n, m)
    logits = torch.cat([s_sink[:, None], s_prefix], 1)  # (n, 1 + m)
    lse = torch.logsumexp(logits, 1)  # (n,) the merged slot's logit
    mass = torch.sigmoid(lse - content_lse)  # share of attention the sink + prefix take
    A, y = q * scale, lse - s_sink  # q_t·δ_k·scale ≈ lse − s_sink
    gram = (A * mass[:, None]).T @ A
    ridge = KEY_RIDGE * gram.diagonal().mean() * torch.eye(A.shape[1], dtype=A.dtype)
    delta_k = torch.linalg.solve(gram + ridge, (A * mass[:, None]).T @ y)
    mix_w = torch.softmax(logits, 1)  # (n, 1 + m)
    mix = mix_w[:, :1] * v_sink + mix_w[:, 1:] @ pv  # (n, d) what the prefix model's slots return
    w2 = mass.pow(2)
    delta_v = (w2[:, None] * (mix - v_sink)).sum(0) / w2.sum()
    resid = (A @ delta_k - y) * mass.sqrt()
    stats = {"key_fit_residual": float(resid.norm() / (y * mass.sqrt()).norm().clamp_min(1e-30)),
             "mass_mean": float(mass.mean())}
    return delta_k, delta_v, stats


def sink_direction(x_rest: Tensor, x_sink: Tensor) -> tuple[Tensor, dict[str, float]]:
    """u (D,) with uᵀx_sink ≈ 1 for every first-token input (rows of x_sink) and uᵀx ≈ 0 for the rest:
    the ridge solution of min ‖X_r u‖² + β‖X_s u − 1‖² + λ‖u‖² (β = SINK_WEIGHT · n_rest / n_sink)."""
    X_r, X_s = x_rest.double(), x_sink.double()
    beta = SINK_WEIGHT * X_r.shape[0] / max(X_s.shape[0], 1)
    gram = X_r.T @ X_r + beta * X_s.T @ X_s
    lam = EDIT_RIDGE * gram.diagonal().mean()
    u = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), beta * X_s.sum(0))
    u = u / (X_s @ u).mean()  # exactly 1 on the mean sink input
    leak = X_r @ u
    return u, {"leak_rms": float(leak.pow(2).mean().sqrt()), "leak_max": float(leak.abs().max()),
               "sink_gain_min": float((X_s @ u).min())}


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


def fit_layer(parts: list[dict[str, Any]], pk: Tensor, pv: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor, dict]:
    """(δ_k, δ_v over all key/value heads (n_kv·d,), u (D,), stats) from every micro-batch's rows.
    pk, pv: (n_kv, m, d), the prefix's keys and values at this layer."""
    deltas_k, deltas_v, stats = [], [], {}
    for g in range(pk.shape[0]):
        cat = {key: torch.cat([p["heads"][g][key] for p in parts]) for key in parts[0]["heads"][g]}
        dk, dv, s = merged_key_value(cat["q"], cat["q_shift"], cat["k_sink"], cat["v_sink"], pk[g], pv[g], cat["lse"],
                                     scale)
        deltas_k.append(dk)
        deltas_v.append(dv)
        stats[f"head{g}"] = s
    u, edit = sink_direction(torch.cat([p["x_rest"] for p in parts]), torch.cat([p["x_sink"] for p in parts]))
    return torch.cat(deltas_k), torch.cat(deltas_v), u, {**edit, **stats}


@torch.no_grad()
def prefix_key_values(prefix_model, m: int) -> list[tuple[Tensor, Tensor]]:
    """Per layer, the m virtual slots' keys and values (n_kv, m, d), as the adapted model attends to them.
    A prefix stores them (PEFT's get_prompt); a soft prompt's are computed from its virtual tokens, which
    come first and so do not depend on the input."""
    config = prefix_model.active_peft_config
    if config.peft_type.value == "PREFIX_TUNING":
        return [(layer.keys[0], layer.values[0]) for layer in prefix_model.get_prompt(batch_size=1).layers]
    out = prefix_model(input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=True)
    cache = out.get("past_key_values") or out.get("cache")
    return [(layer.keys[0, :, :m], layer.values[0, :, :m]) for layer in cache.layers]


def supports(prefix_model, arch: str) -> str | None:
    """None when method=sink applies to this source, else the reason it does not."""
    if arch != "llama":
        return (f"{arch} has absolute position embeddings and no rotary-identity sink slot; the sink fit is "
                "written for rotary (Llama-style) attention")
    kind = prefix_model.active_peft_config.peft_type.value
    if kind not in ("PREFIX_TUNING", "PROMPT_TUNING"):
        return f"a {kind} adapter has no key/value slots to merge"
    return None
