"""Compile a trained prefix into LoRA weights: prefix behaviour at the base model's inference cost.

The closed form (`method=lstsq`): for every layer l, in order, a LoRA on the attention output
projection W (input x, per token) is fitted to the prefix-induced change of that projection's output
(`match=module`, the default):

    target_l = o_prefix_l - W x_compiled_l                                # (n_tokens, d)
    min_{rank(ΔW) <= r}  sum_t w_t ||target_t - ΔW x_t||^2 + ridge ||ΔW||^2

`match=stream` targets the whole residual stream after attention instead (h_mid_prefix − h_in_compiled
− W x), so a layer also tries to undo earlier layers' error; on SmolLM2 it was worse (85.6% vs 86.7%).
`target=o+mlp` also fits the MLP's output projection, to the MLP's change (or, with match=stream, to
what the layer's output still lacks); its input is a rich nonlinear feature of the token, yet at r=4 on
SmolLM2 it lost accuracy (82.5% / 85.7%): a rank-4 map leaves 0.84-0.94 of the MLP's change (relative
residual on the calibration tokens), and what it does fit does not carry over to held-out sentences.
q/k/v change attention itself, so only distill fits them.
"Sequential": x comes from the compiled model itself, layers < l already compiled. All layers are
fitted in ONE forward pass of the calibration set: a pre-hook on each target module fits its LoRA
from the activations that arrive, writes it, and lets the forward continue through it. The set runs
as length-sorted micro-batches (SST-2 sentences average ~17 tokens; one padded batch would compute
~4x as many positions), one thread each, that meet at every target module (a barrier): the fit sees
all of their tokens at once, then every thread continues through the new weights.

Attention-sink tokens (massive hidden-state norm in the base model, usually the first real token) are
left out of the regression sums by default: a prefix takes their role over, so their change is orders
of magnitude larger than any other token's and swamps the least squares (SmolLM2, r=4: 59% with the sink
left in and match=stream, 86.7% with it out and match=module; README). The adapter still applies to it.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from feta.module import input_positions

# Per architecture: the modules a compiled LoRA can go on (`target=`, joined with "+": o+mlp), and
# the attention module / MLP of layer i, whose outputs the fit matches (with PEFT's gated prefix the
# adapter's term is added outside o_proj, by a wrapper that takes the attention module's place).
TARGETS = {
    "llama": {"q": r"layers\.(\d+)\.self_attn\.q_proj", "k": r"layers\.(\d+)\.self_attn\.k_proj",
              "v": r"layers\.(\d+)\.self_attn\.v_proj", "o": r"layers\.(\d+)\.self_attn\.o_proj",
              "mlp": r"layers\.(\d+)\.mlp\.down_proj"},
    "gpt2": {"qkv": r"h\.(\d+)\.attn\.c_attn", "o": r"h\.(\d+)\.attn\.c_proj", "mlp": r"h\.(\d+)\.mlp\.c_proj"},
}
# The closed form fits a per-token linear map of the module's input, which o and the MLP's output
# projection are; a LoRA on q/k/v acts through the attention softmax/mixing, so only distill fits it.
CLOSED_FORM = ("o", "mlp")
ATTENTION = {"llama": r"layers\.(\d+)\.self_attn", "gpt2": r"h\.(\d+)\.attn"}
MLP = {"llama": r"layers\.(\d+)\.mlp", "gpt2": r"h\.(\d+)\.mlp"}
# Calibration sentences per micro-batch (see the module docstring).
MICRO_BATCH = 32


@dataclass
class CompileSpec:
    """Schema of `conf/compile.yaml` (minus ckpt/logging)."""

    rank: int = field(default=4, metadata={"help": "LoRA rank r of the compiled adapter (0 = bias only)."})
    method: str = field(default="lstsq", metadata={"help": "lstsq | distill | lstsq+distill."})
    target: str = field(default="o", metadata={"help": "Modules the LoRA goes on, joined by +: o (attention output "
                                                       "projection), mlp (MLP output projection), q/k/v, qkv (GPT-2)."})
    bias: bool | None = field(default=None, metadata={"help": "Fit a per-module bias with the low-rank map "
                                                              "(lora_bias); None: yes for the closed form."})
    fit_positions: str = field(default="content", metadata={"help": "content (no sinks) | all | last."})
    match: str = field(default="module", metadata={"help": "stream: the post-attention residual stream (corrects "
                                                          "earlier layers' error) | module: the attention output."})
    last_weight: float = field(default=1.0, metadata={"help": "Weight of the classified (last) token in the fit "
                                                              "(and in distill_hidden=layers)."})
    sink_ratio: float = field(default=6.0, metadata={"help": "A token is a sink if its norm > ratio x median."})
    ridge: float = field(default=1e-4, metadata={"help": "Ridge, relative to the mean eigenvalue of X^T X."})
    calib_size: int = field(default=512, metadata={"help": "Calibration sentences (training split)."})
    calib_seed: int = field(default=0, metadata={"help": "Which seeded sample of calibration sentences."})
    calib_max_length: int = field(default=64, metadata={"help": "Truncate calibration prompts (tokens)."})
    eval_size: int = field(default=128, metadata={"help": "Held-out validation sentences for residuals."})
    distill_steps: int = field(default=100, metadata={"help": "Gradient steps for the distill methods."})
    distill_lr: float = field(default=3e-4, metadata={"help": "Learning rate for distillation."})
    distill_batch_size: int = field(default=16, metadata={"help": "Batch size for distillation."})
    distill_schedule: str = field(default="constant", metadata={"help": "Learning-rate schedule: constant | cosine "
                                                                        "(decay to zero over distill_steps)."})
    distill_hidden: str = field(default="final", metadata={"help": "Hidden states distillation matches: final "
                                                                   "(the last layer's) | layers (every layer's)."})

    def __post_init__(self) -> None:
        from feta.schema import check_choice

        check_choice("method", self.method, ("lstsq", "distill", "lstsq+distill"))
        check_choice("fit_positions", self.fit_positions, ("content", "all", "last"))
        check_choice("match", self.match, ("stream", "module"))
        check_choice("distill_hidden", self.distill_hidden, ("final", "layers"))
        check_choice("distill_schedule", self.distill_schedule, ("constant", "cosine"))
        parts = self.target.split("+")
        if len(set(parts)) != len(parts) or not all(parts):
            raise ValueError(f"target={self.target}: give module kinds joined by '+', each once (e.g. o or o+mlp)")
        if self.method == "lstsq" and not set(parts) <= set(CLOSED_FORM):
            raise ValueError(f"target={self.target} needs method=distill or lstsq+distill: the closed form fits only "
                             f"per-token maps ({', '.join(CLOSED_FORM)})")
        if self.method == "lstsq+distill" and not set(parts) & set(CLOSED_FORM):
            raise ValueError(f"target={self.target}: lstsq+distill needs one of {', '.join(CLOSED_FORM)} in the target "
                             "for the closed form to start from (or use method=distill)")
        if self.bias is None:  # a bias costs nothing once merged and was worth +0.6 points at r=4 (README)
            self.bias = self.method != "distill"
        if self.rank < 0:
            raise ValueError(f"rank must be a positive int (LoRA rank), got {self.rank}")
        if self.rank == 0 and not self.bias:
            raise ValueError("rank=0 with bias=false leaves nothing to fit: set rank >= 1 or bias=true")
        if self.rank == 0 and self.method != "lstsq":
            raise ValueError(f"rank=0 (bias only) needs method=lstsq, got method={self.method}")
        if self.bias and self.method == "distill":
            raise ValueError("bias=true is a closed-form option: use method=lstsq or lstsq+distill")
        for key in ("calib_size", "calib_max_length", "eval_size", "distill_batch_size", "distill_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be a positive int, got {getattr(self, key)}")
        if self.ridge < 0 or self.last_weight <= 0 or self.sink_ratio <= 1 or self.distill_lr <= 0:
            raise ValueError(f"need ridge >= 0, last_weight > 0, sink_ratio > 1, distill_lr > 0; got {self.ridge}, "
                             f"{self.last_weight}, {self.sink_ratio}, {self.distill_lr}")


# ---------------------------------------------------------------------------------------------
# Pure math: tensors in, tensors out.


def detect_sinks(h: Tensor, mask: Tensor, ratio: float) -> Tensor:
    """Attention-sink / massive-activation tokens: hidden-state norm above `ratio` x the median.

    h: (B, T, d) hidden states, mask: (B, T) 1 for real tokens. Returns (B, T) bool.
    """
    norms = h.norm(dim=-1)  # (B, T)
    median = norms[mask.bool()].median()
    return (norms > ratio * median) & mask.bool()


def reduced_rank_fit(
    X: Tensor, T: Tensor, rank: int, ridge: float = 1e-4, bias: bool = False, w: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Weighted ridge reduced-rank regression T ≈ X ΔWᵀ (+ b), ΔW = B·A of rank <= `rank`.

    X: (n, d_in), T: (n, d_out), w: (n,) row weights. Returns A (rank, d_in), B (d_out, rank) and
    b (d_out,) or None. Computed in float64: X^T X of LLM activations spans many orders of magnitude.
    The rank truncation keeps the top directions of the fitted values X·ΔW_ridgeᵀ (the metric of the
    inputs), which is the optimal rank-r solution of the (unregularized) weighted problem.
    """
    X, T = X.double(), T.double()
    w = torch.ones(X.shape[0], dtype=X.dtype) if w is None else w.double()
    d_in, d_out = X.shape[1], T.shape[1]
    if bias:  # the bias is unpenalized: centre with the weighted means and solve for it last
        mx = (w[:, None] * X).sum(0) / w.sum()
        mt = (w[:, None] * T).sum(0) / w.sum()
        X, T = X - mx, T - mt
    sw = w.sqrt()[:, None]
    Xw, Tw = X * sw, T * sw
    gram = Xw.T @ Xw  # (d_in, d_in)
    lam = ridge * gram.diagonal().mean()
    coef = torch.linalg.solve(gram + lam * torch.eye(d_in, dtype=X.dtype), Xw.T @ Tw)  # (d_in, d_out)
    if rank > 0:
        # Top right singular vectors of the fitted values Xw·coef, from their (d_out, d_out) Gram
        # matrix instead of an SVD of the (n, d_out) matrix itself.
        _, vecs = torch.linalg.eigh(coef.T @ gram @ coef)  # ascending eigenvalues
        V = vecs[:, -rank:].flip(1)  # (d_out, rank)
        A, B = (coef @ V).T, V  # (rank, d_in), (d_out, rank)
    else:
        A, B = torch.zeros(0, d_in, dtype=X.dtype), torch.zeros(d_out, 0, dtype=X.dtype)
    b = (mt - (B @ (A @ mx))) if bias else None
    return A, B, b


