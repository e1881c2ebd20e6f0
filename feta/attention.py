"""The attention math the compile and the equivalence measurements share, per key/value head group:
masks, Llama's rotary embedding, attention with a prefix and its gating decomposition.

Tensors in, tensors out: no modules, hooks or I/O.
"""

from __future__ import annotations

import torch
from torch import Tensor


def content_allowed(attention_mask: Tensor) -> Tensor:
    """(B, T, T) bool: query t may attend content key s (causal, real key). The diagonal is always
    allowed, so no row is empty (pad rows are never measured)."""
    T = attention_mask.shape[1]
    eye = torch.eye(T, dtype=torch.bool, device=attention_mask.device)
    return (torch.ones_like(eye).tril() & attention_mask.bool()[:, None, :]) | eye


def additive_mask(allowed: Tensor, m: int, dtype: torch.dtype, keep: str = "all") -> Tensor:
    """(B, 1, T, m + T) additive mask for the real module, prefix columns first as in the KV cache.
    keep="content" blocks the prefix; keep="prefix" blocks every content key."""
    low = torch.finfo(dtype).min  # finite, so a fully blocked row stays finite (never measured)
    content = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed | (keep == "prefix"), low)
    prefix = torch.full((*allowed.shape[:2], m), low if keep == "content" else 0.0, dtype=dtype)
    return torch.cat([prefix, content], dim=-1)[:, None]


def rotate(t: Tensor, cos: Tensor | None, sin: Tensor | None) -> Tensor:
    """Llama's rotary embedding t·cos + rotate_half(t)·sin, linear in t; identity without rotary (GPT-2).
    t (B, T, dh) or (B, heads, T, dh); cos, sin (B or 1, T, dh)."""
    if cos is None:
        return t
    if t.dim() == 4:
        cos, sin = cos[:, None], sin[:, None]
    half = t.shape[-1] // 2
    return t * cos + torch.cat([-t[..., half:], t[..., :half]], dim=-1) * sin


def scores(q: Tensor, k: Tensor, pk: Tensor, allowed: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Prefix and content attention logits, (B, g, T, m) and (B, g, T, T), blocked content pairs at the minimum."""
    s_p = scale * torch.einsum("bgtd,md->bgtm", q, pk)  # (B, g, T, m)
    s_c = scale * torch.einsum("bgtd,bsd->bgts", q, k)  # (B, g, T, T)
    return s_p, s_c.masked_fill(~allowed[:, None], torch.finfo(q.dtype).min)


def attend(q: Tensor, k: Tensor, v: Tensor, pk: Tensor, pv: Tensor, allowed: Tensor, scale: float) -> Tensor:
    """One key/value head group with a prefix: q (B, g, T, dh); k, v (B, T, dh); pk, pv (m, dh) ->
    z (B, g, T, dh). One softmax over [prefix; content], as with a KV cache."""
    s_p, s_c = scores(q, k, pk, allowed, scale)
    a = torch.softmax(torch.cat([s_p, s_c], dim=-1), dim=-1)  # (B, g, T, m + T)
    m = pk.shape[0]
    return torch.einsum("bgtm,md->bgtd", a[..., :m], pv) + torch.einsum("bgts,bsd->bgtd", a[..., m:], v)


def gate(q: Tensor, k: Tensor, v: Tensor, pk: Tensor, pv: Tensor, allowed: Tensor,
         scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """The gating decomposition: λ (B, g, T), Attn(content) and Attn(prefix) (B, g, T, dh), each a softmax
    over its own keys. λ comes from the log-sum-exps, never from the mixed output."""
    s_p, s_c = scores(q, k, pk, allowed, scale)
    lam = torch.sigmoid(torch.logsumexp(s_p, -1) - torch.logsumexp(s_c, -1))  # (B, g, T)
    z_content = torch.einsum("bgts,bsd->bgtd", torch.softmax(s_c, -1), v)
    z_prefix = torch.einsum("bgtm,md->bgtd", torch.softmax(s_p, -1), pv)
    return lam, z_content, z_prefix
