"""Batched greedy (or sampled) decoding with the KV cache, alike for a transformers CausalLM and PEFT prefix, prompt,
LoRA (merged or not) and IA3 models.

PEFT's `generate()` silently drops a prefix-tuning prefix (it puts the prefix in `past_key_values`, and
generate's own empty cache wins), so nothing here calls it. Instead `CachedLM` runs one prefill forward
that writes the adapter's virtual tokens and the prompt into the cache, then feeds each new token to the
transformers model with that cache.

Prompts are left-padded inside: every row's last prompt token then sits in the last column, so the
prefill's last logits are every row's next-token logits, and each decode step appends one column for
all rows. Padded positions are masked out, and position ids count real tokens only, so a row decodes
as if it were alone. Callers may pass right- or left-padded batches (`left_align`).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch
from peft import PeftType

from feta.errors import UserError, check_positive
from feta.models import max_positions


def inner_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (the model itself otherwise)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def virtual_tokens(model: torch.nn.Module) -> int:
    """Tokens a PEFT prompt-learning adapter (prefix, prompt tuning) puts in the cache before the prompt."""
    config = getattr(model, "active_peft_config", None)
    if config is None or not getattr(config, "is_prompt_learning", False):
        return 0
    return int(config.num_virtual_tokens)


def _is_prefix(model: torch.nn.Module) -> bool:
    """A prompt-learning adapter whose virtual tokens are keys/values (prefix tuning), not input embeddings."""
    config = getattr(model, "active_peft_config", None)
    return config is not None and config.peft_type == PeftType.PREFIX_TUNING


def _cache_kwarg(lm: torch.nn.Module) -> str:
    # transformers 5.x renames `past_key_values` to `cache` (the old name warns until 5.40); a warning per
    # decoded token would be logging inside a timed loop, so pass whichever name the model declares.
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


def _cache_of(output: Any) -> Any:
    for key in ("cache", "past_key_values"):  # the output field was renamed along with the argument
        if output.get(key) is not None:
            return output[key]
    raise RuntimeError("the model returned no KV cache; is use_cache supported by this architecture?")


def model_positions(model: torch.nn.Module) -> int | None:
    """How many positions the model embeds (None: no limit declared)."""
    return max_positions(inner_model(model).config)


def check_room(model: torch.nn.Module, prompt_len: int, new_tokens: int,
               where: str = "data.max_length + data.max_new_tokens") -> None:
    """Refuse (a UserError naming the settings `where`) virtual tokens + prompt + new tokens beyond the
    model's positions (GPT-2 would index past its position table; a rotary model would extrapolate silently)."""
    n_pos = model_positions(model)
    total = virtual_tokens(model) + prompt_len + new_tokens
    if n_pos is not None and total > n_pos:
        raise UserError(where, f"prefix + prompt + new tokens = {total} > {n_pos} model positions",
                        "shorten the prompts or generate fewer tokens")


