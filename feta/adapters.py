"""Adapter specs (the schemas behind `conf/adapter/*.yaml`) and their mapping to PEFT.

This is the only module that builds PEFT configs. Each spec checks its own values in `__post_init__`
(run by `OmegaConf.to_object(cfg.adapter)`); checks that need the model run in `build_adapter`.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass, field

import torch
from hydra.core.config_store import ConfigStore
from peft import (AdaptionPromptConfig, IA3Config, LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig,
                  get_peft_model, initialize_kv_prefix_from_text)

from feta.errors import UserError, check_choice, check_positive
from feta.models import max_positions

# Where LoRA goes when `adapter.targets` is null, per architecture family (ModelSpec.arch).
DEFAULT_LORA_TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}
# IA3 (Liu et al. 2022) rescales keys, values and the FFN's inner activations; PEFT's own defaults.
# Feedforward modules scale their input (the FFN activation), the others their output.
DEFAULT_IA3_TARGETS = {"gpt2": ["c_attn", "mlp.c_proj"], "llama": ["k_proj", "v_proj", "down_proj"]}
DEFAULT_IA3_FEEDFORWARD = {"gpt2": ["mlp.c_proj"], "llama": ["down_proj"]}
# model_type values PEFT's AdaptionPromptConfig (LLaMA-Adapter) knows how to wrap.
GATED_PREFIX_MODEL_TYPES = ("gpt2", "llama", "mistral")
# Text whose key/value cache starts a prefix (PEFT's text init): real text keeps the model on its
# manifold, where a random prefix first destroys it (65.5% vs 87.6% on SmolLM2, docs/results/family.md).


def _check_kind(kind: str, expected: str, spec: str) -> None:
    if kind != expected:
        raise UserError("adapter.kind", f"must be {expected!r} for {spec}, got {kind!r}", f"use adapter={expected}")


def _check_length(m: object, what: str) -> None:
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise UserError("adapter.m", f"must be a positive int ({what}), got {m!r}", "e.g. adapter.m=16")


def _check_targets_listed(targets: list[str] | None) -> None:
    if targets is not None and not targets:
        raise UserError("adapter.targets", "is empty", "list module names or use null for the default")


@dataclass
class PrefixSpec:
    """Prefix tuning: m trainable key/value vectors per layer, prepended to every attention."""

    kind: str = "prefix"
    m: int = field(default=16, metadata={"help": "Prefix length (virtual tokens per layer)."})
    init: str = field(
        default="text", metadata={"help": "text: base model's KV of `init_text`; random; zero (PEFT init_weights)."}
    )
    # No default text: each task's config passes its own instruction (conf/adapter/prefix.yaml).
    init_text: str | None = field(default=None,
                                  metadata={"help": "Text for init=text, >= m tokens; the configs use data.instruction."})
    projection: bool = field(default=False, metadata={"help": "MLP reparameterization (Li & Liang); init must not be text."})
    projection_hidden: int = field(default=512, metadata={"help": "Hidden size of the reparameterization MLP."})
    lr: float = field(default=3e-3, metadata={"help": "Learning rate."})

    def __post_init__(self) -> None:
        _check_kind(self.kind, "prefix", "PrefixSpec")
        check_choice("adapter.init", self.init, ("text", "random", "zero"))
        _check_length(self.m, "prefix length")
        if self.projection and self.init == "text":
            raise UserError("adapter.projection=true", "cannot start from text (PEFT)",
                            "set adapter.init=random or zero")
        if self.init == "text" and not (self.init_text or "").strip():
            raise UserError("adapter.init=text", "needs a non-empty adapter.init_text (by default data.instruction)",
                            "set data.instruction to the task in words, or adapter.init=random")
        check_positive("adapter.projection_hidden", self.projection_hidden)
        check_positive("adapter.lr", self.lr, what="number")


@dataclass
class LoraSpec:
    """LoRA: W + (alpha / r) · B·A on the target modules."""

    kind: str = "lora"
    r: int = field(default=4, metadata={"help": "LoRA rank."})
    alpha: float | None = field(default=None, metadata={"help": "Scale numerator; null = 2·r."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on LoRA's input."})
    targets: list[str] | None = field(default=None, metadata={"help": "Module names; null = per-architecture default."})
    lr: float = field(default=1e-3, metadata={"help": "Learning rate."})

    def __post_init__(self) -> None:
        _check_kind(self.kind, "lora", "LoraSpec")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise UserError("adapter.r", f"must be a positive int (LoRA rank), got {self.r!r}", "e.g. adapter.r=4")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError("adapter.dropout", f"must be in [0, 1), got {self.dropout}", "e.g. adapter.dropout=0.1")
        _check_targets_listed(self.targets)
        check_positive("adapter.lr", self.lr, what="number")


@dataclass
class PromptSpec:
    """Soft prompt tuning (Lester et al. 2021): m trainable embeddings prepended to the input only."""

    kind: str = "prompt"
    m: int = field(default=16, metadata={"help": "Prompt length (virtual input tokens)."})
    init: str = field(
        default="text", metadata={"help": "text: embeddings of `init_text` (repeated/cut to m); random; "
                                          "vocab: embeddings of m sampled vocabulary tokens."}
    )
    init_text: str | None = field(default=None,
                                  metadata={"help": "Text for init=text; the configs use data.instruction."})
    lr: float = field(default=3e-3, metadata={"help": "Learning rate (prefix's; not tuned for prompts)."})

    def __post_init__(self) -> None:
        _check_kind(self.kind, "prompt", "PromptSpec")
        check_choice("adapter.init", self.init, ("text", "random", "vocab"))
        _check_length(self.m, "prompt length")
        if self.init == "text" and not (self.init_text or "").strip():
            raise UserError("adapter.init=text", "needs a non-empty adapter.init_text (by default data.instruction)",
                            "set data.instruction to the task in words, or adapter.init=vocab")
        check_positive("adapter.lr", self.lr, what="number")


@dataclass
class IA3Spec:
    """IA3: learned per-channel rescaling vectors (init 1) on the target modules' outputs or inputs."""

    kind: str = "ia3"
    targets: list[str] | None = field(default=None, metadata={"help": "Module names; null = per-architecture default."})
    feedforward: list[str] | None = field(
        default=None, metadata={"help": "Targets whose input is scaled (FFN); null = the default ones among targets."}
    )
    lr: float = field(default=3e-3, metadata={"help": "Learning rate (the IA3 paper's)."})

    def __post_init__(self) -> None:
        _check_kind(self.kind, "ia3", "IA3Spec")
        _check_targets_listed(self.targets)
        check_positive("adapter.lr", self.lr, what="number")


