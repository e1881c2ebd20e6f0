"""How closely a compiled LoRA reproduces its source adapter's next-token predictions (compile.json's
`next_token`), measured on the held-out inputs at the scored positions, and where the base model stands.

Agreement says how often greedy decoding keeps the adapter's next token; KL(adapter ‖ compiled) also sees
the probabilities below the top token, which sampling and later tokens depend on. Both are task-free, so
they measure a plain PEFT adapter compiled from a prompt file as well as a feta run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from feta.scoring import scored_logits


@torch.no_grad()
def next_token(base_model, source_model, compiled_model, batches: list[dict[str, Tensor]],
               name: str = "next_token") -> dict[str, float | int]:
    """{<name>_agreement, <name>_kl, base_<name>_agreement, base_<name>_kl, positions}: top-1 agreement with
    the source adapter and mean KL(source ‖ model) in nats, for the compiled model and for the base model,
    over every scored position of `batches`. `name` says which measure it is: next_token on held-out
    inputs, own_token on the source's own continuations (teacher-forced)."""
    sums = {f"{name}_agreement": 0.0, f"{name}_kl": 0.0, f"base_{name}_agreement": 0.0, f"base_{name}_kl": 0.0}
    positions = 0
    for batch in batches:
        target = F.log_softmax(scored_logits(source_model, batch).float(), -1)  # (n_scored, V)
        top = target.argmax(-1)
        for prefix, model in (("", compiled_model), ("base_", base_model)):
            logp = F.log_softmax(scored_logits(model, batch).float(), -1)
            sums[f"{prefix}{name}_agreement"] += float((logp.argmax(-1) == top).sum())
            sums[f"{prefix}{name}_kl"] += float((target.exp() * (target - logp)).sum(-1).double().sum())
        positions += int(top.numel())
    return {**{k: v / max(positions, 1) for k, v in sums.items()}, "positions": positions}
