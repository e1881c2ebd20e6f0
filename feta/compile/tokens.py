"""Which tokens a compile fits and measures: micro-batches, attention sinks, per-token weights.

Attention-sink tokens (massive hidden-state norm in the base model, usually the first real token) are
left out of the regression sums by default: a prefix takes their role over, so their change is orders
of magnitude larger than any other token's and swamps the least squares (SmolLM2, r=4, no bias: 71.8%
with the sink in, 86.7% with it out; docs/results/compile_methods.md). The adapter still applies to it.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor

from feta.compile.spec import CompileSpec, FitPositions

BATCH_KEYS = ("input_ids", "attention_mask", "scored")


def micro_batches(batch: dict[str, Tensor], size: int) -> list[dict[str, Tensor]]:
    """The rows of a right-padded batch sorted by length, in chunks of `size`, each cut to its own
    longest row, so little compute goes to padding."""
    mask = batch["attention_mask"]
    if (mask[:, 1:] > mask[:, :-1]).any():
        raise ValueError("micro_batches needs right padding (tokenizer.padding_side = 'right')")
    lengths = mask.sum(1)
    chunks = torch.argsort(lengths, stable=True).split(size)
    return [{k: batch[k][rows, : int(lengths[rows].max())] for k in BATCH_KEYS if k in batch} for rows in chunks]


def detect_sinks(h: Tensor, mask: Tensor, ratio: float) -> Tensor:
    """Attention-sink / massive-activation tokens: hidden-state norm above `ratio` x the median.

    h: (B, T, d) hidden states, mask: (B, T) 1 for real tokens. Returns (B, T) bool.
    """
    norms = h.norm(dim=-1)  # (B, T)
    median = norms[mask.bool()].median()
    return (norms > ratio * median) & mask.bool()


def sinks_in(hidden: list[Tensor] | Tensor, batch: dict[str, Tensor], ratio: float) -> Tensor:
    """(B, T) bool: sinks at any of the base model's layers `hidden` (each (B, T, d)); never a scored
    position."""
    mask = batch["attention_mask"].bool()
    return torch.stack([detect_sinks(h, mask, ratio) for h in hidden]).any(0) & ~batch["scored"]


@torch.no_grad()
def find_sinks(base_model, batch: dict[str, Tensor], ratio: float) -> Tensor:
    """(B, T) bool: tokens that are massive activations at any layer of the BASE model, where it parks
    attention (usually the first real token). Not in the prefix model: the prefix takes that role over,
    which is exactly why those tokens change so much."""
    out = base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True,
                     logits_to_keep=1)
    return sinks_in(out.hidden_states[1:], batch, ratio)


def fit_weights(batches: list[dict[str, Tensor]], sinks: list[Tensor], spec: CompileSpec) -> tuple[list[Tensor], dict]:
    """Per-token regression weights (B, T) per micro-batch from `fit_positions` (scored positions
    weighted `last_weight`), and a record of what was left out."""
    weights, counts, total, fitted = [], Counter(), 0, 0
    for batch, sink in zip(batches, sinks):
        mask, scored = batch["attention_mask"].bool(), batch["scored"]
        keep = {FitPositions.last: scored, FitPositions.all: mask, FitPositions.content: mask & ~sink}[spec.fit_positions]
        weights.append(keep.double() * torch.where(scored, spec.last_weight, 1.0).double())
        total, fitted = total + int(mask.sum()), fitted + int(keep.sum())
        counts.update(sink.nonzero()[:, 1].tolist())
    record = {
        "fit_positions": spec.fit_positions.value,
        "tokens_total": total,
        "tokens_fitted": fitted,
        "sinks_detected": counts.total(),
        "sink_positions": dict(sorted(counts.items())),
        "sink_rule": f"base-model hidden-state norm > {spec.sink_ratio} x median at any layer",
    }
    return weights, record