@dataclass
class GatedPrefixSpec:
    """LLaMA-Adapter (Zhang et al. 2023): m trainable prompt vectors per layer that the layer's queries
    attend to, their contribution scaled by a per-head gate that starts at 0, so training starts
    exactly at the base model. PEFT's AdaptionPromptConfig."""

    kind: str = "gated_prefix"
    m: int = field(default=10, metadata={"help": "Adapter prompt length per layer (LLaMA-Adapter: 10)."})
    layers: int | None = field(default=None, metadata={"help": "Adapted layers, counted from the top; null = all."})
    lr: float = field(default=1e-3, metadata={"help": "Learning rate (1e-2 collapsed on SmolLM2)."})

    def __post_init__(self) -> None:
        _check_kind(self.kind, "gated_prefix", "GatedPrefixSpec")
        _check_length(self.m, "adapter prompt length")
        if self.layers is not None and (isinstance(self.layers, bool) or not isinstance(self.layers, int)
                                        or self.layers < 1):
            raise UserError("adapter.layers", f"must be a positive int or null (all layers), got {self.layers!r}",
                            "e.g. adapter.layers=8")
        check_positive("adapter.lr", self.lr, what="number")


SPECS = {"prefix": PrefixSpec, "lora": LoraSpec, "prompt": PromptSpec, "ia3": IA3Spec, "gated_prefix": GatedPrefixSpec}
AdapterSpec = PrefixSpec | LoraSpec | PromptSpec | IA3Spec | GatedPrefixSpec

