"""The FETA science: where a prefix (token adaptation) and LoRA (weight adaptation) agree, and where not.

Measured one attention layer at a time, at fixed data, in float64, with Jacobians from torch.func
(jvp, vmap); the library never takes a finite difference. What is linearized, and where:

point    a prefix (the trained one, or the base model's KV of a text: "text init") with base weights,
         or base weights + a LoRA's ΔW (the trained LoRA, or a stated random one);
inputs   the layer's input hidden states (after its norm), captured from the model run *at that point*;
outputs  the attention output at real tokens: per key/value head group *before* o_proj for spans and
         conversion (whole-layer Jacobians of a real model do not fit in memory; a group's prefix only
         reaches that group's outputs, so per-group energies pool exactly), the module's output after
         o_proj for the gating identity and linearity.

A prefix gives each key/value head m extra keys P_k and values P_v (m, d_head), and each query mixes
    z = (1 − λ)·Attn(content) + λ·Attn(prefix),   λ = σ(LSE_prefix − LSE_content)   (He et al. 2022),
so the ratios of attention among content tokens cannot change. LoRA moves W_q, W_k, W_v or W_o by ΔW.
Attention runs through the real transformers modules (GPT2Attention; LlamaAttention with GQA and
rotary), sdpa on its math backend (the one with forward-mode AD; exact in float64), or eager if the
model is configured so (Llama's eager softmax runs in float32: errors ~1e-7 instead of ~1e-16).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from torch.func import functional_call, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache

TARGETS = ("q", "k", "v", "o")
EPS = (1e-1, 1e-2, 1e-3, 1e-4)  # linearity steps, relative to the direction's norm
ALPHAS = (0.0, 1e-6, 1e-4, 1e-2)  # ridge strengths, in units of σ_max² of the fitted Jacobian


# ----------------------------------------------------------------------------------------------------
# Pure tensor math: one attention layer, per key/value head group. No modules, hooks or I/O.
# ----------------------------------------------------------------------------------------------------

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


def _scores(q: Tensor, k: Tensor, pk: Tensor, allowed: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    s_p = scale * torch.einsum("bgtd,md->bgtm", q, pk)  # (B, g, T, m)
    s_c = scale * torch.einsum("bgtd,bsd->bgts", q, k)  # (B, g, T, T)
    return s_p, s_c.masked_fill(~allowed[:, None], torch.finfo(q.dtype).min)


def attend(q: Tensor, k: Tensor, v: Tensor, pk: Tensor, pv: Tensor, allowed: Tensor, scale: float) -> Tensor:
    """One key/value head group with a prefix: q (B, g, T, dh); k, v (B, T, dh); pk, pv (m, dh) ->
    z (B, g, T, dh). One softmax over [prefix; content], as with a KV cache."""
    s_p, s_c = _scores(q, k, pk, allowed, scale)
    a = torch.softmax(torch.cat([s_p, s_c], dim=-1), dim=-1)  # (B, g, T, m + T)
    m = pk.shape[0]
    return torch.einsum("bgtm,md->bgtd", a[..., :m], pv) + torch.einsum("bgts,bsd->bgtd", a[..., m:], v)


def gate(q: Tensor, k: Tensor, v: Tensor, pk: Tensor, pv: Tensor, allowed: Tensor, scale: float):
    """The gating decomposition: λ (B, g, T), Attn(content) and Attn(prefix) (B, g, T, dh), each a softmax
    over its own keys. λ comes from the log-sum-exps, never from the mixed output."""
    s_p, s_c = _scores(q, k, pk, allowed, scale)
    lam = torch.sigmoid(torch.logsumexp(s_p, -1) - torch.logsumexp(s_c, -1))  # (B, g, T)
    z_content = torch.einsum("bgts,bsd->bgtd", torch.softmax(s_c, -1), v)
    z_prefix = torch.einsum("bgtm,md->bgtd", torch.softmax(s_p, -1), pv)
    return lam, z_content, z_prefix


def content_log_attention(q: Tensor, k: Tensor, pk: Tensor, allowed: Tensor, scale: float) -> Tensor:
    """log attention among content keys, renormalized over content: (B, H, T, T). q, k (B, H, T, dh),
    key heads already repeated; pk (H, m, dh), m may be 0. Taken from the full softmax over
    [prefix; content], so a prefix's effect on the ratios is measured, not assumed."""
    s_p = scale * torch.einsum("bhtd,hmd->bhtm", q, pk)
    s_c = (scale * q @ k.transpose(-1, -2)).masked_fill(~allowed[:, None], torch.finfo(q.dtype).min)
    log_a = torch.log_softmax(torch.cat([s_p, s_c], -1), -1)[..., pk.shape[1]:]  # (B, H, T, T)
    return log_a - torch.logsumexp(log_a, -1, keepdim=True)


def ratio_change(log_a: Tensor, log_b: Tensor, allowed: Tensor, valid: Tensor) -> float:
    """max |log a − log b| over allowed pairs of real queries: 0 iff no ratio a_ij / a_ik changed."""
    keep = (allowed & valid[:, :, None])[:, None].expand_as(log_a)
    return float((log_a - log_b)[keep].abs().max())


def rank_formulas(m: int, N: int, d_head: int, g: int = 1) -> dict[str, int]:
    """Rank of one key/value head's prefix span for N query positions and g query heads per key head.
    value part: δz_i = Σ_j a_ij δv_j, the (gN × m) prefix attention ⊗ I_dh: dh·min(m, gN);
    key part: δz_i = s·a_ij (v_j − z_i) q_i·δk_j, rank ≤ min(dh, gN) per prefix token. All are capped
    by the output dimension gN·dh (reached by the key part once m > gN)."""
    dim = g * N * d_head
    value, key = d_head * min(m, g * N), min(m * min(d_head, g * N), dim)
    return {"value": value, "key": key, "total": min(value + key, dim)}


