"""The closed-form compile (`method=lstsq`): every target module's LoRA fitted in one forward pass.

For every layer l, in order, a LoRA on the attention output projection W (input x, per token) is fitted
to the prefix-induced change of that projection's output (`match=module`, the default):

    delta_l = o_prefix_l - W x_compiled_l                                 # (n_tokens, d)
    min_{rank(ΔW) <= r}  sum_t w_t ||delta_t - ΔW x_t||^2 + ridge ||ΔW||^2

`match=stream` targets the whole residual stream after attention instead (h_mid_prefix − h_in_compiled
− W x), so a layer also tries to undo earlier layers' error; on SmolLM2 it was worse (85.6% vs 86.7%).
`target=o+mlp` also fits the MLP's output projection, to the MLP's change (or, with match=stream, to
what the layer's output still lacks); at r=4 on SmolLM2 it lost accuracy (82.5% / 85.7%): a rank-4 map
leaves 0.84-0.94 of the MLP's change (relative residual on the calibration tokens), and what it does
fit does not carry over to held-out sentences. q/k/v change attention itself, so only distill fits them.

"Sequential": x comes from the compiled model itself, layers < l already compiled. All layers are
fitted in ONE forward pass of the calibration set: a pre-hook on each target module fits its LoRA
from the activations that arrive, writes it, and lets the forward continue through it. The set runs
as length-sorted micro-batches (SST-2 sentences average ~17 tokens; one padded batch would compute
~4x as many positions), one thread each, that meet at every target module (a barrier): the fit sees
all of their tokens at once, then every thread continues through the new weights. The prefix model's
activations come a window of layers at a time (PrefixStreams), within `stream_memory_gb`.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from feta.compile.sink import collect_rows
from feta.compile.sink import fit_layer as fit_sink_layer
from feta.compile.spec import ATTENTION, CLOSED_FORM, MLP, MODULE_PATTERNS, CompileSpec, FitPositions, Match
from feta.errors import UserError
from feta.scoring import input_positions


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



def target_modules(model: torch.nn.Module, arch: str, target: str) -> dict[str, tuple[int, str]]:
    """{module name: (layer index, module kind)} for `target` ("o", "o+mlp", ...), layer by layer."""
    found = {}
    patterns = MODULE_PATTERNS[arch]
    for kind in [k for k in target.split("+") if k != "none"]:
        if kind not in patterns:
            raise UserError("target", f"{target}: {kind} is not a module kind of {arch}",
                            f"use {', '.join(patterns)} (joined by +)")
        found.update({name: (i, kind) for i, name in _numbered_modules(model, patterns[kind], arch).items()})
    order = list(patterns)
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


class _WindowDone(Exception):
    """Raised by a hook to end a forward once the layers it records are captured."""


@torch.no_grad()
def prefix_stream(prefix_model, batch: dict[str, Tensor], arch: str, mlp: bool = False,
                  layers: range | None = None) -> dict[int, Stream]:
    """Per layer, the adapted model's Stream at the input's own positions (a soft prompt's virtual
    positions are cut off); the MLP output only with mlp=True (an MLP target needs it; the default
    o-only fit would hold a third copy of every activation for nothing). Works for any token
    adaptation: prefix (extra KV), soft prompt (extra input positions), gated prefix (an extra gated
    attention term). With `layers`, only those are kept, and the forward stops after the last of them."""
    parts: dict[int, dict[str, Tensor]] = {}

    def record(i: int, key: str, x: Tensor) -> None:
        if layers is not None and i >= layers.stop:
            raise _WindowDone
        if layers is None or i in layers:
            parts.setdefault(i, {})[key] = input_positions(x, batch["input_ids"])

    with _stream_hooks(prefix_model.get_base_model(), arch, record, mlp=mlp):
        try:
            prefix_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        except _WindowDone:
            pass
    return {i: Stream(**p) for i, p in sorted(parts.items())}


class PrefixStreams(Sequence):
    """The adapted model's Streams of every micro-batch, held a window of layers at a time, so the fit's
    memory is set by `max_bytes`, not by the calibration set × the depth: `streams[j][i]` is micro-batch
    j's layer i. A request past the window replaces it with the next `layers_per_pass` layers, from a
    new forward of every micro-batch that stops after them; the fit asks for layers in order (every
    micro-batch meets at each module), so no layer is computed twice. The values do not depend on the
    window: a forward is the same forward however early it stops."""

    def __init__(self, prefix_model, batches: list[dict[str, Tensor]], arch: str, mlp: bool = False,
                 max_bytes: float | None = None):
        self.model, self.batches, self.arch, self.mlp = prefix_model, batches, arch, mlp
        self.n_layers = len(_numbered_modules(prefix_model.get_base_model(), ATTENTION[arch], arch))
        width = prefix_model.get_base_model().config.hidden_size
        itemsize = next(prefix_model.parameters()).element_size()
        self.bytes_per_layer = sum(b["input_ids"].numel() for b in batches) * width * itemsize * (3 if mlp else 2)
        fit = self.n_layers if max_bytes is None else int(max_bytes // self.bytes_per_layer)
        self.layers_per_pass = max(1, min(self.n_layers, fit))
        self.passes = 0
        self._held: list[dict[int, Stream]] = [{} for _ in batches]
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, j: int) -> Mapping[int, Stream]:
        if not 0 <= j < len(self.batches):
            raise IndexError(j)
        return _BatchStreams(self, j)

    def layer(self, j: int, i: int) -> Stream:
        with self._lock:  # one thread computes a window while the others wait for it
            if i not in self._held[j]:
                self._held = [{} for _ in self.batches]  # freed before the next window is computed
                window = range(i, min(i + self.layers_per_pass, self.n_layers))
                self._held = [prefix_stream(self.model, b, self.arch, self.mlp, window) for b in self.batches]
                self.passes += 1
            return self._held[j][i]

    def record(self) -> dict[str, Any]:
        return {"layers_per_pass": self.layers_per_pass, "passes": self.passes,
                "gb_per_layer": round(self.bytes_per_layer / 1e9, 3)}


class _BatchStreams(Mapping):
    def __init__(self, streams: PrefixStreams, j: int):
        self.streams, self.j = streams, j

    def __getitem__(self, i: int) -> Stream:
        return self.streams.layer(self.j, i)

    def __iter__(self):
        return iter(range(self.streams.n_layers))

    def __len__(self) -> int:
        return self.streams.n_layers


class SinkPlan(NamedTuple):
    """What `method=sink` needs besides the streams (feta/compile/sink.py): per layer the prefix's keys and
    values (n_kv, m, d), the model's rotary embedding, m, and per micro-batch the (B, T) content rows."""

    prefix_kv: list[tuple[Tensor, Tensor]]
    rotary: torch.nn.Module
    m: int
    content: list[Tensor]


