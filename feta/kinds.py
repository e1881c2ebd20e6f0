"""The adapter kinds feta knows and what each can do. Every "is this a prefix?" question asks here.

    from feta.kinds import KINDS, kinds
    KINDS["prefix"].token        # True: it acts through extra keys/values, not through the weights
    kinds(mixed_batch=True)      # ("lora", "compiled"): what serve.py runs together in one forward

The standard library only: the report reads it without loading PEFT.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

BASE_ROW = "base"  # the kind of a report's base-model row (no adapter)


@dataclass(frozen=True)
class Kind:
    name: str
    token: bool  # acts through extra keys/values or input embeddings (token adaptation); else it changes weights
    mergeable: bool  # folds into the base weights (PEFT merge_and_unload): the merged model is its deployed form
    compilable: bool  # compile.py turns it into a LoRA that merges
    mixed_batch: bool  # serve.py runs rows of several such adapters in one forward (PEFT's adapter_names)
    interpolable: bool  # its whole adapter is one tensor of virtual-token parameters: two can be blended
    low_rank: bool  # its weight update is a LoRA's B·A


# In the order the report lists them.
KINDS = {k.name: k for k in (
    Kind("prefix", token=True, mergeable=False, compilable=True, mixed_batch=False, interpolable=True, low_rank=False),
    Kind("prompt", token=True, mergeable=False, compilable=True, mixed_batch=False, interpolable=True, low_rank=False),
    Kind("gated_prefix", token=True, mergeable=False, compilable=True, mixed_batch=False, interpolable=False,
         low_rank=False),
    Kind("lora", token=False, mergeable=True, compilable=False, mixed_batch=True, interpolable=False, low_rank=True),
    Kind("ia3", token=False, mergeable=True, compilable=False, mixed_batch=False, interpolable=False, low_rank=False),
    # A token adaptation compiled into a LoRA by compile.py.
    Kind("compiled", token=False, mergeable=True, compilable=False, mixed_batch=True, interpolable=False,
         low_rank=True),
)}
TRAITS = tuple(f.name for f in fields(Kind) if f.name != "name")


def kinds(**traits: bool) -> tuple[str, ...]:
    """The kinds whose traits equal every one given, in report order: kinds(token=True)."""
    unknown = set(traits) - set(TRAITS)
    if unknown:
        raise TypeError(f"unknown trait(s) {sorted(unknown)}; traits: {', '.join(TRAITS)}")
    return tuple(name for name, k in KINDS.items() if all(getattr(k, t) == v for t, v in traits.items()))