cs = ConfigStore.instance()
for _name, _spec in SPECS.items():
    cs.store(group="adapter", name=f"{_name}_schema", node=_spec)


def run_name(spec: AdapterSpec) -> str:
    """Short run name for logs and reports: prefix-m16, lora-r4, prompt-m16, ia3, gated_prefix-m10."""
    if hasattr(spec, "m"):
        return f"{spec.kind}-m{spec.m}"
    return f"{spec.kind}-r{spec.r}" if hasattr(spec, "r") else spec.kind


def lora_targets(spec: LoraSpec, arch: str) -> list[str]:
    return list(spec.targets) if spec.targets is not None else DEFAULT_LORA_TARGETS[arch]


def ia3_modules(spec: IA3Spec, arch: str) -> tuple[list[str], list[str]]:
    """(targets, feedforward) for IA3; the default feedforward set is cut to the chosen targets,
    because PEFT requires feedforward ⊆ targets."""
    targets = list(spec.targets) if spec.targets is not None else DEFAULT_IA3_TARGETS[arch]
    if spec.feedforward is not None:
        return targets, list(spec.feedforward)
    return targets, [t for t in DEFAULT_IA3_FEEDFORWARD[arch] if t in targets]


def _check_targets(model: torch.nn.Module, targets: list[str], model_name: str) -> None:
    # PEFT matches a target against the end of a module's dotted name (e.g. "mlp.c_proj").
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, mod in model.named_modules()
                         if type(mod).__name__ in ("Linear", "Conv1D")})
        raise UserError(f"adapter.targets={missing}", f"not in {model_name}", f"available: {', '.join(linear)}")


def peft_config(spec: AdapterSpec, arch: str):
    """The PEFT config for a spec; PEFT's own __post_init__ checks run here."""
    if isinstance(spec, PrefixSpec):
        return PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=spec.m, prefix_projection=spec.projection,
            encoder_hidden_size=spec.projection_hidden, init_weights="zero" if spec.init == "zero" else None,
        )
    if isinstance(spec, PromptSpec):
        # init=text is written by build_adapter from the tokenizer at hand: PEFT's own TEXT init reloads
        # the tokenizer by name, which fails for a tokenizer that lives inside a GGUF file.
        init = {"text": "RANDOM", "random": "RANDOM", "vocab": "SAMPLE_VOCAB"}[spec.init]
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=spec.m, prompt_tuning_init=init)
    if isinstance(spec, IA3Spec):
        targets, feedforward = ia3_modules(spec, arch)
        return IA3Config(task_type="CAUSAL_LM", target_modules=targets, feedforward_modules=feedforward,
                         fan_in_fan_out=arch == "gpt2")
    if isinstance(spec, GatedPrefixSpec):
        return AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=spec.m, adapter_layers=spec.layers)
    alpha = spec.alpha if spec.alpha is not None else 2 * spec.r
    return LoraConfig(
        task_type="CAUSAL_LM", r=spec.r, lora_alpha=alpha, lora_dropout=spec.dropout,
        target_modules=lora_targets(spec, arch),
        fan_in_fan_out=arch == "gpt2",  # GPT-2's Conv1D stores W transposed
    )