def span_basis(J: Tensor, rtol: float) -> tuple[Tensor, Tensor]:
    """Orthonormal basis (rows, rank) of J's columns with σ > rtol·σ_max, and all singular values."""
    U, s, _ = torch.linalg.svd(J, full_matrices=False)
    return U[:, : int((s > rtol * s[0]).sum()) if s[0] > 0 else 0], s


def outside_energy(U: Tensor, delta: Tensor) -> tuple[float, float]:
    """(‖δ − U Uᵀ δ‖², ‖δ‖²): δ's energy outside span(U), and its total (so that shares pool)."""
    return float((delta - U @ (U.T @ delta)).pow(2).sum()), float(delta.pow(2).sum())


def ridge_residuals(J_fit: Tensor, Y_fit: Tensor, J_held: Tensor, Y_held: Tensor, rtol: float = 1e-10) -> Tensor:
    """Squared residuals of W(α) = argmin ‖J_fit W − Y_fit‖² + α σ_max² ‖W‖², on the fit rows and on
    held-out rows, (len(ALPHAS), 2, k) for k right-hand sides Y (rows, k). α = 0 is the minimum-norm
    least-squares fit (σ < rtol·σ_max dropped). float64: the small σ decide the held-out error."""
    U, s, Vh = torch.linalg.svd(J_fit, full_matrices=False)
    C = U.T @ Y_fit  # (rank, k)
    out = []
    for alpha in ALPHAS:
        f = torch.where(s > rtol * s[0], 1 / s, 0) if alpha == 0 else s / (s**2 + alpha * s[0] ** 2)
        W = Vh.T @ (f[:, None] * C)  # (cols, k)
        out.append(torch.stack([(J_fit @ W - Y_fit).pow(2).sum(0), (J_held @ W - Y_held).pow(2).sum(0)]))
    return torch.stack(out)


def remainders(f: Callable[[Tensor], Tensor], theta0: Tensor, x: Tensor, eps=EPS) -> list[float]:
    """‖f(θ₀+εx) − f(θ₀) − εJx‖ / ‖f(θ₀+εx) − f(θ₀)‖ per ε, Jx from one jvp. Falls ∝ ε for
    a map linear to first order; stays at roundoff for an exactly linear one."""
    f0, Jx = jvp(f, (theta0,), (x,))
    return [float((f(theta0 + e * x) - f0 - e * Jx).norm() / (f(theta0 + e * x) - f0).norm()) for e in eps]