# ---------------------------------------------------------------------------------------------
# Walking the model.


def target_modules(model: torch.nn.Module, arch: str, target: str) -> dict[str, tuple[int, str]]:
    """{module name: (layer index, kind)} of the compile target ("o", "o+mlp", ...), layer by layer."""
    found = {}
    for kind in target.split("+"):
        if kind not in TARGETS[arch]:
            raise ValueError(f"target={target}: {kind} is not supported for {arch}; supported: {', '.join(TARGETS[arch])}")
        found.update({name: (i, kind) for i, name in _numbered_modules(model, TARGETS[arch][kind], arch).items()})
    order = list(TARGETS[arch])
    return dict(sorted(found.items(), key=lambda item: (item[1][0], order.index(item[1][1]))))


def _numbered_modules(model: torch.nn.Module, regex: str, arch: str) -> dict[int, str]:
    pattern = re.compile(r"(?:^|\.)" + regex + r"$")
    found = {}
    for name, _ in model.named_modules():
        match = pattern.search(name)
        if match:
            found[int(match.group(1))] = name
    if not found:
        raise ValueError(f"no module matches {regex} in this {arch} model")
    return dict(sorted(found.items()))


def _layer_input(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _first(out) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


class Stream(NamedTuple):
    """One layer of a model's forward, each (B, T, d): the layer input, the attention output and the
    MLP output (None unless asked for); h_in + attn is the stream after attention, h_in + attn + mlp
    the layer's output."""

    h_in: Tensor
    attn: Tensor
    mlp: Tensor | None = None


@contextlib.contextmanager
def _stream_hooks(base: torch.nn.Module, arch: str, record, at_module=None, names: dict | None = None,
                  mlp: bool = False):
    """While active, forwards (in any threads) call record(i, field, tensor) with each layer's input
    ("h_in"), attention output ("attn") and, with mlp=True, MLP output ("mlp"), and
    at_module(module, args, name) just before each target module in `names` runs; the forward then
    runs through any weights it wrote."""
    hooks = []
    for i, name in _numbered_modules(base, ATTENTION[arch], arch).items():
        hooks.append(base.get_submodule(name.rsplit(".", 1)[0]).register_forward_pre_hook(
            lambda m, a, k, i=i: record(i, "h_in", _layer_input(a, k)), with_kwargs=True))
        hooks.append(base.get_submodule(name).register_forward_hook(lambda m, a, out, i=i: record(i, "attn", _first(out))))
    for i, name in (_numbered_modules(base, MLP[arch], arch) if mlp else {}).items():
        hooks.append(base.get_submodule(name).register_forward_hook(lambda m, a, out, i=i: record(i, "mlp", _first(out))))
    for name in names or {}:
        hooks.append(base.get_submodule(name).register_forward_pre_hook(lambda m, a, name=name: at_module(m, a, name)))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def prefix_stream(prefix_model, batch: dict[str, Tensor], arch: str, mlp: bool = False) -> dict[int, Stream]:
    """Per layer, the adapted model's Stream at the input's own positions (a soft prompt's virtual
    positions are cut off); the MLP output only with mlp=True (an MLP target needs it; the default
    o-only fit would hold a third copy of every activation for nothing). Works for any token
    adaptation: prefix (extra KV), soft prompt (extra input positions), gated prefix (an extra gated
    attention term)."""
    parts: dict[int, dict[str, Tensor]] = {}
    record = lambda i, key, x: parts.setdefault(i, {}).__setitem__(key, input_positions(x, batch["input_ids"]))  # noqa: E731
    with _stream_hooks(prefix_model.get_base_model(), arch, record, mlp=mlp):
        prefix_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return {i: Stream(**p) for i, p in sorted(parts.items())}


def last_token(batch: dict[str, Tensor]) -> Tensor:
    """(B, T) bool: each row's classified (last real) token."""
    mask = batch["attention_mask"].bool()
    is_last = torch.zeros_like(mask)
    is_last[torch.arange(mask.shape[0]), batch["attention_mask"].sum(1) - 1] = True
    return is_last


def micro_batches(batch: dict[str, Tensor], size: int) -> list[dict[str, Tensor]]:
    """The rows of a right-padded batch sorted by length, in chunks of `size`, each cut to its own
    longest row, so little compute goes to padding."""
    mask = batch["attention_mask"]
    if (mask[:, 1:] > mask[:, :-1]).any():
        raise ValueError("micro_batches needs right padding (tokenizer.padding_side = 'right')")
    lengths = mask.sum(1)
    chunks = torch.argsort(lengths, stable=True).split(size)
    return [{k: batch[k][rows, : int(lengths[rows].max())] for k in ("input_ids", "attention_mask")} for rows in chunks]


@torch.no_grad()
def find_sinks(base_model, batch: dict[str, Tensor], ratio: float) -> Tensor:
    """(B, T) bool: tokens that are massive activations at any layer of the BASE model, where it parks
    attention (usually the first real token). Not in the prefix model: the prefix takes that role over,
    which is exactly why those tokens change so much. The classified token is never a sink."""
    out = base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    return sinks_in(out.hidden_states[1:], batch, ratio)


def sinks_in(hidden: list[Tensor] | Tensor, batch: dict[str, Tensor], ratio: float) -> Tensor:
    """(B, T) bool: sinks at any of the base model's layers `hidden` (each (B, T, d)); never the
    classified token."""
    mask = batch["attention_mask"].bool()
    return torch.stack([detect_sinks(h, mask, ratio) for h in hidden]).any(0) & ~last_token(batch)


def fit_weights(batches: list[dict[str, Tensor]], sinks: list[Tensor], spec: CompileSpec) -> tuple[list[Tensor], dict]:
    """Per-token regression weights (B, T) per micro-batch from `fit_positions`, and a record of what
    was left out."""
    weights, counts, total, fitted = [], Counter(), 0, 0
    for batch, sink in zip(batches, sinks):
        mask, is_last = batch["attention_mask"].bool(), last_token(batch)
        keep = {"last": is_last, "all": mask, "content": mask & ~sink}[spec.fit_positions]
        weights.append(keep.double() * torch.where(is_last, spec.last_weight, 1.0).double())
        total, fitted = total + int(mask.sum()), fitted + int(keep.sum())
        counts.update(sink.nonzero()[:, 1].tolist())
    record = {
        "fit_positions": spec.fit_positions,
        "tokens_total": total,
        "tokens_fitted": fitted,
        "sinks_detected": counts.total(),
        "sink_positions": dict(sorted(counts.items())),
        "sink_rule": f"base-model hidden-state norm > {spec.sink_ratio} x median at any layer",
    }
    return weights, record


def fit_lstsq(lora_model, prefix: list[dict[int, Stream]], batches: list[dict[str, Tensor]],
              weights: list[Tensor], arch: str, spec: CompileSpec, sinks: list[Tensor] | None = None) -> dict[str, dict]:
    """Fit every target module's LoRA in one forward pass of the compiled model over all micro-batches
    (`prefix[j]`, `weights[j]`, `sinks[j]` belong to `batches[j]`; see the module docstring).

    An MLP LoRA must leave the sink tokens as they are: their MLP input is where the massive activation
    is made, so a map fitted without them acts hugely there and the model loses its attention sink
    (SmolLM2, o+mlp r=4: 58.7%). Sink rows therefore enter the MLP fits with target "no change"."""
    base = lora_model.get_base_model()
    # With lstsq+distill, q/k/v start at zero (PEFT's init) and only the distillation moves them.
    names = {n: v for n, v in target_modules(base, arch, spec.target).items() if v[1] in CLOSED_FORM}
    if any(kind == "mlp" for _, kind in names.values()) and prefix[0][0].mlp is None:
        raise ValueError(f"target={spec.target} fits the MLP: capture it with prefix_stream(..., mlp=True)")
    arrived = {name: [None] * len(batches) for name in names}  # per module, per micro-batch: (x, target, w)
    local, stats, errors = threading.local(), {}, []

    def fit_module(name: str) -> None:  # the barrier's action: one thread runs it, all others wait
        x, target, w = (torch.cat(parts) for parts in zip(*arrived[name]))
        arrived[name] = None
        A, B, b = reduced_rank_fit(x, target, spec.rank, spec.ridge, spec.bias, w)
        _write_lora(base.get_submodule(name), A, B, b)
        resid = target.double() - (x.double() @ A.T @ B.T + (b if b is not None else 0))
        stats[name] = {"fit_residual": float(resid.norm() / target.double().norm().clamp_min(1e-30))}

    barriers = {name: threading.Barrier(len(batches), action=lambda n=name: fit_module(n)) for name in names}

    def arrive(module, args, name):
        (i, kind), j, x = names[name], local.j, args[0]  # x: (B, T, d_in), this thread's micro-batch
        p, c = prefix[j][i], local.stream  # the prefix model's and this (compiled) model's layer i
        if kind == "o":  # the prefix-induced change of the attention output ...
            target = p.attn - module.base_layer(x)
            if spec.match == "stream":  # ... plus what undoes earlier layers' error in the stream
                target = target + p.h_in - c["h_in"]
        else:  # "mlp": the same for the MLP output / the layer's output
            target = p.mlp - module.base_layer(x)
            if spec.match == "stream":
                target = target + p.h_in + p.attn - c["h_in"] - c["attn"]
        w = weights[j]
        if kind == "mlp" and sinks is not None and spec.fit_positions != "all":
            target, w = target.masked_fill(sinks[j][..., None], 0.0), torch.where(sinks[j], 1.0, w)
        select = w > 0
        arrived[name][j] = (x[select], target[select], w[select])
        barriers[name].wait()

    def record(i, key, x):  # hooks fire in layer order, so only the current layer's tensors are kept
        local.stream[key] = x

    def run(j: int) -> None:
        local.j, local.stream = j, {}
        try:
            with torch.no_grad():
                lora_model(input_ids=batches[j]["input_ids"], attention_mask=batches[j]["attention_mask"])
        except threading.BrokenBarrierError:
            pass  # another micro-batch failed first; its error is the one reported
        except BaseException as e:  # noqa: BLE001 - re-raised below, after every thread stopped
            errors.append(e)
            for barrier in barriers.values():
                barrier.abort()

    with _stream_hooks(base, arch, record, arrive, names):
        threads = [threading.Thread(target=run, args=(j,)) for j in range(len(batches))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return stats


def _write_lora(module, A: Tensor, B: Tensor, b: Tensor | None) -> None:
    """Load (A, B, b) into a PEFT LoRA layer of rank A.shape[0] whose scale is 1 (alpha = r)."""
    name = module.active_adapters[0]
    lora_A, lora_B = module.lora_A[name], module.lora_B[name]
    r = lora_A.weight.shape[0]
    dtype = lora_A.weight.dtype
    lora_A.weight.zero_()
    lora_B.weight.zero_()
    lora_A.weight[: A.shape[0]] = A.to(dtype)  # rank 0 (bias only) leaves the rank-1 slot at zero
    lora_B.weight[:, : B.shape[1]] = B.to(dtype)
    if b is not None:
        lora_B.bias.copy_(b.to(dtype))
    assert module.scaling[name] == 1.0, f"compiled LoRA expects scale 1, got {module.scaling[name]} (r={r})"


@torch.no_grad()
def layer_residuals(base_model, prefix_model, compiled_model, batches: list[dict[str, Tensor]], sink_ratio: float) -> dict:
    """Per-layer relative residuals (DESIGN.md) at the classified position, over content tokens
    (no sinks), and over all tokens, pooled over held-out micro-batches."""
    sums = {}  # (selection, layer) -> [‖h_compiled − h_prefix‖², ‖h_prefix − h_base‖²]
    for batch in batches:
        kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "output_hidden_states": True}
        h = {k: torch.stack([input_positions(x, batch["input_ids"]) for x in m(**kw).hidden_states[1:]])
             for k, m in (("base", base_model), ("prefix", prefix_model), ("compiled", compiled_model))}  # (L, B, T, d)
        mask, last = batch["attention_mask"].bool(), last_token(batch)
        sinks = sinks_in(h["base"], batch, sink_ratio)  # as in the fit (see find_sinks)
        for key, sel in (("last", last), ("content", mask & ~sinks), ("all", mask)):
            for layer in range(h["base"].shape[0]):
                num = (h["compiled"][layer] - h["prefix"][layer])[sel].double().pow(2).sum()
                den = (h["prefix"][layer] - h["base"][layer])[sel].double().pow(2).sum()
                acc = sums.setdefault((key, layer), [0.0, 0.0])
                acc[0], acc[1] = acc[0] + float(num), acc[1] + float(den)
    n_layers = 1 + max(layer for _, layer in sums)
    return {key: [(sums[key, l][0] / max(sums[key, l][1], 1e-60)) ** 0.5 for l in range(n_layers)]
            for key in ("last", "content", "all")}


# ---------------------------------------------------------------------------------------------
# Public entry: a prefix run directory in, a compiled directory out.


def check_source(run_dir, spec: CompileSpec, model_override: str | None = None):
    """Validate a prefix run before anything is loaded or written; returns (run cfg, adapter dir)."""
    from feta import runs
    from feta.adapters import TOKEN_KINDS  # token adaptations compile; weight-space ones merge directly

    cfg = runs.load_run_config(run_dir)
    kind = cfg.adapter.kind
    if kind not in TOKEN_KINDS:
        raise ValueError(
            f"ckpt={run_dir} is a {kind} run; compile turns a token adaptation ({', '.join(TOKEN_KINDS)}) into LoRA "
            f"(a {kind} adapter is already weight-space: it merges directly with PEFT's merge_and_unload)"
        )
    if model_override and model_override != cfg.model.name:
        raise ValueError(f"base_model={model_override} but the prefix in ckpt={run_dir} was trained on {cfg.model.name}")
    path = runs.adapter_dir(run_dir)
    from safetensors import safe_open

    try:
        with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
            keys = list(f.keys())
    except Exception as e:  # safetensors raises several types for a damaged header
        raise ValueError(f"ckpt={run_dir}: adapter/adapter_model.safetensors is corrupt ({e}); retrain or restore it") from e
    if not keys:
        raise ValueError(f"ckpt={run_dir}: adapter/adapter_model.safetensors holds no tensors")
    return cfg, path


def calibration_batches(datamodule, spec: CompileSpec, seed: int) -> tuple[dict, dict]:
    """A seeded sample of the run's training prompts (the fit) and the first validation prompts (held out)."""
    datamodule.setup()
    train = datamodule.splits["train"]
    g = torch.Generator().manual_seed(1000 + seed + spec.calib_seed)  # not the training subset's permutation
    idx = torch.randperm(len(train), generator=g)[: spec.calib_size].tolist()
    tok = datamodule.tokenizer

    def encode(rows, max_length):
        texts = [datamodule.spec.prompt.format(sentence=s) for s, _ in rows]
        return dict(tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))

    calib = encode([train[i] for i in idx], spec.calib_max_length)
    held_out = encode(datamodule.splits["validation"][: spec.eval_size], datamodule.spec.max_length)
    return calib, held_out