def build_adapter(model, tokenizer, spec: AdapterSpec, arch: str, model_name: str = "model", max_length: int = 0):
    """Wrap a base model with a fresh PEFT adapter; only the adapter's parameters require grad."""
    if isinstance(spec, LoraSpec):
        _check_targets(model, lora_targets(spec, arch), model_name)
    if isinstance(spec, IA3Spec):
        targets, feedforward = ia3_modules(spec, arch)
        _check_targets(model, targets, model_name)
        extra = [f for f in feedforward if f not in targets]
        if extra:  # PEFT's own check says only "feedforward_modules should be a subset of target_modules"
            raise UserError(f"adapter.feedforward={extra}", f"not among the targets {targets}",
                            "add them to adapter.targets or leave them out of adapter.feedforward")
    if isinstance(spec, GatedPrefixSpec):
        _check_gated_prefix(model, spec, model_name)
        # PEFT needs the layer count itself; null means all layers.
        spec = dataclasses.replace(spec, layers=spec.layers or model.config.num_hidden_layers)
    if isinstance(spec, (PrefixSpec, PromptSpec)):  # both take m positions before the input's
        n_pos = max_positions(model.config)
        if n_pos is not None and max_length and spec.m + max_length > n_pos:
            raise UserError("adapter.m + data.max_length",
                            f"{spec.m} + {max_length} > {n_pos} positions of {model_name}", "lower one of them")
    peft_model = get_peft_model(model, peft_config(spec, arch))
    if isinstance(spec, PromptSpec) and spec.init == "text":
        _init_prompt_from_text(peft_model, tokenizer, spec)
    if isinstance(spec, PrefixSpec) and spec.init == "text":
        n_tokens = len(tokenizer(spec.init_text, add_special_tokens=False)["input_ids"])
        if n_tokens < spec.m:
            raise UserError("adapter.init_text",
                            f"has {n_tokens} tokens but adapter.m={spec.m} needs at least that many",
                            "give a longer adapter.init_text, a smaller adapter.m, or adapter.init=zero")
        # Plain text, no chat template: the prefix then equals running the model on those m tokens.
        initialize_kv_prefix_from_text(peft_model, tokenizer, text=spec.init_text, use_chat_template=False)
    return peft_model


