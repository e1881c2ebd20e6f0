"""What a compile needs in memory beside its one model, said before it starts, and what it used.

The layer-by-layer fit holds, per micro-batch, the compiled model's and the source's inputs to the current
layer, the source's attention output there (and its MLP output for an MLP fit, its layer input for
match=stream) and the arguments the model hands each layer (the attention mask above all): the
calibration caches. Beside them: float64 statistics per fitted module, and the working memory of one
micro-batch through one layer, or through the whole model for the held-out measures. The caches stay on
an accelerator when they fit within its budget, else they wait on the CPU (the offload pattern).
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

import psutil
import torch
from torch import Tensor

from feta.compile.spec import CompileSpec, Match
from feta.errors import UserError

GB = 1e9
# Headroom for the allocator and the libraries' own buffers.
SLACK = 0.3 * GB
# Rows decoded at once, at most. A decode step reads every weight whatever its batch, so wide batches
# pay, up to a point: 256 sampled E2E continuations on SmolLM2-135M, 2 CPU cores, took 75 s in batches
# of 32, 54 s of 128 and 53 s of 256 (`python benchmarks/decode_batch.py multirun/e2e/0`).
DECODE_ROWS = 128
# Share of the free memory a decode batch may take.
DECODE_SHARE = 0.25


@dataclass
class MemoryPlan:
    """Bytes beside the model's weights: calibration caches, fit statistics, working memory."""

    caches: float
    statistics: float
    working: float
    tokens: int  # padded calibration tokens
    store: str  # where the caches wait: the device, or "cpu"

    @property
    def total(self) -> float:
        return self.caches + self.statistics + self.working + SLACK

    def describe(self) -> str:
        return (f"{self.total / GB:.2f} GB beside the model: calibration caches {self.caches / GB:.2f} GB "
                f"({self.tokens:,} tokens, on {self.store}), statistics {self.statistics / GB:.2f} GB, "
                f"working {self.working / GB:.2f} GB")


def _shape(c) -> tuple[int, int, int, int, int]:
    """A transformers config's (width, layers, MLP width, attention heads, key/value width)."""
    width, heads = c.hidden_size, c.num_attention_heads
    ffn = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * width
    kv_width = getattr(c, "num_key_value_heads", heads) * (getattr(c, "head_dim", None) or width // heads)
    return width, c.num_hidden_layers, ffn, heads, kv_width


def plan(model: torch.nn.Module, batches: list[dict[str, Tensor]], held_out: list[dict[str, Tensor]], spec: CompileSpec,
         m: int, device: torch.device) -> MemoryPlan:
    """The memory the compile will use beside `model`; refuses, naming calib_size and calib_max_length,
    when the machine has less."""
    c = model.config
    width, layers, ffn, heads, kv_width = _shape(c)
    item = next(model.parameters()).element_size()
    tokens = sum(b["input_ids"].numel() for b in batches)
    kinds = set(spec.module_kinds)
    closed = spec.closed_form
    # Per token: two streams' inputs, the source's attention output, its MLP output, its layer input.
    per_token = 2 + (1 if closed else 0) + ("mlp" in kinds) + (spec.match is Match.stream)
    masks = sum(2 * b["input_ids"].shape[0] * b["input_ids"].shape[1] * (b["input_ids"].shape[1] + m) * item
                for b in batches)
    caches = tokens * width * item * per_token + masks if closed else 0.0
    d = 8  # float64
    statistics = 0.0
    if closed:
        outs = {"o": (width, width), "mlp": (ffn, width)}
        weighted = 2 if spec.last_weight != 1 else 1  # the unweighted sums of the residual, when they differ
        statistics = sum(weighted * (d_in * d_in + d_in * d_out) * d for k, (d_in, d_out) in outs.items() if k in kinds)
        if spec.folds_sink:
            statistics += (3 * width * width + 2 * kv_width * kv_width) * d
    # One micro-batch through one layer (MLP activations, attention scores), or through the whole model
    # with every layer's hidden states kept, for three views, in the held-out measures and the sink search.
    B, T = max((b["input_ids"].shape for b in batches + held_out), key=lambda s: s[0] * s[1])
    one_layer = B * T * (3 * ffn + 8 * width + heads * (T + m) * 2) * item
    measures = 3 * layers * B * T * width * item + B * c.vocab_size * 4 * 3
    rows = B * T * heads * (4 * (width // heads)) * d  # the sink fit's per-row terms of a micro-batch
    working = max(one_layer, measures) + (rows if spec.folds_sink else 0)
    store = str(device)
    if device.type == "cuda":
        free = _free(device, spec.memory_gb)
        if caches + statistics + working + SLACK > free:
            store = "cpu"  # the caches wait on the CPU; each layer call moves its micro-batch over
    need = MemoryPlan(caches, statistics, working, tokens, store)
    _check(need, device, spec)
    return need


def decode_batch(model: torch.nn.Module, row_tokens: int, memory_gb: float | None = None) -> int:
    """Rows to decode at once: at most DECODE_ROWS, and as many as DECODE_SHARE of the memory free on the
    model's device (or of `memory_gb`) holds: each row's KV cache of `row_tokens` positions, its
    activations through one layer of the prefill, and its logits."""
    c = model.config
    width, layers, ffn, heads, kv_width = _shape(c)
    param = next(model.parameters())
    item = param.element_size()
    per_token = 2 * layers * kv_width + 3 * ffn + 8 * width + heads * row_tokens
    per_row = per_token * row_tokens * item + 3 * c.vocab_size * 4
    return max(1, min(DECODE_ROWS, int(DECODE_SHARE * _free(param.device, memory_gb) // per_row)))


def _free(device: torch.device, memory_gb: float | None = None) -> float:
    """Bytes the compile may use on `device`: `memory_gb` when given, else what is free there (the host's
    available memory for the CPU)."""
    if memory_gb is not None:
        return memory_gb * GB
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    return float(psutil.virtual_memory().available)


def _check(need: MemoryPlan, device: torch.device, spec: CompileSpec) -> None:
    free = _free(device, spec.memory_gb)
    if device.type == "cuda":
        on_device = need.statistics + need.working + SLACK + (need.caches if need.store != "cpu" else 0.0)
        host = need.caches if need.store == "cpu" else 0.0
        short = on_device > free or host > _free(torch.device("cpu"))
    else:
        short = need.total > free
    if short:
        raise UserError("calib_size", f"the compile needs {need.describe()}, and {free / GB:.2f} GB is free "
                        f"on {device}", "lower calib_size or calib_max_length (the caches grow with their tokens)")


def peak() -> dict[str, float]:
    """This process's peak resident memory (GB) so far, and the accelerator's peak allocation if one ran."""
    record = {"peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, 3)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        record["cuda_peak_gb"] = round(torch.cuda.max_memory_allocated() / GB, 3)
    return record
