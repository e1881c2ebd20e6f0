"""One base model in memory while a prefix compiles, seen three ways: the base model, the source (the token
adaptation being compiled) and the compiled LoRA.

The compiled LoRA is a PEFT LoRA injected into the base model in place; turning it off gives the base
model. The source is one of two forms:
- key/value slots (prefix tuning, prompt tuning, P-tuning): per layer, the keys and values the adapted
  model attends to before the input, whose tokens sit at positions m, m+1, … A soft prompt's virtual
  tokens come first and attend only to each other, so their keys and values do not depend on the input:
  computed once, they are a prefix, exactly. The source is then the base model with those slots in its
  cache, and a single decoder layer runs as the source with its own slots (`layer_cache`).
- a gated prefix (LLaMA-Adapter, PEFT's adaption prompt): its wrappers around the attention modules are
  swapped in for the source view only.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import Tensor
from transformers import DynamicCache

from feta.adapters import load_adapter

GATED = "ADAPTION_PROMPT"


class SlotCache:
    """What one attention layer of the source attends to before the input: its m key/value slots. Stands in
    for the model's cache in a single layer's forward (the attention calls only `update`), and, unlike
    transformers' DynamicCache, never grows: every call sees the slots alone."""

    def __init__(self, keys: Tensor, values: Tensor) -> None:
        self.keys, self.values = keys, values  # (n_kv, m, d): keys as stored, rotated to positions 0..m-1

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        B = key_states.shape[0]
        k, v = (t.to(key_states)[None].expand(B, -1, -1, -1) for t in (self.keys, self.values))
        return torch.cat([k, key_states], 2), torch.cat([v, value_states], 2)


class View:
    """A forward of the one model in one mode, called like the model (scoring reads its output embeddings)."""

    def __init__(self, owner: CompileModel, mode: Callable[[], contextlib.AbstractContextManager],
                 inputs: Callable[[dict], dict] = lambda kw: kw) -> None:
        self.owner, self.mode, self.inputs = owner, mode, inputs

    def __call__(self, **kwargs: Any):
        with self.mode():
            return self.owner.model(**self.inputs(kwargs))

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.owner.model.get_output_embeddings()


@torch.no_grad()
def slot_key_values(adapted, m: int) -> list[tuple[Tensor, Tensor]]:
    """Per layer, the m virtual slots' keys and values (n_kv, m, d) of a PEFT prompt-learning model, as the
    adapted model attends to them. A prefix stores them (PEFT's get_prompt, cast to the model's dtype); a
    soft prompt's or P-tuning's are computed from its virtual tokens, which come first."""
    config = adapted.active_peft_config
    if config.peft_type.value == "PREFIX_TUNING":
        return [(layer.keys[0], layer.values[0]) for layer in adapted.get_prompt(batch_size=1).layers]
    device = next(adapted.get_base_model().parameters()).device
    out = adapted(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=True)
    cache = out.get("past_key_values") or out.get("cache")
    return [(layer.keys[0, :, :m], layer.values[0, :, :m]) for layer in cache.layers]


class CompileModel:
    """The base model with the compiled LoRA injected in place and the source beside it. `base`, `source` and
    `compiled` are Views; `lora` is the PEFT LoRA model (its parameters are what a compile fits)."""

    def __init__(self, base: torch.nn.Module, adapter_dir, peft_type: str, lora_config: LoraConfig) -> None:
        self.peft_type = peft_type
        self.slots: list[tuple[Tensor, Tensor]] | None = None
        self.gated = None
        if peft_type != GATED:  # read the slots, then let the prompt-learning wrapper go (it leaves `base` as it was)
            adapted = load_adapter(base, adapter_dir).eval()
            self.m = adapted.active_peft_config.num_virtual_tokens
            adapted.prompt_encoder.to(device=next(base.parameters()).device, dtype=base.dtype)
            self.slots = [(k.detach().to(base.dtype), v.detach().to(base.dtype)) for k, v in slot_key_values(adapted, self.m)]
            del adapted
        self.lora = get_peft_model(base, lora_config).eval()
        self.model = self.lora.get_base_model()
        if peft_type == GATED:
            with warnings.catch_warnings():  # PEFT warns that the model already holds an adapter: the LoRA
                warnings.simplefilter("ignore", UserWarning)
                self.gated = load_adapter(self.model, adapter_dir).eval()
            self.gated.to(device=next(base.parameters()).device, dtype=base.dtype)
            self.m = self.gated.active_peft_config.adapter_len
            self.gated.base_model.disable_adapter_layers()  # swapped in only for the source view
        self.base = View(self, self.base_mode)
        self.source = View(self, self.source_mode, self.source_inputs)
        self.compiled = View(self, contextlib.nullcontext)

    @contextlib.contextmanager
    def base_mode(self) -> Iterator[None]:
        with self.lora.disable_adapter():
            yield

    @contextlib.contextmanager
    def source_mode(self) -> Iterator[None]:
        with self.lora.disable_adapter():
            if self.gated is None:
                yield
                return
            self.gated.base_model.enable_adapter_layers()
            try:
                yield
            finally:
                self.gated.base_model.disable_adapter_layers()

    def source_inputs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """A forward's arguments for the source: with slots, a fresh cache holding them and the attention
        mask widened by m attended columns (what PEFT's prefix forward passes); a gated prefix needs none."""
        if self.slots is None:
            return kwargs
        mask = kwargs["attention_mask"]
        B = mask.shape[0]
        cache = DynamicCache(config=self.model.config)
        for i, (k, v) in enumerate(self.slots):
            cache.update(k[None].expand(B, -1, -1, -1).contiguous(), v[None].expand(B, -1, -1, -1).contiguous(), i)
        return {**kwargs, "attention_mask": torch.cat([mask.new_ones(B, self.m), mask], 1), "cache": cache}

    def layer_cache(self, i: int) -> SlotCache | None:
        """What layer i's attention attends to before the input in the source, for a single layer's forward."""
        return None if self.slots is None else SlotCache(*self.slots[i])

    def prefix_key_values(self) -> list[tuple[Tensor, Tensor]] | None:
        """Per layer, the source's slots (n_kv, m, d); None for a gated prefix."""
        return self.slots
