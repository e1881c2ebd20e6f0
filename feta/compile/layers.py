"""Running a model one decoder layer at a time over a calibration set (the pattern of GPTQ's layer-wise
quantization): catch what the model hands its first layer, then run each layer on every micro-batch and
keep its outputs as the next layer's inputs. Only one layer's activations are ever held, never the
model's depth of them.

A `Stream` holds one model's inputs to the current layer, per micro-batch: the hidden states and the other
arguments the model passes every layer (attention mask, rotary cos/sin, positions). They are kept on a
store device (the CPU when the accelerator lacks room) and moved to the layer's device per call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache


class LayerStop(Exception):
    """Raised by a hook to end a forward once what it reads has been seen."""


_CACHE = object()  # where a caught argument held the model's cache: each layer call puts its own there


def _move(value: Any, device: torch.device | str, cache: Any = None) -> Any:
    """`value` with its tensors on `device` and the cache placeholder replaced by `cache`."""
    if value is _CACHE:
        return cache
    if isinstance(value, Cache):
        return _CACHE
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_move(v, device, cache) for v in value)
    if isinstance(value, dict):
        return {k: _move(v, device, cache) for k, v in value.items()}
    return value


@dataclass
class Stream:
    """One model's inputs to the current decoder layer, per micro-batch, on `store`."""

    store: torch.device | str
    hidden: list[Tensor] = field(default_factory=list)
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)

    def nbytes(self) -> int:
        def size(value: Any) -> int:
            if isinstance(value, Tensor):
                return value.numel() * value.element_size()
            if isinstance(value, (tuple, list)):
                return sum(size(v) for v in value)
            return sum(size(v) for v in value.values()) if isinstance(value, dict) else 0
        return size(self.hidden) + size(self.args) + size(self.kwargs)


@torch.no_grad()
def catch(view: Callable[..., Any], first_layer: torch.nn.Module, batches: list[dict[str, Tensor]],
          store: torch.device | str) -> Stream:
    """What `view` (a model forward) hands `first_layer` for each micro-batch; the forward stops there."""
    stream = Stream(store)

    def grab(module, args, kwargs):
        hidden, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
        stream.hidden.append(hidden.to(store))
        stream.args.append(_move(rest, store))
        stream.kwargs.append(_move(kwargs, store))
        raise LayerStop

    hook = first_layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in batches:
            with contextlib.suppress(LayerStop):
                view(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        hook.remove()
    return stream


def _output(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run(layer: torch.nn.Module, stream: Stream, j: int, device: torch.device | str, cache: Any = None) -> Tensor | None:
    """Micro-batch j's output of `layer` on `device` (None when a hook stopped the forward); `cache` is what
    the layer's attention attends to before the input (None: nothing)."""
    try:
        out = layer(stream.hidden[j].to(device), *_move(stream.args[j], device, cache),
                    **_move(stream.kwargs[j], device, cache))
    except LayerStop:
        return None
    return _output(out)


@contextlib.contextmanager
def hooked(module: torch.nn.Module, pre: Callable | None = None, post: Callable | None = None,
           with_kwargs: bool = False) -> Iterator[None]:
    """`pre(module, args[, kwargs])` before and `post(module, args, output)` after `module` runs, while active."""
    handles = []
    if pre is not None:
        handles.append(module.register_forward_pre_hook(pre, with_kwargs=with_kwargs))
    if post is not None:
        handles.append(module.register_forward_hook(lambda m, a, out: post(m, a, _output(out))))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
