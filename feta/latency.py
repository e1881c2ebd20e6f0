"""Per-token latency of a causal LM, for prefill and for cached greedy decoding, and ratios to a base model.

Every figure comes from `torch.utils.benchmark.Timer`, which sets the thread count, warms up, and on an
accelerator synchronizes around each timed block. Reported numbers are the median over the timed blocks
and their interquartile range (IQR), in µs per token.

Works for a plain transformers CausalLM and every PEFT model `feta.decoding` decodes (prefix, prompt,
LoRA merged or not, IA3): the decode loop keeps the prefilled cache, so every decoded token attends to
a prefix (checked by `CachedLM.prefill`).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils.benchmark import Measurement, Timer

from feta.decoding import CachedLM, check_room
from feta.errors import check_choice, check_positive

PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class Setting:
    """One timed configuration: `phase` over a batch of `batch` prompts."""

    phase: str  # "prefill" or "decode"
    batch: int

    def __post_init__(self) -> None:
        check_choice("latency phase", self.phase, PHASES)
        check_positive("latency.batches", self.batch)


# The standard settings: prefill at batch 1 and 32, decode at batch 1.
DEFAULT_SETTINGS = (Setting("prefill", 1), Setting("prefill", 32), Setting("decode", 1))


def _rewind(cache: Any, length: int) -> None:
    """Cut the cache back to its first `length` positions, in place and without copying.

    `DynamicCache.update` appends in place, so a cache reused across timed runs would otherwise grow by
    `decode_tokens` per run (slower runs, positions past the model's limit).
    """
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)  # a negative count removes tokens, in every transformers version that has crop


@contextlib.contextmanager
def frozen(*models: torch.nn.Module):
    """Parameters with requires_grad=False inside the block (restored after), as in deployment.

    Autograd flags change kernels even under inference_mode: torch.matmul folds a non-contiguous
    (B, 1, d) input (the last position kept by `logits_to_keep=1`) into one mm when the weight requires
    grad, but runs a bmm over B when it does not, 1.5x slower for GPT-2's LM head at B=32. A base model
    fresh from `from_config` has trainable weights, a PEFT model frozen ones: without this, a merged
    LoRA looked 38% slower than its identical base model.
    """
    params = list({id(p): p for m in models for p in m.parameters()}.values())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def batch_of(input_ids: torch.Tensor, batch: int) -> torch.Tensor:
    """(batch, L) prompts from (B, L) `input_ids`, cycling through its rows when batch > B."""
    reps = -(-batch // input_ids.size(0))
    return input_ids.repeat(reps, 1)[:batch].contiguous()


def prefill_fn(model: torch.nn.Module, input_ids: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A callable running one prefill forward over `input_ids` (B, L); returns the (B, 1, V) last logits.

    The cache is built (as in generation) but only the last position goes through the LM head: that is
    what `generate` computes, and the vocabulary projection, identical for every adapter, would otherwise
    dilute the ratios.
    """

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return model(input_ids=input_ids, use_cache=True, logits_to_keep=1).logits

    return run


class Decoder:
    """Greedy cached decoding of `n_tokens` tokens after one untimed prefill of `input_ids` (B, L).

    `__call__` replays the same decode from the same prefilled cache every time (the cache is rewound
    first), so it can be timed repeatedly. Prefill and steps are `feta.decoding.CachedLM`'s: a prefix
    model's m positions are in the cache before the prompt, and every decoded token attends to them.
    The rows are unpadded, so steps pass no mask and no position ids, as a single generation would.
    """

    def __init__(self, model: torch.nn.Module, input_ids: torch.Tensor, n_tokens: int) -> None:
        check_positive("latency.decode_tokens", n_tokens)
        check_room(model, input_ids.size(1), n_tokens, where="latency.prompt_len + latency.decode_tokens")
        self.lm = CachedLM(model)
        self.n_tokens = n_tokens
        with torch.inference_mode():
            self.prefill_logits, self.cache = self.lm.prefill(input_ids)  # (B, V), checked to hold the prefix
        self.first_token = self.prefill_logits.argmax(-1, keepdim=True)  # (B, 1): prefill's greedy token
        self.prefill_len = self.cache.get_seq_length()

    def __call__(self, return_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Greedy tokens (B, n_tokens) generated after `first_token`; with `return_logits`, also their
        (B, n_tokens, V) logits, i.e. step t's logits are those that chose token t."""
        logits = []
        tokens = []
        with torch.inference_mode():
            _rewind(self.cache, self.prefill_len)
            token = self.first_token
            for _ in range(self.n_tokens):
                step_logits = self.lm.step(token, self.cache)  # (B, V)
                token = step_logits.argmax(-1, keepdim=True)  # stays on the device: no .item() while timed
                tokens.append(token)
                if return_logits:
                    logits.append(step_logits)
        ids = torch.cat(tokens, dim=1)
        return (ids, torch.stack(logits, dim=1)) if return_logits else ids


def _timer(model: torch.nn.Module, input_ids: torch.Tensor, setting: Setting, decode_tokens: int,
           num_threads: int, name: str) -> tuple[Timer, int]:
    """A Timer for one (model, setting) and the number of tokens one run of it produces or consumes."""
    ids = batch_of(input_ids, setting.batch)
    if setting.phase == "prefill":
        fn, tokens = prefill_fn(model, ids), ids.numel()
    else:
        fn, tokens = Decoder(model, ids, decode_tokens), setting.batch * decode_tokens
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=num_threads,
                  label="latency", sub_label=name, description=f"{setting.phase} b={setting.batch}")
    return timer, tokens


def _summary(measurements: list[Measurement]) -> Measurement:
    # merge() pools the blocks of repeated measurements of one Timer, normalized to one run each.
    return Measurement.merge(measurements)[0]


def context(model: torch.nn.Module, num_threads: int | None = None) -> dict[str, Any]:
    """Where the numbers were measured: device, weights dtype, torch threads, and the 1-minute load
    average against the CPU count (other jobs on the machine are the main source of CPU noise)."""
    p = next(model.parameters())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    return {"device": str(p.device), "dtype": str(p.dtype).removeprefix("torch."),
            "threads": num_threads or torch.get_num_threads(), "load_avg": round(load, 2), "cpus": os.cpu_count()}


def measure(model: torch.nn.Module, input_ids: torch.Tensor, *, decode_tokens: int = 32,
            min_run_time: float = 1.0, num_threads: int | None = None) -> dict[str, Any]:
    """Latency of one model on prompts `input_ids` (B, L) (token ids on the model's device).

    prefill: one forward over the B×L prompt tokens, per token. decode: `decode_tokens` cached greedy
    steps at batch B after an untimed prefill, per generated token (B × decode_tokens of them).
    Each phase: blocked_autorange (warm-up, then blocks for at least `min_run_time` s); median and IQR
    over its blocks, in µs/token. Puts the model in eval mode (timing is inference: no dropout) and
    freezes its parameters while timing (`frozen`).

    Returns {prefill_us_per_token, prefill_iqr_us, decode_us_per_token, decode_iqr_us, batch,
    prompt_len, decode_tokens, context}.
    """
    model.eval()
    threads = num_threads or torch.get_num_threads()
    batch = input_ids.size(0)
    result: dict[str, Any] = {"batch": batch, "prompt_len": input_ids.size(1), "decode_tokens": decode_tokens}
    with frozen(model):
        for phase in PHASES:
            timer, tokens = _timer(model, input_ids, Setting(phase, batch), decode_tokens, threads, "model")
            m = timer.blocked_autorange(min_run_time=min_run_time)
            result[f"{phase}_us_per_token"] = m.median * 1e6 / tokens
            result[f"{phase}_iqr_us"] = m.iqr * 1e6 / tokens
    result["context"] = context(model, threads)
    return result


def _interleave(timers: dict[str, Timer], base: str, repeats: int, min_run_time: float
                ) -> tuple[dict[str, list[Measurement]], dict[str, list[Measurement]]]:
    """Samples of every timer in the order base, c1, base, c2, ..., cN, base, `repeats` times.

    Returns each name's measurements and, per candidate, the base measurements right before and after
    each of its own: its ratio then compares blocks taken moments apart, so a slow drift of the machine
    (thermal, other jobs) cancels. The candidates' order rotates between repeats so none always runs
    first after a base block.
    """
    names = [n for n in timers if n != base]
    samples: dict[str, list[Measurement]] = {n: [] for n in timers}
    brackets: dict[str, list[Measurement]] = {n: [] for n in names}
    for rep in range(repeats):
        shift = rep % len(names) if names else 0
        before = timers[base].blocked_autorange(min_run_time=min_run_time)
        samples[base].append(before)
        for name in names[shift:] + names[:shift]:
            samples[name].append(timers[name].blocked_autorange(min_run_time=min_run_time))
            after = timers[base].blocked_autorange(min_run_time=min_run_time)
            samples[base].append(after)
            brackets[name] += [before, after]
            before = after
    return samples, brackets


def compare(base: torch.nn.Module, candidates: dict[str, torch.nn.Module], input_ids: torch.Tensor, *,
            settings: tuple[Setting, ...] = DEFAULT_SETTINGS, decode_tokens: int = 32, repeats: int = 3,
            min_run_time: float = 0.2, num_threads: int | None = None, base_name: str = "base"
            ) -> list[dict[str, Any]]:
    """Latency of `base` and each candidate in this process, interleaved, as rows with ratios to base.

    input_ids: (B, L) prompts; a setting of batch b uses b rows (cycled if b > B). Each (model, setting)
    gets one blocked_autorange of at least `min_run_time` s per interleaving slot (its first run is the
    warm-up), `repeats` rounds of base, c1, base, c2, ... base.

    Rows: name, phase, batch, prompt_len, us_per_token (median), iqr_us (IQR of the blocks),
    ratio_to_base (candidate median / median of the base blocks bracketing it), ratio_iqr (IQR of the
    per-round ratios, the noise of that ratio; NaN with one round), n_blocks, base_us_per_token,
    context {device, dtype, threads, load_avg, cpus}.
    Puts every model in eval mode; parameters are frozen while timing (`frozen`).
    """
    if base_name in candidates:
        raise ValueError(f"a candidate is named {base_name!r}, like the base model; rename it")
    models = {base_name: base, **candidates}
    threads = num_threads or torch.get_num_threads()
    ctx = context(base, threads)
    rows = []
    for setting in settings:
        timers, tokens = {}, {}
        for name, model in models.items():
            model.eval()
            timers[name], tokens[name] = _timer(model, input_ids, setting, decode_tokens, threads, name)
        with frozen(*models.values()):
            samples, brackets = _interleave(timers, base_name, repeats, min_run_time)
        base_median = _summary(samples[base_name]).median
        for name in models:
            m = _summary(samples[name])
            if name == base_name:
                ratio, ratio_iqr = 1.0, 0.0
            else:
                ratio = m.median / _summary(brackets[name]).median
                ratio_iqr = _ratio_iqr(samples[name], brackets[name])
            rows.append({
                "name": name, "phase": setting.phase, "batch": setting.batch, "prompt_len": input_ids.size(1),
                "us_per_token": m.median * 1e6 / tokens[name], "iqr_us": m.iqr * 1e6 / tokens[name],
                "ratio_to_base": ratio, "ratio_iqr": ratio_iqr, "n_blocks": len(m.times),
                "base_us_per_token": base_median * 1e6 / tokens[base_name], "context": dict(ctx),
            })
    return rows


def _ratio_iqr(cand: list[Measurement], brackets: list[Measurement]) -> float:
    """IQR of round-wise ratios (candidate slot median / mean of its two bracketing base medians)."""
    ratios = [c.median / ((b0.median + b1.median) / 2) for c, b0, b1 in zip(cand, brackets[::2], brackets[1::2])]
    if len(ratios) < 2:
        return math.nan  # one round: no spread to report (0 would claim a noiseless ratio)
    q = torch.tensor(ratios, dtype=torch.float64).quantile(torch.tensor([0.25, 0.75], dtype=torch.float64))
    return float(q[1] - q[0])
