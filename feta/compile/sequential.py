"""The sequential fit: every decoder layer in order, on the compiled model's own inputs.

Per layer i (feta/compile/layers.py runs it on every micro-batch):
1. the source's layer i, on the source's inputs, with its key/value slots for that layer only: its
   attention (and MLP) outputs are the targets; its outputs become the source's next inputs;
2. the layer's fits, in forward order, each from float64 sums accumulated micro-batch by micro-batch:
   the sink's key and value (`method=sink`, feta/compile/sink.py), then the closed form on o_proj (and
   the MLP's output projection), each on the inputs the fits before it produce (feta/compile/fit.py);
3. the compiled layer i, on the compiled model's inputs through the fitted weights: its outputs become
   the compiled model's next inputs.
One model is held: the source and the compiled LoRA are views of it (feta/compile/views.py).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from feta.compile import layers
from feta.compile.fit import LstsqStats, numbered_modules, target_modules, write_lora
from feta.compile.sink import LayerStats, collect_rows, leak
from feta.compile.spec import ATTENTION, CLOSED_FORM, LAYER, MLP, CompileSpec, FitPositions, Match
from feta.compile.views import CompileModel

log = logging.getLogger("feta")


class SinkPlan(NamedTuple):
    """What `method=sink` needs besides the streams: per layer the source's keys and values (n_kv, m, d),
    the model's rotary embedding, m, and per micro-batch the (B, T) content rows."""

    prefix_kv: list[tuple[Tensor, Tensor]]
    rotary: torch.nn.Module
    m: int
    content: list[Tensor]


def _names(model: torch.nn.Module, arch: str, i: int, spec: CompileSpec, sink: bool) -> list[tuple[str, str]]:
    """Layer i's fits in forward order: (module name, "sink" | "o" | "mlp")."""
    fits = [(numbered_modules(model, ATTENTION[arch], arch)[i], "sink")] if sink else []
    return fits + [(n, kind) for n, (layer, kind) in target_modules(model, arch, spec.target).items()
                   if layer == i and kind in CLOSED_FORM]


@torch.no_grad()
def fit_sequential(cm: CompileModel, batches: list[dict[str, Tensor]], weights: list[Tensor], sinks: list[Tensor],
                   arch: str, spec: CompileSpec, store: torch.device | str, sink: SinkPlan | None = None) -> dict[str, dict]:
    """Fit every closed-form module (and, with a `sink` plan, every layer's sink edit) of `cm.lora`, layer by
    layer; returns each module's fit statistics. `weights[j]`, `sinks[j]` belong to `batches[j]`.

    An MLP LoRA must leave the sink tokens as they are: their MLP input is where the massive activation
    is made, so a map fitted without them acts hugely there and the model loses its attention sink
    (SmolLM2, o+mlp r=4: 58.7%). Sink rows therefore enter the MLP fits with target "no change"."""
    model = cm.model
    device = batches[0]["input_ids"].device
    decoder = [model.get_submodule(n) for n in numbered_modules(model, LAYER[arch], arch).values()]
    attn_names = numbered_modules(model, ATTENTION[arch], arch)
    mlp_names = numbered_modules(model, MLP[arch], arch)
    comp = layers.catch(cm.compiled, decoder[0], batches, store)
    src = layers.catch(cm.source, decoder[0], batches, store)
    stats: dict[str, dict] = {}
    bar = tqdm(enumerate(decoder), total=len(decoder), desc="compile: layers", unit="layer", leave=False)
    for i, layer in bar:
        fits = _names(model, arch, i, spec, sink is not None)
        kinds = {kind for _, kind in fits}
        # 1. The source's layer i: the targets, then its outputs as its next inputs.
        p_in = list(src.hidden) if spec.match is Match.stream else None
        p_attn, p_mlp = [], []
        keep_mlp = (lambda m, a, o: p_mlp.append(o.to(store))) if "mlp" in kinds else None
        with cm.source_mode():  # entered first: a gated prefix's wrapper is the attention module to hook
            with layers.hooked(model.get_submodule(attn_names[i]), post=lambda m, a, o: p_attn.append(o.to(store))), \
                    layers.hooked(model.get_submodule(mlp_names[i]), post=keep_mlp):
                for j in range(len(batches)):
                    src.hidden[j] = layers.run(layer, src, j, device, cm.layer_cache(i)).to(store)
        # 2. The layer's fits, in forward order.
        targets, edits = Targets(p_in, p_attn, p_mlp), []
        for name, kind in fits:
            module = model.get_submodule(name)
            if kind == "sink":
                stats[name], u = _fit_sink(module, layer, comp, batches, sink, i)
                edits.append((module, u, stats[name]))
            else:
                stats[name] = _fit_closed_form(module, kind, layer, model.get_submodule(attn_names[i]), comp, targets,
                                               batches, weights, sinks, spec)
        # 3. The compiled layer i on the fitted weights; the sink edit's leak is read on the way.
        for j in range(len(batches)):
            with contextlib.ExitStack() as stack:
                for attn, u, record in edits:
                    stack.enter_context(layers.hooked(attn, pre=_leak_check(u, record, batches[j]["attention_mask"]),
                                                      with_kwargs=True))
                comp.hidden[j] = layers.run(layer, comp, j, device).to(store)
        _log_layer(bar, i, {name: stats[name] for name, _ in fits})
    bar.close()
    return stats