def random_lowrank(shape: tuple[int, ...], r: int, gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    """B·A with Gaussian B (out, r) and A (r, in), unit Frobenius norm: a random rank-r LoRA direction."""
    W = torch.randn(shape[0], r, generator=gen, dtype=dtype) @ torch.randn(r, shape[1], generator=gen, dtype=dtype)
    return W / W.norm()


@dataclass
class Group:
    """One key/value head and its g query heads at a point, at fixed inputs: tensors only."""

    q: Tensor  # (B, g, T, dh), rotated
    k: Tensor  # (B, T, dh), rotated
    v: Tensor  # (B, T, dh)
    pk: Tensor  # (m, dh) prefix keys, as stored in the cache (already rotated)
    pv: Tensor  # (m, dh)
    z: Tensor  # (B, g, T, dh) this group's output before o_proj
    z_all: Tensor  # (B, T, H·dh) all heads' output before o_proj: the input of LoRA on o
    x: Tensor  # (B, T, d) layer input: the input of LoRA on q, k, v
    cos: Tensor | None  # (B or 1, T, dh) rotary
    sin: Tensor | None
    allowed: Tensor  # (B, T, T)
    valid: Tensor  # (B, T) real query positions
    scale: float
    q_rows: slice  # this group's rows of W_q, and of o_proj's input
    kv_rows: slice  # this group's rows of W_k and W_v

    def rows(self, target: str) -> slice:
        return self.kv_rows if target in ("k", "v") else self.q_rows

    def delta_shape(self, target: str) -> tuple[int, ...]:
        """prefix: (2, m, dh) = [δP_k; δP_v]; q, k, v: this group's rows of ΔW (out, in); o: rows of
        M = W_o⁻¹ΔW_o, the same change before o_proj (W_o is invertible), so W_o·M z = ΔW_o z."""
        g, dh, d = self.q.shape[1], self.q.shape[-1], self.x.shape[-1]
        return {"prefix": (2, self.pk.shape[0], dh), "q": (g * dh, d), "k": (dh, d), "v": (dh, d),
                "o": (g * dh, self.z_all.shape[-1])}[target]


def group_map(gr: Group, target: str) -> Callable[[Tensor], Tensor]:
    """δ ↦ the group's output at real tokens (N·g·dh,) with `target` moved by δ. Exact, not linearized:
    nonlinear in δ for the prefix, q and k; linear for v; affine for o."""
    B, g, T, dh = gr.q.shape
    heads = lambda t: t.view(B, T, g, dh).transpose(1, 2)  # noqa: E731  (B, T, g·dh) -> (B, g, T, dh)
    out = lambda z: z.transpose(1, 2)[gr.valid].reshape(-1)  # noqa: E731  real tokens, flattened
    rest = (gr.allowed, gr.scale)
    return {
        "prefix": lambda d: out(attend(gr.q, gr.k, gr.v, gr.pk + d[0], gr.pv + d[1], *rest)),
        "q": lambda d: out(attend(gr.q + rotate(heads(gr.x @ d.T), gr.cos, gr.sin), gr.k, gr.v, gr.pk, gr.pv, *rest)),
        "k": lambda d: out(attend(gr.q, gr.k + rotate(gr.x @ d.T, gr.cos, gr.sin), gr.v, gr.pk, gr.pv, *rest)),
        "v": lambda d: out(attend(gr.q, gr.k, gr.v + gr.x @ d.T, gr.pk, gr.pv, *rest)),
        "o": lambda d: out(gr.z + heads(gr.z_all @ d.T)),
    }[target]


def perturbation(gr: Group, target: str, delta: Tensor) -> Tensor:
    """The first-order change J·δ of the group's output (N·g·dh,), one jvp at δ = 0."""
    return jvp(group_map(gr, target), (gr.x.new_zeros(gr.delta_shape(target)),), (delta,))[1]


def jacobian(gr: Group, target: str, chunk: int = 256) -> Tensor:
    """The Jacobian at δ = 0, (N·g·dh, numel δ), columns in δ's row-major order (prefix: the key part,
    then the value part), by vmap over basis tangents in chunks."""
    shape = gr.delta_shape(target)
    n = int(torch.tensor(shape).prod())
    basis = torch.eye(n, dtype=gr.x.dtype).view(n, *shape)
    return vmap(lambda e: perturbation(gr, target, e), chunk_size=chunk)(basis).T


def design(gr: Group, target: str) -> Tensor:
    """A matrix D whose ridge fit is the fit of J_target, far smaller for the separable maps:
    v: J·vec(δ) = vec(X̄ δᵀ), X̄ (N·g, d) the content-attention-weighted inputs x̄_i = Σ_j a_ij x_j;
    o: J·vec(δ) = vec(Z δᵀ), Z (N, H·dh) the head outputs. q, k and the prefix: D = J itself.
    The target y (N·g·dh,) is fitted as y.view(D.shape[0], -1), one column per output coordinate."""
    if target == "v":
        s_p, s_c = _scores(gr.q, gr.k, gr.pk, gr.allowed, gr.scale)
        a = torch.softmax(torch.cat([s_p, s_c], -1), -1)[..., gr.pk.shape[0]:]  # (B, g, T, T) content part
        return (a @ gr.x[:, None]).transpose(1, 2)[gr.valid].reshape(-1, gr.x.shape[-1])  # (N·g, d)
    if target == "o":
        return gr.z_all[gr.valid]  # (N, H·dh)
    return jacobian(gr, target)


# ----------------------------------------------------------------------------------------------------
# Walking the model: attention modules, weights, KV caches, captured inputs.
# ----------------------------------------------------------------------------------------------------

def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Self-attention modules in layer order: GPT-2 style (c_attn, c_proj) or Llama style (q/k/v/o_proj)."""
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and (hasattr(m, "c_attn") or hasattr(m, "q_proj"))]
    if not mods:
        raise TypeError(f"{type(model).__name__}: no GPT2Attention- or LlamaAttention-like modules found")
    return sorted(mods, key=lambda m: m.layer_idx)


def geometry(attn: torch.nn.Module) -> tuple[int, int, int]:
    """(query heads H, key/value heads, head dim)."""
    if hasattr(attn, "c_attn"):
        return attn.num_heads, attn.num_heads, attn.head_dim
    return attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim


def _param(attn: torch.nn.Module, target: str) -> tuple[str, slice, bool]:
    """(parameter name, rows of the math-layout (out, in) weight, stored transposed?)."""
    if not hasattr(attn, "c_attn"):
        return f"{target}_proj.weight", slice(None), False
    if target == "o":  # GPT-2's Conv1D stores W as (in, out); q, k, v share c_attn
        return "c_proj.weight", slice(None), True
    i, d = "qkv".index(target), attn.embed_dim
    return "c_attn.weight", slice(i * d, (i + 1) * d), True


def math_weight(attn: torch.nn.Module, target: str) -> Tensor:
    """W_target in math layout (out, in): y = x Wᵀ + b."""
    name, rows, transposed = _param(attn, target)
    W = attn.get_parameter(name).detach()
    return (W.T if transposed else W)[rows]


def overrides(attn: torch.nn.Module, deltas: dict[str, Tensor]) -> dict[str, Tensor]:
    """`attn`'s parameters with ΔW (math layout) added, for functional_call (differentiable in ΔW)."""
    out: dict[str, Tensor] = {}
    for target, dW in deltas.items():
        name, rows, transposed = _param(attn, target)
        W = attn.get_parameter(name).detach()
        full = torch.zeros(W.shape[::-1] if transposed else W.shape, dtype=W.dtype)
        full = torch.slice_scatter(full, dW, 0, rows.start or 0, rows.stop or full.shape[0])
        out[name] = out.get(name, W) + (full.T if transposed else full)
    return out


def _cache(prefix: list[tuple[Tensor, Tensor] | None], B: int) -> DynamicCache:
    """A fresh cache per call (DynamicCache.update appends in place): per layer (kv_heads, m, dh) or None."""
    return DynamicCache([(None, None) if p is None else tuple(t[None].expand(B, *t.shape) for t in p) for p in prefix])


def module_call(attn, x: Tensor, pos, mask: Tensor, prefix=None, deltas=None, capture_z: bool = False) -> Tensor:
    """The real attention module's output (B, T, d), or with capture_z its o_proj input (B, T, H·dh)."""
    kwargs = {"attention_mask": mask}
    if pos is not None:
        kwargs["position_embeddings"] = pos
    if prefix is not None:
        kwargs["cache"] = _cache([None] * attn.layer_idx + [prefix], x.shape[0])
    seen: list[Tensor] = []
    proj = attn.c_proj if hasattr(attn, "c_attn") else attn.o_proj
    hook = proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        with sdpa_kernel(SDPBackend.MATH):  # the sdpa backend with forward-mode AD, exact in float64
            y = functional_call(attn, overrides(attn, deltas or {}), (x,), kwargs)[0]
    finally:
        hook.remove()
    return seen[0] if capture_z else y


def capture_inputs(model, input_ids: Tensor, attention_mask: Tensor, prefix=None) -> tuple[list, Tensor]:
    """Run the model, with a prefix as KV cache if given (PEFT's convention: content positions m…m+T−1),
    and capture each attention module's input: [(x (B, T, d), (cos, sin) or None)], and the logits."""
    attns = attention_modules(model)
    seen: list = [None] * len(attns)

    def hook(i):
        def f(mod, args, kwargs):
            seen[i] = ((args[0] if args else kwargs["hidden_states"]).detach(), kwargs.get("position_embeddings"))
        return f

    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if prefix is not None:
        B, m = input_ids.shape[0], prefix[0][0].shape[1]
        kwargs.update(attention_mask=torch.cat([attention_mask.new_ones(B, m), attention_mask], 1), cache=_cache(prefix, B))
    handles = [a.register_forward_pre_hook(hook(i), with_kwargs=True) for i, a in enumerate(attns)]
    try:
        with sdpa_kernel(SDPBackend.MATH):
            logits = model(**kwargs).logits
    finally:
        for h in handles:
            h.remove()
    return seen, logits


def project(attn, x: Tensor, pos) -> tuple[Tensor, Tensor, Tensor]:
    """Content queries (B, H, T, dh), keys and values (B, kv_heads, T, dh) from the module's own
    projections, rotary applied as the module does."""
    B, T, _ = x.shape
    if hasattr(attn, "c_attn"):
        q, k, v = attn.c_attn(x).split(attn.split_size, dim=2)
    else:
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    q, k, v = (t.view(B, T, -1, attn.head_dim).transpose(1, 2) for t in (q, k, v))
    cos, sin = pos if pos is not None else (None, None)
    return rotate(q, cos, sin), rotate(k, cos, sin), v


def layer_groups(attn, x: Tensor, pos, prefix, attention_mask: Tensor) -> list[Group]:
    """The layer at one point, split into key/value head groups (GQA: one kv head and its g query heads)."""
    H, kvH, dh = geometry(attn)
    g = H // kvH
    q, k, v = project(attn, x, pos)
    pk, pv = prefix if prefix is not None else (x.new_zeros(kvH, 0, dh),) * 2
    allowed = content_allowed(attention_mask)
    zs = [attend(q[:, h * g:(h + 1) * g], k[:, h], v[:, h], pk[h], pv[h], allowed, attn.scaling) for h in range(kvH)]
    z_all = torch.cat(zs, 1).transpose(1, 2).reshape(*x.shape[:2], H * dh)  # o_proj's input layout
    cos, sin = pos if pos is not None else (None, None)
    return [Group(q[:, h * g:(h + 1) * g], k[:, h], v[:, h], pk[h], pv[h], zs[h], z_all, x, cos, sin, allowed,
                  attention_mask.bool(), attn.scaling, slice(h * g * dh, (h + 1) * g * dh), slice(h * dh, (h + 1) * dh))
            for h in range(kvH)]


def prefix_of(prefix_model, dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
    """A PEFT prefix's keys and values per layer, (kv_heads, m, dh) each, as get_prompt gives them to the model."""
    return [(layer.keys[0].to(dtype), layer.values[0].to(dtype)) for layer in prefix_model.get_prompt(batch_size=1).layers]


def text_prefix(model, init_ids: Tensor) -> list[tuple[Tensor, Tensor]]:
    """The text init: the base model's KV of init_ids (1-D) per layer, keys at positions 0…m−1 (PEFT's
    initialize_kv_prefix_from_text). By causality its first m entries are the text init of length m."""
    cache = DynamicCache()
    with sdpa_kernel(SDPBackend.MATH):
        model(input_ids=init_ids[None], cache=cache, use_cache=True)
    return [(layer.keys[0], layer.values[0]) for layer in cache.layers]


def lora_deltas(lora_model) -> list[dict[str, Tensor]]:
    """A PEFT LoRA model's ΔW per layer and attention target, math layout (out, in), scaling included."""
    out = []
    for attn in attention_modules(lora_model):
        deltas = {}
        for target in TARGETS:
            name, rows, transposed = _param(attn, target)
            mod = attn.get_submodule(name.rsplit(".", 1)[0])
            if hasattr(mod, "lora_A") and mod.active_adapters:
                dW = sum(mod.get_delta_weight(a) for a in mod.active_adapters)  # the base layer's layout
                deltas[target] = (dW.T if transposed else dW)[rows].detach()
        out.append(deltas)
    return out


def group_delta(attn, target: str, dW: Tensor) -> Tensor:
    """ΔW as the group maps take it: for o, M = W_o⁻¹ΔW_o (the same change, before o_proj)."""
    return torch.linalg.solve(math_weight(attn, "o"), dW) if target == "o" else dW


# ----------------------------------------------------------------------------------------------------
# The five measurements, one layer at a time.
# ----------------------------------------------------------------------------------------------------

def check_gating(attn, x: Tensor, pos, prefix, attention_mask: Tensor) -> dict[str, float]:
    """The real module with the prefix as KV cache vs (1−λ)·Attn(content) + λ·Attn(prefix): both
    attentions are the real module with the other part masked out; λ is the log-sum-exp formula on the
    captured q, k. Compared per head before o_proj (λ differs per head); also pure `attend` vs module."""
    allowed, valid = content_allowed(attention_mask), attention_mask.bool()
    (B, T, _), (H, _, dh), m = x.shape, geometry(attn), prefix[0].shape[1]
    z = {keep: module_call(attn, x, pos, additive_mask(allowed, 0 if keep == "content" else m, x.dtype, keep),
                           None if keep == "content" else prefix, capture_z=True).view(B, T, H, dh)
         for keep in ("all", "content", "prefix")}
    err, pure, lams = 0.0, 0.0, []
    for gr in layer_groups(attn, x, pos, prefix, attention_mask):
        lam = gate(gr.q, gr.k, gr.v, gr.pk, gr.pv, gr.allowed, gr.scale)[0].transpose(1, 2)[..., None]  # (B, T, g, 1)
        hs = slice(gr.q_rows.start // dh, gr.q_rows.stop // dh)
        mix = (1 - lam) * z["content"][:, :, hs] + lam * z["prefix"][:, :, hs]
        err = max(err, float((z["all"][:, :, hs] - mix)[valid].abs().max()))
        pure = max(pure, float((gr.z.transpose(1, 2) - z["all"][:, :, hs])[valid].abs().max()))
        lams.append(lam[valid].flatten())
    lam = torch.cat(lams)
    return {"max_abs_err": err, "pure_vs_module": pure, "lam_min": float(lam.min()), "lam_max": float(lam.max())}


def check_linearity(attn, x, pos, attention_mask, prefix, deltas: dict[str, Tensor], seed: int) -> dict[str, list]:
    """Remainders through the real module (output after o_proj, real tokens) at the point (prefix, W + deltas),
    for the prefix map (if a prefix is given) and LoRA on q, k, v, o. Seeded random directions: the
    prefix's scaled to ‖P‖, LoRA's of rank 4 scaled to ‖W‖, so that ε is a relative step."""
    gen, valid = torch.Generator().manual_seed(seed), attention_mask.bool()
    mask = additive_mask(content_allowed(attention_mask), prefix[0].shape[1] if prefix else 0, x.dtype)
    run = lambda P, ds: module_call(attn, x, pos, mask, P, ds)[valid]  # noqa: E731  (N, d)
    out = {}
    if prefix is not None:
        P0 = torch.stack(prefix)  # (2, kv_heads, m, dh)
        dP = torch.randn(P0.shape, generator=gen, dtype=x.dtype)
        out["prefix"] = remainders(lambda P: run((P[0], P[1]), deltas), P0, dP * P0.norm() / dP.norm())
    for t in TARGETS:
        W = math_weight(attn, t)
        moved = lambda D, t=t: run(prefix, {**deltas, t: deltas[t] + D if t in deltas else D})  # noqa: E731
        out[t] = remainders(moved, torch.zeros_like(W), random_lowrank(W.shape, 4, gen, x.dtype) * W.norm())
    return out


def check_content_ratios(attn, point_in, base_in, prefix, attention_mask, deltas: dict[str, Tensor]) -> dict:
    """max |Δ log(attention ratio)| among content tokens: the prefix at fixed inputs (the same q, k with
    and without the prefix keys) and at each model's own inputs; LoRA on q or k at the base inputs."""
    H, kvH, dh = geometry(attn)
    allowed, valid = content_allowed(attention_mask), attention_mask.bool()
    rep = lambda t, dim=1: t.repeat_interleave(H // kvH, dim=dim)  # noqa: E731  key heads -> query heads
    log_att = lambda q, k, pk=torch.zeros(H, 0, dh, dtype=prefix[0].dtype): content_log_attention(  # noqa: E731
        q, rep(k), pk, allowed, attn.scaling)
    q, k, _ = project(attn, *point_in)
    qb, kb, _ = project(attn, *base_in)
    l_prefix, l_base = log_att(q, k, rep(prefix[0], 0)), log_att(qb, kb)
    out = {"prefix_fixed_inputs": ratio_change(l_prefix, log_att(q, k), allowed, valid),
           "prefix_own_inputs": ratio_change(l_prefix, l_base, allowed, valid)}
    (x, pos), (B, T, _) = base_in, base_in[0].shape
    for t in ("q", "k"):
        if t in deltas:
            d = rotate((x @ deltas[t].T).view(B, T, -1, dh).transpose(1, 2), *(pos or (None, None)))
            moved = log_att(qb + d, kb) if t == "q" else log_att(qb, kb + d)
            out[f"lora_{t}"] = ratio_change(moved, l_base, allowed, valid)
    return out


def truncate(dW: Tensor, r: int) -> Tensor:
    """ΔW's best rank-r approximation (its top r singular directions)."""
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def span_point(base, input_ids, attention_mask, prefix_at, layers, heads, ms, rs, source, rtol, draws, seed) -> dict:
    """The reproducibility grid at one point: for each m, the span of the prefix map (m tokens; inputs from
    the model run with them), and the energy share outside it of (a) random rank-r LoRA perturbations on
    q, k, v, o, the same directions at every m and point; (b) the LoRA source truncated to rank r;
    (c) a random vector, 1 − rank/dim. For (a) the expected share cannot depend on r: Gaussian factors
    give E[vec(BA) vec(BA)ᵀ] = r·I, so r only changes the sampling noise. (b) is where r can matter.
    prefix_at(m) gives the per-layer prefix, or None where the point has no prefix of length m."""
    attns, gen = attention_modules(base), torch.Generator().manual_seed(seed)
    dirs = {(l, t, r, i): random_lowrank(group_delta(attns[l], t, math_weight(attns[l], t)).shape, r, gen, base.dtype)
            for l in layers for t in TARGETS for r in rs for i in range(draws)}
    dirs.update({(l, t, r, "source"): group_delta(attns[l], t, truncate(dW, r))
                 for l in layers for t, dW in source[l].items() for r in rs})
    energy = {kind: torch.zeros(2, len(TARGETS), len(ms), len(rs), dtype=torch.float64) for kind in ("random", "source")}
    rank, dim = torch.zeros(len(ms), dtype=torch.float64), torch.zeros(len(ms), dtype=torch.float64)
    for mi, m in enumerate(ms):
        prefix = prefix_at(m)
        if prefix is None:  # no prefix of length m at this point: NaN (None in the JSON)
            rank[mi] = dim[mi] = float("nan")
            continue
        inputs, _ = capture_inputs(base, input_ids, attention_mask, prefix)
        for l in layers:
            groups = layer_groups(attns[l], *inputs[l], prefix[l], attention_mask)
            for gr in (groups[h] for h in heads):
                J = jacobian(gr, "prefix")  # (N·g·dh, 2·m·dh)
                U, _ = span_basis(J, rtol)
                rank[mi], dim[mi] = rank[mi] + U.shape[1], dim[mi] + J.shape[0]
                for (ti, t), (ri, r) in ((a, b) for a in enumerate(TARGETS) for b in enumerate(rs)):
                    for i in [*range(draws), "source"]:
                        if (l, t, r, i) in dirs:
                            o_e = outside_energy(U, perturbation(gr, t, dirs[(l, t, r, i)][gr.rows(t)]))
                            energy["source" if i == "source" else "random"][:, ti, mi, ri] += torch.tensor(o_e)
    share = {kind: e[0] / e[1] for kind, e in energy.items()}  # (targets, m, r)
    return {"outside": {t: share["random"][ti].tolist() for ti, t in enumerate(TARGETS)},
            "source_outside": {t: share["source"][ti].tolist() for ti, t in enumerate(TARGETS) if t in source[layers[0]]},
            "baseline": (1 - rank / dim).tolist(), "rank": rank.tolist(), "dim": dim.tolist()}


def prefix_spectrum(base, input_ids, attention_mask, prefix_at, layer: int, heads, ms, rtol) -> dict:
    """Singular spectrum of one layer's prefix span vs m, summed over the groups: the measured rank of
    the whole map and of its key and value parts, beside the rank formulas."""
    attn = attention_modules(base)[layer]
    parts = ("total", "key", "value")
    res: dict = {"ms": [], "spectrum": [], **{f"{w}_{p}": [] for w in ("rank", "formula") for p in parts}}
    for m in ms:
        prefix = prefix_at(m)
        if prefix is None:
            continue
        inputs, _ = capture_inputs(base, input_ids, attention_mask, prefix)
        groups = layer_groups(attn, *inputs[layer], prefix[layer], attention_mask)
        sv, counts = [], dict.fromkeys(res.keys() - {"ms", "spectrum"}, 0)
        for gr in (groups[h] for h in heads):
            J = jacobian(gr, "prefix")  # key columns, then value columns
            half = J.shape[1] // 2
            for part, cols in zip(parts, (slice(None), slice(0, half), slice(half, None))):
                s = torch.linalg.svdvals(J[:, cols])  # singular values only: no basis needed here
                counts[f"rank_{part}"] += int((s > rtol * s[0]).sum())
                sv += [s] if part == "total" else []
            for part, n in rank_formulas(m, int(gr.valid.sum()), gr.q.shape[-1], gr.q.shape[1]).items():
                counts[f"formula_{part}"] += n
        s_all = torch.cat(sv).sort(descending=True).values
        res["ms"].append(m)
        res["spectrum"].append((s_all / s_all[0]).tolist())
        for key, n in counts.items():
            res[key].append(n)
    return res


def conversion(base, input_ids, attention_mask, prefix, layers, heads, source, seed, max_entries=3e7) -> dict:
    """Least-squares conversion at the trained prefix, first order, both ways: prefix → LoRA (a random δP
    scaled to ‖P‖, fitted by a full-rank ΔW on one target) and LoRA → prefix (the LoRA source's
    perturbation on one target, fitted by δP). Fit on the first half of the sentences, held out on the
    rest; residuals pooled over layers and groups. q and k need their whole Jacobian (no separable
    form): above max_entries entries they are skipped, and the JSON says so."""
    attns, gen = attention_modules(base), torch.Generator().manual_seed(seed)
    B = input_ids.shape[0]
    parts = slice(0, (B + 1) // 2), slice((B + 1) // 2, B)
    inputs, _ = capture_inputs(base, input_ids, attention_mask, prefix)
    acc: dict = {}
    out: dict = {"alphas": list(ALPHAS), "prefix_to_lora": {}, "lora_to_prefix": {}, "skipped": set()}

    def add(way, t, r, y2, D):  # pool squared residuals (alphas, 2) and squared target norms (2,)
        res, n2 = acc.get((way, t), (0, 0))
        acc[(way, t)] = (res + r, n2 + y2)
        out[way].setdefault(t, {"unknowns_per_output": D.shape[1], "fit_rows_per_group": D.shape[0],
                                "vacuous": D.shape[0] <= D.shape[1]})  # then any fit is exact

    for l in layers:
        x, pos = inputs[l]
        sub = lambda p: (x[p], None if pos is None else tuple(c[p] if c.shape[0] == B else c for c in pos))  # noqa: E731
        gfit, gheld = (layer_groups(attns[l], *sub(p), prefix[l], attention_mask[p]) for p in parts)
        src = {t: group_delta(attns[l], t, dW) for t, dW in source[l].items()}
        for h in heads:
            dP = torch.randn((2, *gfit[h].pk.shape), generator=gen, dtype=x.dtype)
            dP = (dP * torch.stack([gfit[h].pk, gfit[h].pv]).norm() / dP.norm()).reshape(-1)
            Jp = jacobian(gfit[h], "prefix"), jacobian(gheld[h], "prefix")
            yp = Jp[0] @ dP, Jp[1] @ dP
            ys, names = [], []
            for t in TARGETS:
                if t in ("q", "k") and Jp[0].shape[0] * int(torch.tensor(gfit[h].delta_shape(t)).prod()) > max_entries:
                    out["skipped"].add(t)
                else:
                    D = design(gfit[h], t), design(gheld[h], t)
                    Y = yp[0].view(D[0].shape[0], -1), yp[1].view(D[1].shape[0], -1)
                    r = ridge_residuals(D[0], Y[0], D[1], Y[1]).sum(-1)  # summed over output coordinates
                    add("prefix_to_lora", t, r, torch.stack([yp[0].pow(2).sum(), yp[1].pow(2).sum()]), D[0])
                if t in src:  # J·δ by jvp: no LoRA Jacobian needed this way round
                    dW = src[t][gfit[h].rows(t)]
                    ys.append((perturbation(gfit[h], t, dW), perturbation(gheld[h], t, dW)))
                    names.append(t)
            if names:  # one SVD of the prefix Jacobian serves every LoRA target
                Y = torch.stack([y[0] for y in ys], 1), torch.stack([y[1] for y in ys], 1)
                r = ridge_residuals(Jp[0], Y[0], Jp[1], Y[1])
                for i, t in enumerate(names):
                    y2 = torch.stack([Y[0][:, i].pow(2).sum(), Y[1][:, i].pow(2).sum()])
                    add("lora_to_prefix", t, r[..., i], y2, Jp[0])
    for (way, t), (res, n2) in acc.items():
        rel = (res / n2).sqrt()  # (alphas, 2): relative residual ‖J w − y‖ / ‖y‖
        out[way][t].update(fit=rel[:, 0].tolist(), heldout=rel[:, 1].tolist())
    out["skipped"] = sorted(out["skipped"])
    return out


# ----------------------------------------------------------------------------------------------------
# Figures, verdicts, and the public entry point.
# ----------------------------------------------------------------------------------------------------

def _figures(res: dict, spectrum: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import seaborn as sns

    sns.set_theme(style="whitegrid")
    lin = res["linearity"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
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
    plt.close(fig)

    span, ms, rs = res["span"], res["span"]["ms"], res["span"]["rs"]
    rows = [(key, p) for key in ("outside", "source_outside") for p in span["points"]]
    fig, axes = plt.subplots(len(rows), 4, figsize=(17, 3.9 * len(rows)), squeeze=False)
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
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
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
    plt.close(fig)


def _verdicts(res: dict) -> list[dict[str, str]]:
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
         if all(5 <= v <= 20 for v in decay.values()) and flat <= 1e-10 else "not as expected: see linearity.png"},
        {"statement": "2'. a prefix keeps content attention ratios, LoRA q/k changes them",
         "measured": f"prefix {worst['prefix_fixed_inputs']:.0e}; LoRA "
                     + ", ".join(f"{t} " + ("n/a" if worst[f"lora_{t}"] != worst[f"lora_{t}"] else f"{worst[f'lora_{t}']:.1e}")
                                 for t in ("q", "k")),
         "verdict": "true" if worst["prefix_fixed_inputs"] < 1e-8 < lora_worst else "not as expected"},
        {"statement": "3. least squares converts between them at fixed data",
         "measured": "; ".join(f"{w} best {b[1]}: fit {b[2]:.2f}, held-out {b[0]:.2f}" for w, b in best.items() if b),
         "verdict": "not computed" if not any(best.values()) else "only as a projection"
         if any(b and b[0] > 0.1 for b in best.values()) else "converts"},
        {"statement": "4. prefix length m cannot reproduce LoRA rank > m",
         "measured": f"share outside at m = {span['ms'][0]}→{span['ms'][-1]} (text init): {m_trend}; "
                     f"r = {span['rs'][-1]} minus r = {span['rs'][0]}: random {trend}, LoRA source {trend_src}; "
                     f"r = m boundary: {span['boundary_at_r_eq_m']}",
         "verdict": "boundary at r = m: see span_grid.png" if span["boundary_at_r_eq_m"]
         else "false as stated: no r = m boundary"},
    ]


def _finite(obj):
    """JSON-safe: tensors to lists, NaN and inf to None."""
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and (obj != obj or abs(obj) == float("inf")):
        return None
    return obj


def _grid_summary(span: dict, ms, rs) -> None:
    """What the grid says about r and m: per target, the mean change of the share outside from the
    smallest to the largest r (random directions, and the LoRA source cut to rank r) and from the
    smallest to the largest m (text init, mean over r); and whether any row shows an r = m boundary
    (every r ≤ m inside the span, some r > m clearly outside)."""
    grids = {key: {t: torch.tensor([p[key][t] for p in span["points"].values()], dtype=torch.float64)
                   for t in span["points"]["text"][key]} for key in ("outside", "source_outside")}
    for key, name in (("outside", "r_trend"), ("source_outside", "r_trend_source")):
        span[name] = {t: float((g[..., -1] - g[..., 0]).nanmean()) for t, g in grids[key].items()}
    text = span["points"]["text"]["outside"]
    span["m_trend"] = {t: [float(torch.tensor(text[t][i]).mean()) for i in (0, -1)] for t in TARGETS}
    below = lambda m: [ri for ri, r in enumerate(rs) if r <= m]  # noqa: E731
    above = lambda m: [ri for ri, r in enumerate(rs) if r > m]  # noqa: E731
    span["boundary_at_r_eq_m"] = any(
        bool((row[below(m)] < 0.01).all() and (row[above(m)] > 0.1).any())
        for kind in grids.values() for g in kind.values() for point in g for m, row in zip(ms, point)
        if below(m) and above(m) and not row.isnan().any())


@torch.no_grad()  # forward-mode AD (jvp) still runs; no autograd graphs through the frozen weights
def analyze(base_model, prefix_model, lora_model, input_ids: Tensor, attention_mask: Tensor, out_dir: Path, *,
            layers: list[int] | None = None, heads: list[int] | None = None, ms=(1, 2, 4, 8, 16, 32),
            rs=(1, 2, 4, 8, 16, 32), init_ids: Tensor | None = None, rtol: float = 1e-8, draws: int = 2,
            seed: int = 0, dtype: torch.dtype = torch.float64) -> dict:
    """Run the five measurements; write out_dir/equivalence.json, linearity.png, span_grid.png and
    prefix_spectrum.png; print a verdict table; return the JSON's dict.

    base_model: the unadapted model. prefix_model: a PEFT prefix-tuning model. lora_model: a PEFT LoRA
    model, or None: then a random rank-4 LoRA with ‖ΔW‖ = 0.1‖W‖ on q, k, v, o stands in, and says so.
    input_ids, attention_mask (B, T): the fixed data (conversion: first half of the sentences fitted,
    the rest held out). layers: layer indices; heads: key/value head indices (GQA: each with its query
    heads); None = all. ms, rs: the grid's prefix lengths and LoRA ranks. init_ids: tokens of the text
    init (None: the analysis tokens). rtol: rank cut-off σ > rtol·σ_max. draws: random LoRA directions
    per grid cell. The models are cast in place to `dtype` and set to eval mode.
    """
    import pandas as pd

    from feta.runs import write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for model in (base_model, prefix_model, lora_model):
        if model is not None:
            model.to(dtype).eval()
    if any(hasattr(mod, "lora_A") for mod in base_model.modules()):
        raise ValueError("base_model has LoRA layers: pass an unadapted copy (PEFT's LoRA edits its base model in "
                         "place; feta.models.load_base_model returns a fresh copy on each call)")
    attns = attention_modules(base_model)
    H, kvH, dh = geometry(attns[0])
    layers = list(range(len(attns))) if layers is None else list(layers)
    heads = list(range(kvH)) if heads is None else list(heads)
    if not layers or not set(layers) <= set(range(len(attns))):
        raise ValueError(f"layers={layers}: must be a non-empty subset of 0…{len(attns) - 1}")
    if not heads or not set(heads) <= set(range(kvH)):
        raise ValueError(f"heads={heads}: must be a non-empty subset of the key/value heads 0…{kvH - 1}")
    valid = attention_mask.bool()
    N, d = int(valid.sum()), math_weight(attns[0], "o").shape[0]
    if N <= dh:
        raise ValueError(f"{N} real tokens ≤ d_head = {dh}: every per-head span would be exact (a vacuous pass); "
                         "pass more sentences")
    if int(valid[: (len(valid) + 1) // 2].sum()) <= d:
        warnings.warn(f"the conversion fits a full ΔW (d = {d} inputs) on ≤ {d} tokens: its fits are exact by counting; "
                      "the JSON marks them vacuous. Pass more sentences for a real test.")

    trained = prefix_of(prefix_model, dtype)
    m_P = trained[0][0].shape[1]
    init_ids = input_ids[valid] if init_ids is None else init_ids
    if init_ids.numel() < max(ms):
        raise ValueError(f"init_ids has {init_ids.numel()} tokens; the text init needs max(ms) = {max(ms)}")
    text = text_prefix(base_model, init_ids[: max(ms)])
    if lora_model is not None:
        source, lora_desc = lora_deltas(lora_model), "trained LoRA"
    else:
        gen = torch.Generator().manual_seed(seed + 1)
        source = [{t: 0.1 * math_weight(a, t).norm() * random_lowrank(math_weight(a, t).shape, 4, gen, dtype)
                   for t in TARGETS} for a in attns]
        lora_desc = "random rank-4, ‖ΔW‖ = 0.1‖W‖ (no LoRA given; at_lora inputs are the base model's)"

    base_in, _ = capture_inputs(base_model, input_ids, attention_mask)
    prefix_in, logits = capture_inputs(base_model, input_ids, attention_mask, trained)
    peft_logits = prefix_model(input_ids=input_ids, attention_mask=attention_mask).logits
    lora_in = capture_inputs(lora_model, input_ids, attention_mask)[0] if lora_model is not None else base_in
    impl = base_model.config._attn_implementation
    res: dict = {"setup": {
        "model": type(base_model).__name__, "attn_implementation": impl + (" (math backend)" if impl == "sdpa" else ""),
        "dtype": str(dtype), "d": d, "heads": H, "kv_heads": kvH, "d_head": dh, "layers": layers, "kv_heads_used": heads,
        "N_real_tokens": N, "sentences": int(input_ids.shape[0]), "m_trained": m_P, "lora": lora_desc, "rtol": rtol,
        "point": "the trained prefix (grid: also the text init) with base weights; at_lora: W + the LoRA's ΔW",
        "inputs": "each layer's input, captured from the model run at that point (its own inputs)",
        "outputs": "real tokens; spans and conversion per key/value head group before o_proj (LoRA on o as "
                   "W_o⁻¹ΔW_o); gating and linearity: the module's output",
        "peft_prefix_logits_match": float((peft_logits - logits)[valid].abs().max())}}

    gat = [dict(layer=l, **check_gating(attns[l], *prefix_in[l], trained[l], attention_mask)) for l in layers]
    eager_fp32 = impl == "eager" and not hasattr(attns[0], "c_attn")  # Llama's eager softmax runs in float32
    res["gating"] = {"per_layer": gat, "tol": 2e-6 if dtype != torch.float64 else 1e-6 if eager_fp32 else 1e-12,
                     **{k: f(g[k] for g in gat) for k, f in [("max_abs_err", max), ("pure_vs_module", max),
                                                             ("lam_min", min), ("lam_max", max)]}}
    lin: dict = {"eps": list(EPS), "at_prefix": {}, "at_lora": {}}
    for l in layers:
        for where, inp, P, ds in [("at_prefix", prefix_in, trained[l], {}), ("at_lora", lora_in, None, source[l])]:
            for k, r in check_linearity(attns[l], *inp[l], attention_mask, P, ds, seed + l).items():
                lin[where][k] = [max(a, b) for a, b in zip(lin[where].get(k, r), r)]  # the worst layer
    lin["decay"] = {k: float(torch.tensor(r[:-1]).div(torch.tensor(r[1:])).median()) for k, r in lin["at_prefix"].items()}
    res["linearity"] = lin
    res["content_ratios"] = [dict(layer=l, **check_content_ratios(attns[l], prefix_in[l], base_in[l], trained[l],
                                                                 attention_mask, source[l])) for l in layers]

    points = {"trained": lambda m: [(k[:, :m], v[:, :m]) for k, v in trained] if m <= m_P else None,
              "text": lambda m: [(k[:, :m], v[:, :m]) for k, v in text]}
    span = {"ms": list(ms), "rs": list(rs), "draws": draws,
            "trained_point": f"the trained prefix's first m tokens (m ≤ {m_P}); text: the text init of length m",
            "points": {p: span_point(base_model, input_ids, attention_mask, at, layers, heads, ms, rs, source, rtol,
                                     draws, seed) for p, at in points.items()}}
    _grid_summary(span, ms, rs)
    res["span"] = span
    spectrum = dict(layer=layers[0], point="text", **prefix_spectrum(base_model, input_ids, attention_mask, points["text"],
                                                                     layers[0], heads, ms, rtol))
    res["spectrum"] = {k: v for k, v in spectrum.items() if k != "spectrum"}  # the σ themselves: figure only
    res["conversion"] = conversion(base_model, input_ids, attention_mask, trained, layers, heads, source, seed)
    res["verdicts"] = _verdicts(res)
    res = _finite(res)
    _figures(res, spectrum, out_dir)
    write_json(out_dir / "equivalence.json", res)
    print(pd.DataFrame(res["verdicts"]).to_string(index=False))
    return res
