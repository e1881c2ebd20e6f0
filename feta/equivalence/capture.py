"""Walking the model: attention modules and their geometry, weights in math layout, KV caches, the
real module's call, captured layer inputs, prefixes (trained and text init) and LoRA deltas.

Attention runs through the real transformers modules, sdpa on its math backend: the one with
forward-mode AD, exact in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache

from feta.adapters import lora_delta_weights
from feta.attention import attend, content_allowed, rotate
from feta.equivalence.attention import KV, TARGETS, Group, Inputs, Rotary


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


def _cache(prefix: list[KV | None], B: int) -> DynamicCache:
    """A fresh cache per call (DynamicCache.update appends in place): per layer (kv_heads, m, dh) or None."""
    return DynamicCache([(None, None) if p is None else tuple(t[None].expand(B, *t.shape) for t in p) for p in prefix])


def module_call(attn: torch.nn.Module, x: Tensor, pos: Rotary, mask: Tensor, prefix: KV | None = None,
                deltas: dict[str, Tensor] | None = None, capture_z: bool = False) -> Tensor:
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


def capture_inputs(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor,
                   prefix: list[KV] | None = None) -> tuple[list[Inputs], Tensor]:
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


def project(attn: torch.nn.Module, x: Tensor, pos: Rotary) -> tuple[Tensor, Tensor, Tensor]:
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


def layer_groups(attn: torch.nn.Module, x: Tensor, pos: Rotary, prefix: KV | None, attention_mask: Tensor) -> list[Group]:
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


def prefix_of(prefix_model: torch.nn.Module, dtype: torch.dtype) -> list[KV]:
    """A PEFT prefix's keys and values per layer, (kv_heads, m, dh) each, as get_prompt gives them to the model."""
    return [(layer.keys[0].to(dtype), layer.values[0].to(dtype)) for layer in prefix_model.get_prompt(batch_size=1).layers]


def text_prefix(model: torch.nn.Module, init_ids: Tensor) -> list[KV]:
    """The text init: the base model's KV of init_ids (1-D) per layer, keys at positions 0…m−1 (PEFT's
    initialize_kv_prefix_from_text). By causality its first m entries are the text init of length m."""
    cache = DynamicCache()
    with sdpa_kernel(SDPBackend.MATH):
        model(input_ids=init_ids[None], cache=cache, use_cache=True)
    return [(layer.keys[0], layer.values[0]) for layer in cache.layers]


def lora_deltas_by_layer(lora_model: torch.nn.Module) -> list[dict[str, Tensor]]:
    """A PEFT LoRA model's ΔW per layer and attention target, math layout (out, in), scaling included, in
    the model's dtype: `lora_delta_weights` read through each attention module's weight layout."""
    weights = lora_delta_weights(lora_model)
    names = {mod: name for name, mod in lora_model.get_base_model().named_modules()}
    out = []
    for attn in attention_modules(lora_model):
        deltas = {}
        for target in TARGETS:
            name, rows, transposed = _param(attn, target)
            dW = weights.get(f"{names[attn]}.{name}")
            if dW is not None:
                dW = dW.to(attn.get_parameter(name).dtype)
                deltas[target] = (dW.T if transposed else dW)[rows]
        out.append(deltas)
    return out


def group_delta(attn: torch.nn.Module, target: str, dW: Tensor) -> Tensor:
    """ΔW as the group maps take it: for o, M = W_o⁻¹ΔW_o (the same change, before o_proj)."""
    return torch.linalg.solve(math_weight(attn, "o"), dW) if target == "o" else dW