def positions_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) position of each token among its row's real tokens (0 on left padding)."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def left_align(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same prompts with every row's real tokens moved to the right end, in order (left padding)."""
    mask = attention_mask.long()
    # A stable sort on the mask puts the 0s (padding) first and keeps the real tokens' order.
    order = torch.sort(mask, dim=1, stable=True).indices
    return input_ids.gather(1, order), mask.gather(1, order)


class CachedLM:
    """Prefill-then-step access to a model: `prefill` runs the prompt (after the adapter's virtual tokens)
    and returns the cache; `step` feeds new tokens with that cache.

    Prefix tuning prefills through PEFT's forward, which writes the m prefix positions into the cache and
    offsets given position ids by m. Prompt tuning prefills the transformers model with the virtual
    tokens' embeddings put before the prompt's: PEFT's forward would do the same but drops position
    ids, which left padding needs. Steps of both call the transformers model, since PEFT's forward
    would replace the cache (prefix) or insert the virtual tokens again (prompt). LoRA and IA3 models
    go through their PEFT forward everywhere.
    """

    def __init__(self, model: torch.nn.Module, **forward_kwargs: Any) -> None:
        self.model = model
        # e.g. PEFT's adapter_names: one LoRA per row (mixed-batch serving), on every forward.
        self.forward_kwargs = forward_kwargs
        self.lm = inner_model(model)
        self.virtual = virtual_tokens(model)
        self.stepper = self.lm if self.virtual else model
        self.cache_kwarg = _cache_kwarg(self.lm)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, Any]:
        """(B, V) logits after the last column of `input_ids` (B, L), and the KV cache of virtual tokens +
        prompt. `attention_mask` (1 = real token) must be left padding; None means no padding."""
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        positions = positions_of(attention_mask)
        kwargs = {"use_cache": True, "logits_to_keep": 1, **self.forward_kwargs}
        if self.virtual and not _is_prefix(self.model):
            m = self.virtual
            prompts = self.model.get_prompt(batch_size=batch)
            words = self.lm.get_input_embeddings()(input_ids)
            virtual_pos = torch.arange(m, device=input_ids.device).expand(batch, m)
            out = self.lm(inputs_embeds=torch.cat([prompts.to(words.dtype), words], dim=1),
                          attention_mask=torch.cat([attention_mask.new_ones(batch, m), attention_mask], dim=1),
                          position_ids=torch.cat([virtual_pos, positions + m], dim=1), **kwargs)
        else:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, **kwargs)
        cache = _cache_of(out)
        expected = length + self.virtual
        if cache.get_seq_length() != expected:
            # Without the virtual tokens in the cache, decoding would silently run the base model.
            raise RuntimeError(f"prefill cache holds {cache.get_seq_length()} positions, "
                               f"expected prompt + prefix = {expected}")
        return out.logits[:, -1], cache

    def step(self, tokens: torch.Tensor, cache: Any, attention_mask: torch.Tensor | None = None,
             position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, V) next-token logits after feeding `tokens` (B, 1); the cache grows by one position.
        `attention_mask` covers the whole cache plus the new token; None (with no position ids) means
        no padding anywhere, and positions continue from the cache length."""
        kwargs = {"attention_mask": attention_mask, "position_ids": position_ids}
        out = self.stepper(input_ids=tokens, use_cache=True, **{self.cache_kwarg: cache}, **self.forward_kwargs,
                           **{k: v for k, v in kwargs.items() if v is not None})
        return out.logits[:, -1]


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """Eval mode inside the block (dropout would make greedy decoding random), each module's mode
    restored after: a LightningModule may keep parts of its model in different modes."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _greedy(logits: torch.Tensor, rows: torch.Tensor, t: int) -> torch.Tensor:
    return logits.argmax(-1)


def greedy_decode(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  max_new_tokens: int, eos_token_id: int | None, pad_token_id: int, **forward_kwargs: Any
                  ) -> torch.Tensor:
    """(B, max_new_tokens) greedy continuations of the prompts `input_ids` (B, L), padded with
    `pad_token_id` after each row's EOS (the EOS itself kept). Stops once every row has produced EOS.

    `attention_mask` marks real tokens (1); rows may be left- or right-padded. Runs in eval mode.
    `forward_kwargs` go to every forward, e.g. PEFT's `adapter_names` (one LoRA per row).
    """
    check_positive("data.max_new_tokens", max_new_tokens)
    limits = torch.full((input_ids.size(0),), max_new_tokens, device=input_ids.device)
    return _decode(model, input_ids, attention_mask, limits, eos_token_id, pad_token_id, _greedy, forward_kwargs)[1]


def prefill_then_greedy(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        new_tokens: list[int], eos_token_id: int | None, pad_token_id: int, **forward_kwargs: Any
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """One prefill over every row, then greedy decoding of the rows that continue: ((B, V) next-token logits
    after each prompt, (B, max(new_tokens)) greedy tokens, each row padded after its own `new_tokens[i]`).
    A row with `new_tokens[i] == 0` is read from the prefill alone (a classification row of a mixed-task
    batch) and leaves the batch before the first decode step, so it costs no step."""
    limits = torch.tensor(new_tokens, device=input_ids.device)
    return _decode(model, input_ids, attention_mask, limits, eos_token_id, pad_token_id, _greedy, forward_kwargs)


def sample_decode(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  max_new_tokens: int, eos_token_id: int | None, pad_token_id: int, temperature: float,
                  uniforms: torch.Tensor) -> torch.Tensor:
    """As greedy_decode, with each token drawn from the softmax of the logits / `temperature`: row i's
    token t is where `uniforms[i, t]` (B, max_new_tokens, in [0, 1)) falls in the cumulative distribution.
    A row's draws are its own: the batch it decodes in moves its sample only through the float round-off
    of its logits."""
    check_positive("temperature", temperature, what="number")
    uniforms = uniforms.to(device=input_ids.device, dtype=torch.float64)  # once, not at every step

    def draw(logits: torch.Tensor, rows: torch.Tensor, t: int) -> torch.Tensor:
        cdf = torch.softmax(logits.double() / temperature, -1).cumsum(-1)
        # A cdf that sums to just below 1 must not index past the vocabulary.
        return torch.searchsorted(cdf, uniforms[rows, t, None], right=True)[:, 0].clamp(max=cdf.size(-1) - 1)

    check_positive("data.max_new_tokens", max_new_tokens)
    limits = torch.full((input_ids.size(0),), max_new_tokens, device=input_ids.device)
    return _decode(model, input_ids, attention_mask, limits, eos_token_id, pad_token_id, draw, {})[1]


def _decode(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, limits: torch.Tensor,
            eos_token_id: int | None, pad_token_id: int, pick, forward_kwargs: dict[str, Any]
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the prefill's (B, V) logits, (B, max(limits)) tokens): row i decodes at most `limits[i]` tokens, each
    chosen by `pick(logits of the live rows, their indices in the batch, the step)`."""
    if bool((limits < 0).any()):
        raise ValueError(f"a row's token budget is negative: {limits.tolist()}")
    max_new_tokens = int(limits.max())
    ids, mask = left_align(input_ids, attention_mask)
    lengths = mask.sum(1)
    if bool((lengths == 0).any()):
        raise ValueError("a prompt has no tokens; decoding needs at least one to condition on")
    check_room(model, ids.size(1), max_new_tokens)
    lm = CachedLM(model, **forward_kwargs)
    out = torch.full((ids.size(0), max_new_tokens), pad_token_id, dtype=torch.long, device=ids.device)
    with _eval_mode(model), torch.inference_mode():
        first, cache = lm.prefill(ids, mask)
        if max_new_tokens == 0:
            return first, out
        rows = torch.arange(ids.size(0), device=ids.device)
        # The cache holds [virtual tokens | padding + prompt]; every new token is a real one.
        full_mask = torch.cat([mask.new_ones(rows.numel(), lm.virtual), mask], dim=1)
        next_pos = (lengths + lm.virtual).unsqueeze(1)  # virtual tokens take positions 0..m-1
        live = _Live(rows, full_mask, next_pos, limits, first, lm, forward_kwargs)
        live.keep(limits > 0, cache)  # rows read from the prefill alone leave before the first step
        for t in range(max_new_tokens):
            token = pick(live.logits, live.rows, t)
            out[live.rows, t] = token
            done = live.limits <= t + 1  # a row's own budget is spent
            if eos_token_id is not None:
                done |= token == eos_token_id
            if t == max_new_tokens - 1 or bool(done.all()):
                break
            # A finished row leaves the batch (and the cache): a batch's steps cost its live rows, not
            # its longest continuation times every row.
            token = live.keep(~done, cache, token)
            live.mask = torch.cat([live.mask, live.mask.new_ones(live.rows.numel(), 1)], dim=1)
            live.logits = lm.step(token.unsqueeze(1), cache, live.mask, live.next_pos + t)
    return first, out


class _Live:
    """The rows of a batch still decoding, with what each step needs of them (mask, positions, budgets,
    last logits, per-row forward arguments such as PEFT's adapter_names)."""

    def __init__(self, rows: torch.Tensor, mask: torch.Tensor, next_pos: torch.Tensor, limits: torch.Tensor,
                 logits: torch.Tensor, lm: CachedLM, forward_kwargs: dict[str, Any]) -> None:
        self.rows, self.mask, self.next_pos, self.limits, self.logits = rows, mask, next_pos, limits, logits
        self.lm, self.forward_kwargs = lm, forward_kwargs

    def keep(self, alive: torch.Tensor, cache: Any, token: torch.Tensor | None = None) -> torch.Tensor | None:
        """Drop the rows where `alive` is False, from these fields and from `cache`; returns `token` of the
        rows kept."""
        if bool(alive.all()):
            return token
        index = alive.nonzero()[:, 0]
        cache.batch_select_indices(index)
        self.rows, self.mask, self.next_pos = self.rows[index], self.mask[index], self.next_pos[index]
        self.limits, self.logits = self.limits[index], self.logits[index]
        self.lm.forward_kwargs = {k: [v[i] for i in self.rows.tolist()] if k == "adapter_names" else v
                                  for k, v in self.forward_kwargs.items()}
        return None if token is None else token[index]


def continuation_text(tokenizer, ids: list[int], eos_token_id: int | None) -> str:
    """The text of generated ids up to the first EOS, padding and special tokens dropped, spaces stripped."""
    if eos_token_id is not None and eos_token_id in ids:
        ids = ids[: ids.index(eos_token_id)]
    # Generated text follows the prompt, so it usually starts with the space separating it from it.
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def pad_token_of(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its EOS, else 0."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def left_padded(prompts: list[list[int]], pad_token_id: int, device: torch.device | str = "cpu"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token-id prompts, left-padded to the longest, on `device`."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, prompt in enumerate(prompts):
        if prompt:
            ids[r, width - len(prompt):] = torch.tensor(prompt)
            mask[r, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def decode_ids(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int | None,
               pad_token_id: int, batch_size: int, adapter_names: list[str] | None = None, temperature: float = 0.0,
               seed: int = 0) -> list[list[int]]:
    """Each prompt's `max_new_tokens` generated ids (padded after its EOS), in the prompts' order: greedy, or
    sampled at `temperature`. Batches group prompts of similar length, so little compute goes to padding.
    A prompt's random draws depend on `seed` and its place in `prompts` alone, not on `batch_size` or the
    device (which move its sample only through the float round-off of its logits). `adapter_names` (one
    per prompt) runs each row through its own LoRA."""
    check_positive("data.eval_batch_size", batch_size)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    uniforms = torch.rand((len(prompts), max_new_tokens), generator=torch.Generator().manual_seed(seed),
                          dtype=torch.float64) if temperature > 0 else None
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        ids, mask = left_padded([prompts[i] for i in rows], pad_token_id, device)
        if uniforms is not None:
            generated = sample_decode(model, ids, mask, max_new_tokens, eos_token_id, pad_token_id, temperature,
                                      uniforms[rows])
        else:
            per_row = {} if adapter_names is None else {"adapter_names": [adapter_names[i] for i in rows]}
            generated = greedy_decode(model, ids, mask, max_new_tokens, eos_token_id, pad_token_id, **per_row)
        for r, i in enumerate(rows):
            out[i] = generated[r].tolist()
    return out


def decode_texts(model: torch.nn.Module, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                 max_length: int, adapter_names: list[str] | None = None) -> list[str]:
    """Greedy continuation text of each prompt (EOS and padding removed, surrounding spaces stripped),
    in the prompts' order.

    Prompts are tokenized as in training (with the tokenizer's special tokens) and keep their last
    `max_length` tokens: the end of a prompt is where its template asks for the answer. `adapter_names`
    (one per prompt) runs each row through its own LoRA of a PEFT model holding several (mixed-batch serving).
    """
    encoded = [tokenizer(p)["input_ids"][-max_length:] for p in prompts]
    eos = tokenizer.eos_token_id
    rows = decode_ids(model, encoded, max_new_tokens, eos, pad_token_of(tokenizer), batch_size, adapter_names)
    return [continuation_text(tokenizer, row, eos) for row in rows]
