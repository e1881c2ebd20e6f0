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

Modules, each importing only those below it: analyze (the entry point) -> measures, verdicts, figures
-> capture (the model: modules, weights, caches, captured inputs) -> attention (pure tensor math).
"""

from feta.attention import additive_mask, attend, content_allowed
from feta.equivalence.analyze import analyze
from feta.equivalence.attention import (EPS, TARGETS, Group, content_log_attention, design, group_map, jacobian,
                                        outside_energy, perturbation, random_lowrank, rank_formulas, ratio_change,
                                        ridge_residuals, span_basis)
from feta.equivalence.capture import (attention_modules, capture_inputs, geometry, group_delta, layer_groups,
                                      lora_deltas_by_layer, math_weight, module_call, prefix_of, project, text_prefix)
from feta.equivalence.measures import check_content_ratios, check_gating, check_linearity

__all__ = [
    "EPS", "TARGETS", "Group", "additive_mask", "analyze", "attend", "attention_modules", "capture_inputs",
    "check_content_ratios", "check_gating", "check_linearity", "content_allowed", "content_log_attention", "design",
    "geometry", "group_delta", "group_map", "jacobian", "layer_groups", "lora_deltas_by_layer", "math_weight",
    "module_call", "outside_energy", "perturbation", "prefix_of", "project", "random_lowrank", "rank_formulas",
    "ratio_change", "ridge_residuals", "span_basis", "text_prefix",
]