def fit_lstsq(lora_model, prefix: Sequence[Mapping[int, Stream]], batches: list[dict[str, Tensor]],
              weights: list[Tensor], arch: str, spec: CompileSpec, sinks: list[Tensor] | None = None,
              sink_plan: SinkPlan | None = None) -> dict[str, dict]:
    """Fit every target module's LoRA in one forward pass of the compiled model over all micro-batches
    (`prefix[j]`, `weights[j]`, `sinks[j]` belong to `batches[j]`; see the module docstring). With a
    `sink_plan`, each layer's attention first merges the prefix into the sink slot (rank-1 LoRAs on
    k_proj and v_proj), and the closed-form modules of that layer are fitted on top.

    An MLP LoRA must leave the sink tokens as they are: their MLP input is where the massive activation
    is made, so a map fitted without them acts hugely there and the model loses its attention sink
    (SmolLM2, o+mlp r=4: 58.7%). Sink rows therefore enter the MLP fits with target "no change"."""
    base = lora_model.get_base_model()
    # With lstsq+distill, q/k/v start at zero (PEFT's init) and only the distillation moves them.
    names = {n: v for n, v in target_modules(base, arch, spec.target).items() if v[1] in CLOSED_FORM}
    if sink_plan is not None:  # the attention modules, fitted at their entry
        names = {**{n: (i, "sink") for i, n in _numbered_modules(base, ATTENTION[arch], arch).items()}, **names}
    if any(kind == "mlp" for _, kind in names.values()) and prefix[0][0].mlp is None:
        raise ValueError(f"target={spec.target} fits the MLP: capture it with prefix_stream(..., mlp=True)")
    arrived = {name: [None] * len(batches) for name in names}  # per module, per micro-batch: (x, delta, w)
    local, stats, errors = threading.local(), {}, []

    def fit_module(name: str) -> None:  # the barrier's action: one thread runs it, all others wait
        if names[name][1] == "sink":
            parts, arrived[name] = arrived[name], None
            attn = base.get_submodule(name)
            pk, pv = sink_plan.prefix_kv[names[name][0]]
            dk, dv, u, stats[name] = fit_sink_layer(parts, pk, pv, attn.scaling)
            _write_lora(attn.k_proj, u[None], dk[:, None], None)
            _write_lora(attn.v_proj, u[None], dv[:, None], None)
            return
        x, delta, w = (torch.cat(parts) for parts in zip(*arrived[name]))
        arrived[name] = None
        A, B, b = reduced_rank_fit(x, delta, spec.rank, spec.ridge, spec.bias, w)
        _write_lora(base.get_submodule(name), A, B, b)
        resid = delta.double() - (x.double() @ A.T @ B.T + (b if b is not None else 0))
        stats[name] = {"fit_residual": float(resid.norm() / delta.double().norm().clamp_min(1e-30))}

    barriers = {name: threading.Barrier(len(batches), action=lambda n=name: fit_module(n)) for name in names}

    def arrive(module, args, name):
        (i, kind), j, x = names[name], local.j, args[0]  # x: (B, T, d_in), this thread's micro-batch
        p, c = prefix[j][i], local.stream  # the prefix model's and this (compiled) model's layer i
        if kind == "o":  # the prefix-induced change of the attention output ...
            delta = p.attn - module.base_layer(x)
            if spec.match is Match.stream:  # ... plus what undoes earlier layers' error in the stream
                delta = delta + p.h_in - c["h_in"]
        else:  # "mlp": the same for the MLP output / the layer's output
            delta = p.mlp - module.base_layer(x)
            if spec.match is Match.stream:
                delta = delta + p.h_in + p.attn - c["h_in"] - c["attn"]
        w = weights[j]
        if kind == "mlp" and sinks is not None and spec.fit_positions is not FitPositions.all:
            delta, w = delta.masked_fill(sinks[j][..., None], 0.0), torch.where(sinks[j], 1.0, w)
        select = w > 0
        arrived[name][j] = (x[select], delta[select], w[select])
        barriers[name].wait()

    def arrive_sink(module, args, kwargs, name):
        j, mask = local.j, batches[local.j]["attention_mask"].bool()
        arrived[name][j] = collect_rows(module, sink_plan.rotary, kwargs["hidden_states"], kwargs["position_embeddings"],
                                        mask, sink_plan.m, sink_plan.content[j])
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

    closed = {n: v for n, v in names.items() if v[1] != "sink"}
    sink_hooks = [base.get_submodule(n).register_forward_pre_hook(
        lambda mod, a, k, n=n: arrive_sink(mod, a, k, n), with_kwargs=True) for n, v in names.items() if v[1] == "sink"]
    try:
        with _stream_hooks(base, arch, record, arrive, closed):
            threads = [threading.Thread(target=run, args=(j,)) for j in range(len(batches))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        for hook in sink_hooks:
            hook.remove()
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
    elif lora_B.bias is not None:
        lora_B.bias.zero_()
    assert module.scaling[name] == 1.0, f"compiled LoRA expects scale 1, got {module.scaling[name]} (r={r})"