@torch.no_grad()
def _init_prompt_from_text(peft_model, tokenizer, spec: PromptSpec) -> None:
    """PEFT's TEXT init, with the tokenizer in hand: the text's token embeddings, repeated to m and cut."""
    ids = tokenizer(spec.init_text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UserError("adapter.init_text", "has no tokens", "give a real text or set adapter.init=vocab")
    ids = (ids * (spec.m // len(ids) + 1))[: spec.m]
    embedding = peft_model.prompt_encoder[peft_model.active_adapter].embedding
    words = peft_model.get_input_embeddings()(torch.tensor(ids, device=embedding.weight.device))
    embedding.weight.copy_(words.to(embedding.weight.dtype))


def _check_gated_prefix(model: torch.nn.Module, spec: GatedPrefixSpec, model_name: str) -> None:
    model_type = getattr(model.config, "model_type", "?")
    if model_type not in GATED_PREFIX_MODEL_TYPES:
        raise UserError("adapter=gated_prefix", f"PEFT's LLaMA-Adapter supports {', '.join(GATED_PREFIX_MODEL_TYPES)} "
                        f"models, and {model_name} is {model_type}", "use adapter=prefix or adapter=prompt")
    n_layers = model.config.num_hidden_layers
    if spec.layers is not None and spec.layers > n_layers:
        raise UserError("adapter.layers", f"is {spec.layers} but {model_name} has {n_layers} layers",
                        f"use <= {n_layers} or null")


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_adapter(base_model, path, is_trainable: bool = False):
    """Load a saved adapter (safetensors only: PEFT prefers them, and we never write .bin)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return PeftModel.from_pretrained(base_model, str(path), is_trainable=is_trainable)


def compiled_lora_config(rank: int, modules: list[str], bias: bool, arch: str, rank_one: list[str] = ()) -> LoraConfig:
    """The LoRA a compiled prefix is written into: scale alpha/r = 1 so B·A is the fitted ΔW.

    rank 0 (bias only) keeps one zero rank slot: PEFT needs r >= 1. `rank_one`: modules (full names, also in
    `modules`) that get rank 1 whatever `rank` is (the sink edit on k_proj and v_proj).
    """
    r = max(rank, 1)
    pattern = {name: 1 for name in rank_one}
    return LoraConfig(
        task_type="CAUSAL_LM", r=r, lora_alpha=r, target_modules=modules, lora_bias=bias,
        fan_in_fan_out=arch == "gpt2", lora_dropout=0.0, rank_pattern=pattern, alpha_pattern=pattern,
    )


def _give_biases(model) -> None:
    """Llama's projections have no bias, so PEFT cannot merge a lora_bias into them. Give every
    attention projection (and, if the MLP's output projection carries a LoRA, every MLP projection) a
    zero bias and set `attention_bias` / `mlp_bias`, the standard config flags that plain transformers
    loads back, so the merged model is an ordinary Llama checkpoint."""
    if getattr(model.config, "model_type", "") not in ("llama",):
        return
    mlp = any(hasattr(layer.mlp.down_proj, "base_layer") for layer in model.model.layers)
    for layer in model.model.layers:
        attn = layer.self_attn
        projections = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
        if mlp:
            projections += [layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
        for proj in projections:
            base = getattr(proj, "base_layer", proj)
            if base.bias is None:
                base.bias = torch.nn.Parameter(torch.zeros(base.out_features, dtype=base.weight.dtype))
    model.config.attention_bias = True
    model.config.mlp_bias = model.config.mlp_bias or mlp


@torch.no_grad()
def lora_delta_weights(peft_model) -> dict[str, torch.Tensor]:
    """The exact change each LoRA module makes: ΔW = scale·B·A (and Δb = scale·b_B with lora_bias),
    computed in float64 from the adapter's own factors and summed over the module's active adapters.

    Keyed by the base model's parameter name (`<module>.weight`, `<module>.bias`) and in that
    parameter's layout (GPT-2's Conv1D stores (in, out)), so it lines up with the base model's
    `named_parameters()`. The one source of LoRA deltas: task vectors and the equivalence analysis
    both read it.
    """
    deltas: dict[str, torch.Tensor] = {}
    for name, module in peft_model.get_base_model().named_modules():
        if not hasattr(module, "lora_A"):
            continue
        for adapter in (a for a in module.active_adapters if a in module.lora_A):
            scale = module.scaling[adapter]
            delta = scale * (module.lora_B[adapter].weight.double() @ module.lora_A[adapter].weight.double())
            parts = {"weight": delta.T if module.fan_in_fan_out else delta}
            if module.lora_B[adapter].bias is not None:
                parts["bias"] = scale * module.lora_B[adapter].bias.double()
            for part, d in parts.items():
                key = f"{name}.{part}"
                deltas[key] = deltas[key] + d if key in deltas else d
    return deltas


def merged_copy(peft_model):
    """A merged deep copy of a LoRA PeftModel (the adapter folded into the weights), in its dtype.

    safe_merge=True: PEFT's plain merge can change layer 0 before it raises on a later layer, and a
    retry then counts it twice; safe_merge checks the merged weights before touching the model.
    """
    return _merge(copy.deepcopy(peft_model))


def _merge(peft_model):
    """The LoRA (or IA3) of `peft_model` folded into its own base model, which is returned."""
    if getattr(peft_model.peft_config[peft_model.active_adapter], "lora_bias", False):  # IA3 has none
        _give_biases(peft_model.get_base_model())
    return peft_model.merge_and_unload(safe_merge=True).eval()


@torch.no_grad()
def merge_in_place(peft_model, dtype: str, check_inputs: dict) -> tuple[torch.nn.Module, float]:
    """Merge a LoRA PeftModel into its own base model, in `dtype`, without a copy; returns the merged model
    and the max abs difference between its logits and the unmerged ones on `check_inputs` (float32)."""
    unmerged = peft_model(**check_inputs).logits.float()
    merged = _merge(peft_model).to(getattr(torch, dtype))
    return merged, float((merged(**check_inputs).logits.float() - unmerged).abs().max())
