"""What the LM head says at the positions a task scores: class log-probabilities and target-token logits.

Training, evaluation, distillation and serving all read a model's output through these two functions,
so a prefix, a soft prompt, a LoRA and a compiled LoRA are scored the same way. The full-vocabulary
head runs only at the scored positions (`logits_to_keep=1` skips it elsewhere).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def input_positions(h: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The input's own positions of a (B, n_virtual + T, ...) activation: a soft prompt (PEFT prompt
    tuning) prepends n_virtual positions to the sequence; a prefix (a KV cache) does not."""
    return h[:, h.size(1) - input_ids.size(1):]


def _final_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, **forward_kwargs: Any) -> torch.Tensor:
    """(B, T, d) last hidden states at the input's positions, after the final norm."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=1,
                **forward_kwargs)
    return input_positions(out.hidden_states[-1], input_ids)


def scored_logits(model, batch: dict[str, torch.Tensor], h: torch.Tensor | None = None,
                  **forward_kwargs: Any) -> torch.Tensor:
    """(n_scored, V) next-token logits at `batch["scored"]`, row by row. `h`: the (B, T, d) final hidden
    states when the caller already ran the model. `forward_kwargs` go to the model's forward, e.g. PEFT's
    `adapter_names` (one adapter per row)."""
    if h is None:
        h = _final_hidden(model, batch["input_ids"], batch["attention_mask"], **forward_kwargs)
    return model.get_output_embeddings()(h[batch["scored"]])


def _continuations(input_ids: torch.Tensor, attention_mask: torch.Tensor, verbalizer_ids: list[list[int]],
                   pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every prompt followed by every verbalizer: ids and mask (B*K, T'), and (B*K, T') bool marking the
    positions whose next token is a verbalizer token."""
    lengths = attention_mask.sum(1).tolist()
    rows = [input_ids[i, :n].tolist() + v for i, n in enumerate(lengths) for v in verbalizer_ids]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=input_ids.dtype, device=input_ids.device)
    mask = torch.zeros_like(ids)
    reads = torch.zeros_like(ids, dtype=torch.bool)
    for j, row in enumerate(rows):
        n, k = lengths[j // len(verbalizer_ids)], len(verbalizer_ids[j % len(verbalizer_ids)])
        ids[j, : len(row)] = torch.tensor(row)
        mask[j, : len(row)] = 1
        reads[j, n - 1: n - 1 + k] = True
    return ids, mask, reads


def class_log_probs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, verbalizer_ids: list[list[int]],
                    h: torch.Tensor | None = None, **forward_kwargs: Any) -> torch.Tensor:
    """(B, K) log-probability of each class's verbalizer as the continuation of each right-padded prompt,
    summed over its tokens (a multi-token word is scored whole, never cut to its first token). `h`: the
    prompts' (B, T, d) final hidden states when the caller already ran the model (single-token words)."""
    head = model.get_output_embeddings()
    if all(len(v) == 1 for v in verbalizer_ids):  # one forward over the prompts
        if h is None:
            h = _final_hidden(model, input_ids, attention_mask, **forward_kwargs)
        h_last = h[torch.arange(h.size(0), device=h.device), attention_mask.sum(1) - 1]  # (B, d)
        return F.log_softmax(head(h_last).float(), -1)[:, [v[0] for v in verbalizer_ids]]
    K = len(verbalizer_ids)
    pad = int(input_ids[attention_mask == 0][0]) if (attention_mask == 0).any() else 0
    ids, mask, reads = _continuations(input_ids, attention_mask, verbalizer_ids, pad)
    kwargs = {k: [v for v in val for _ in range(K)] if k == "adapter_names" else val for k, val in forward_kwargs.items()}
    h = _final_hidden(model, ids, mask, **kwargs)  # (B*K, T', d)
    logp = F.log_softmax(head(h[reads]).float(), -1)  # (n_reads, V)
    targets = ids[:, 1:][reads[:, :-1]]  # the verbalizer token each read position predicts
    per_token = logp.gather(1, targets[:, None])[:, 0]
    row = reads.nonzero()[:, 0]
    scores = torch.zeros(ids.size(0), dtype=per_token.dtype, device=ids.device).index_add_(0, row, per_token)
    return scores.view(-1, K)