def compile_run(run_dir, spec: CompileSpec, out_dir, model_override: str | None = None) -> dict:
    """Compile the prefix of `run_dir` into a PEFT LoRA adapter at `out_dir`/adapter; returns compile.json."""
    import copy
    import os
    import shutil
    import time
    import warnings
    from pathlib import Path

    from feta import runs
    from feta.adapters import compiled_lora_config, load_adapter
    from feta.data import SST2DataModule
    from feta.models import load_base_model
    from peft import get_peft_model

    cfg, path = check_source(run_dir, spec, model_override)
    model_spec, data_spec, _ = runs.run_specs(cfg)
    base, tokenizer = load_base_model(model_spec)
    names = target_modules(base, model_spec.arch, spec.target)
    width = min(_module_shape(base.get_submodule(n)) for n in names)
    if spec.rank > width:
        raise ValueError(f"rank={spec.rank} exceeds the width of {spec.target} ({width}); use rank <= {width}")
    start = time.perf_counter()
    dm = SST2DataModule(data_spec, tokenizer, seed=cfg.seed)
    calib, held_out = calibration_batches(dm, spec, cfg.seed)

    if cfg.adapter.kind == "prompt" and hasattr(base.config, "n_positions"):
        warnings.warn(
            f"{model_spec.name} has absolute position embeddings: the soft prompt also moves every input token "
            f"{cfg.adapter.m} positions along them, which no LoRA reproduces; expect held-out residuals near 1 "
            "(on rotary models such as Llama the shift is invisible)"
        )
    prefix_model = load_adapter(copy.deepcopy(base), path).eval()
    calib, held_out = micro_batches(calib, MICRO_BATCH), micro_batches(held_out, MICRO_BATCH)
    streams = [prefix_stream(prefix_model, b, model_spec.arch, mlp="mlp" in spec.target.split("+")) for b in calib]
    sinks = [find_sinks(base, b, spec.sink_ratio) for b in calib]
    weights, positions = fit_weights(calib, sinks, spec)
    lora_cfg = compiled_lora_config(spec.rank, list(names), spec.bias, model_spec.arch)
    compiled = get_peft_model(copy.deepcopy(base), lora_cfg).eval()
    stats = {}
    if spec.method in ("lstsq", "lstsq+distill"):
        stats["modules"] = fit_lstsq(compiled, streams, calib, weights, model_spec.arch, spec, sinks)
    del streams
    if "distill" in spec.method:
        from feta.distill import distill

        stats["distill"] = distill(compiled, prefix_model, dm, spec, cfg.seed)
    fit_time = time.perf_counter() - start
    residuals = layer_residuals(base, prefix_model, compiled.eval(), held_out, spec.sink_ratio)

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    compiled.save_pretrained(str(tmp / runs.ADAPTER))
    record = {
        "source_run": str(Path(run_dir).resolve()),
        "model": model_spec.name,
        "method": spec.method,
        "rank": spec.rank,
        "bias": spec.bias,
        "target": spec.target,
        "target_modules": list(names),
        "calibration": {"sentences": spec.calib_size, "max_length": spec.calib_max_length, **positions},
        "eval_sentences": spec.eval_size,
        "residuals": residuals,
        "residual_last_final": residuals["last"][-1],
        "residual_last_mean": sum(residuals["last"]) / len(residuals["last"]),
        "residual_content_mean": sum(residuals["content"]) / len(residuals["content"]),
        "fit_stats": stats,
        "fit_time_s": fit_time,
        "spec": {k: getattr(spec, k) for k in spec.__dataclass_fields__},
    }
    runs.write_json(tmp / "compile.json", record)
    if out_dir.exists():  # only reached with overwrite=true (checked by the caller)
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)  # the finished directory appears whole or not at all
    return record


def _module_shape(module: torch.nn.Module) -> int:
    w = module.weight
    return min(w.shape)


def merge_compiled(compiled_dir, dtype: str) -> dict:
    """Merge the saved compiled adapter into a fresh base model (plain PEFT load), save `merged/`,
    and report the max abs logit difference between merged and unmerged."""
    from pathlib import Path

    from feta import runs
    from feta.adapters import merge_and_save
    from feta.data import SST2DataModule
    from feta.models import load_base_model

    record = runs.read_json(Path(compiled_dir) / "compile.json")
    cfg = runs.load_run_config(record["source_run"])
    model_spec, data_spec, _ = runs.run_specs(cfg)
    base, tokenizer = load_base_model(model_spec)
    dm = SST2DataModule(data_spec, tokenizer)
    dm.setup()
    batch = dm.collate(dm.splits["validation"][:16])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    diff = merge_and_save(base, Path(compiled_dir) / runs.ADAPTER, Path(compiled_dir) / "merged", dtype, inputs)
    return {"dtype": dtype, "max_abs_logit_diff": diff, "path": "merged"}