class Targets(NamedTuple):
    """The source's layer i, per micro-batch on the store: its input (match=stream only), attention output
    and MLP output (an MLP fit only)."""

    h_in: list[Tensor] | None
    attn: list[Tensor]
    mlp: list[Tensor]


def _fit_closed_form(module: torch.nn.Module, kind: str, layer: torch.nn.Module, attn: torch.nn.Module,
                     comp: layers.Stream, p: Targets, batches: list[dict[str, Tensor]], weights: list[Tensor],
                     sinks: list[Tensor], spec: CompileSpec) -> dict[str, float]:
    """The reduced-rank fit of one o_proj ("o") or MLP output projection ("mlp") on the compiled inputs."""
    device = batches[0]["input_ids"].device
    stream = spec.match is Match.stream
    acc, c_attn, j = LstsqStats(), [], 0  # c_attn: the compiled attention output of micro-batch j (match=stream)

    def collect(mod, args):
        x = args[0]
        if kind == "o":  # the prefix-induced change of the attention output ...
            delta = p.attn[j].to(device) - mod.base_layer(x)
            if stream:  # ... plus what undoes earlier layers' error in the stream
                delta = delta + p.h_in[j].to(device) - comp.hidden[j].to(device)
        else:  # "mlp": the same for the MLP output / the layer's output
            delta = p.mlp[j].to(device) - mod.base_layer(x)
            if stream:
                delta = delta + (p.h_in[j] + p.attn[j]).to(device) - comp.hidden[j].to(device) - c_attn[-1]
        w = weights[j]
        if kind == "mlp" and spec.fit_positions is not FitPositions.all:
            delta, w = delta.masked_fill(sinks[j][..., None], 0.0), torch.where(sinks[j], 1.0, w)
        select = w > 0
        acc.add(x[select], delta[select], w[select])
        raise layers.LayerStop

    read_attn = (lambda m, a, o: c_attn.append(o)) if stream and kind == "mlp" else None
    with layers.hooked(module, pre=collect), layers.hooked(attn, post=read_attn):
        for j in range(len(batches)):
            layers.run(layer, comp, j, device)
            c_attn.clear()
    A, B, b, residual = acc.solve(spec.rank, spec.ridge, spec.bias)
    write_lora(module, A, B, b)
    return {"fit_residual": residual}


def _fit_sink(attn: torch.nn.Module, layer: torch.nn.Module, comp: layers.Stream, batches: list[dict[str, Tensor]],
              plan: SinkPlan, i: int) -> tuple[dict[str, Any], Tensor]:
    """Layer i's sink edit: rank-1 LoRAs on k_proj and v_proj, from every micro-batch's rows; its record
    (the leak filled in as the compiled layer runs) and its direction u."""
    device = batches[0]["input_ids"].device
    pk, pv = plan.prefix_kv[i]
    acc = LayerStats(pk, pv, attn.scaling)
    for j, batch in enumerate(batches):
        def collect(module, args, kwargs):
            acc.add(collect_rows(module, plan.rotary, kwargs["hidden_states"], kwargs["position_embeddings"],
                                 batch["attention_mask"].bool(), plan.m, plan.content[j]))
            raise layers.LayerStop

        with layers.hooked(attn, pre=collect, with_kwargs=True):
            layers.run(layer, comp, j, device)
    dk, dv, u, record = acc.solve()
    write_lora(attn.k_proj, u[None], dk[:, None], None)
    write_lora(attn.v_proj, u[None], dv[:, None], None)
    return {**record, "leak_max": 0.0, "sink_gain_min": float("inf")}, u


def _leak_check(u: Tensor, record: dict[str, Any], mask: Tensor):
    """A pre-hook for the attention module: on this micro-batch, the sink edit's largest |uᵀx| on a later
    input and smallest uᵀx on the first token (sink.leak), pooled into `record`."""
    later = mask.bool().clone()
    later[:, 0] = False

    def hook(module, args, kwargs):
        x = kwargs["hidden_states"]
        found = leak(u, x[later], x[:, 0])
        record["leak_max"] = max(record["leak_max"], found["leak_max"])
        record["sink_gain_min"] = min(record["sink_gain_min"], found["sink_gain_min"])
    return hook


def _log_layer(bar, i: int, fits: dict[str, dict]) -> None:
    parts = []
    for name, record in fits.items():
        short = name.rsplit(".", 1)[-1]
        if "fit_residual" in record:
            parts.append(f"{short} residual {record['fit_residual']:.3f}")
        else:
            worst = max(v["key_fit_residual"] for k, v in record.items() if k.startswith("head"))
            parts.append(f"sink key residual {worst:.3f}, leak rms {record['leak_rms']:.3f}")
    if parts:
        bar.set_postfix_str(parts[-1])
        log.info(f"layer {i}: " + "; ".join(parts))
