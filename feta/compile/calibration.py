"""A compile's fixed data: the calibration batch the fit reads and the held-out batch it is measured on.

From a task (a run's, or `data=<name>` for a PEFT adapter): a seeded sample of `calib_size` training
examples and the first `eval_size` validation examples. From a prompt file (`calib_file`): a seeded 20% of
its prompts (at most `eval_size`) held out, and at most `calib_size` of the rest; every prompt is scored
at its last token, the next token it predicts. Both give batches in the format the fit uses
(feta.compile.tokens.BATCH_KEYS, right-padded).

What follows a calibration prompt (`calib_decode`): the data's own target (`reference`; a prompt file has
none), or the source adapter's own continuation, greedy or sampled at `calib_temperature`, which is what
the model sees when it decodes; `mix` gives a seeded half of the prompts their reference and the other
half a sampled continuation. A decoded continuation is scored at every one of its tokens, as a target.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import torch
from torch import Tensor

from feta.compile.memory import decode_batch
from feta.compile.source import CompileSource
from feta.compile.spec import CalibDecode, CompileSpec
from feta.compile.tokens import BATCH_KEYS
from feta.data import (IGNORE, DataSpec, MixDataModule, MixSpec, TaskDataModule, TaskKind, encode_continuations,
                       encode_prompts, note_clamp, seeded_subset)
from feta.decoding import decode_ids, virtual_tokens
from feta.errors import UserError

# Share of a prompt file held out (at most eval_size); the split has its own seed, so that calib_seed
# changes only which prompts calibrate, never which ones measure.
HOLD_OUT = 0.2
HOLD_OUT_SEED = 0
# Tokens a held-out or distillation prompt keeps (the end of a longer one), as a task's default data.max_length.
PROMPT_MAX_LENGTH = 128
# Tokens a decoded continuation of a prompt file's prompt may take, by default.
PROMPT_NEW_TOKENS = 32
# Held-out prompts that the source and the compiled model both decode, for compile.json's `own_outputs`.
OWN_OUTPUTS = 32


@dataclass
class Calibration:
    """The fit's batch, the held-out batch, and what distillation draws its batches from."""

    fit: dict[str, Tensor]
    held_out: dict[str, Tensor]
    train: list  # examples or prompts, turned into a batch by `collate`
    collate: Callable[[list], dict[str, Tensor]]
    verbalizer_ids: list[list[int]] | None  # classification: the classes' tokens; else every scored token
    task: str  # the task kind, or "prompts"
    record: dict[str, Any] = field(default_factory=dict)
    own: OwnOutputs | None = None  # generation tasks and prompt files, with the source to decode


def calibration_batches(datamodule: TaskDataModule, spec: CompileSpec, seed: int, adapted=None) -> tuple[dict, dict]:
    """A seeded sample of the task's training examples (the fit; for generation prompt + reference target,
    teacher-forced, or + the `adapted` model's own continuation, per calib_decode) and the first validation
    examples (held out for the residuals)."""
    datamodule.setup()
    # Seeded apart from the training subset's permutation.
    calib = seeded_subset(datamodule.splits["train"], spec.calib_size, 1000 + seed + spec.calib_seed, "calib_size")
    task = datamodule.task
    note_clamp("eval_size", spec.eval_size, len(datamodule.splits["validation"]))
    datamodule.task.check_length(spec.calib_max_length, "calib_max_length")
    held_out = task.encode(datamodule.splits["validation"][: spec.eval_size])
    if spec.calib_decode is CalibDecode.reference:
        return task.encode(calib, spec.calib_max_length), held_out
    if task.kind.value != "generation":
        raise UserError(f"calib_decode={spec.calib_decode.value}", f"applies to generation tasks and prompt files; "
                        f"data={task.spec.name} is {task.kind.value}: its class is read at the prompt's last token, "
                        "before any continuation", "drop calib_decode (its default, auto, reads the data as it is here)")
    tok = task.tokenizer
    prompts = [tok(task.prompt(ex), add_special_tokens=True)["input_ids"] for ex in calib]
    references = [tok(task.target(ex), add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for ex in calib]
    new_tokens = spec.calib_new_tokens or task.spec.max_new_tokens
    targets = _decoded(adapted, tok, prompts, references, spec, new_tokens, seed)
    return encode_continuations(tok, prompts, targets, spec.calib_max_length or task.spec.max_length), held_out


def _decoded(adapted, tokenizer, prompts: list[list[int]], references: list[list[int]] | None, spec: CompileSpec,
             new_tokens: int, seed: int) -> list[list[int] | None]:
    """Per prompt, the continuation calib_decode asks for: the adapted model's greedy or sampled tokens (up
    to and with its EOS), or, for `mix`, its reference on a seeded half (None where a prompt file has none)."""
    if adapted is None:
        raise ValueError(f"calib_decode={spec.calib_decode.value} needs the source adapter to decode with")
    mode = spec.calib_decode
    keep_reference = torch.zeros(len(prompts), dtype=torch.bool)
    if mode is CalibDecode.mix:
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(2000 + seed + spec.calib_seed))
        keep_reference[order[: len(prompts) // 2]] = True
    rows = [i for i in range(len(prompts)) if not keep_reference[i]]
    temperature = 0.0 if mode is CalibDecode.greedy else spec.calib_temperature
    decoded = continuations(adapted, tokenizer, [prompts[i] for i in rows], new_tokens, temperature,
                            3000 + seed + spec.calib_seed, spec.memory_gb)
    out: list[list[int] | None] = [references[i] if references is not None else None for i in range(len(prompts))]
    for i, tokens in zip(rows, decoded):
        out[i] = tokens
    return out


def continuations(model, tokenizer, prompts: list[list[int]], new_tokens: int, temperature: float = 0.0,
                  seed: int = 0, memory_gb: float | None = None, batch_size: int | None = None) -> list[list[int]]:
    """Each prompt's continuation by `model` (a PEFT model or a plain one), greedy or sampled at
    `temperature` (each prompt's draws seeded by `seed` and its place), up to and with its EOS, in the
    prompts' order; decoded `batch_size` at a time, by default as many as the free memory (or `memory_gb`)
    allows (feta.compile.memory.decode_batch)."""
    eos = tokenizer.eos_token_id
    if batch_size is None:
        batch_size = decode_batch(model, virtual_tokens(model) + max(len(p) for p in prompts) + new_tokens, memory_gb)
    rows = decode_ids(model, prompts, new_tokens, eos, tokenizer.pad_token_id, batch_size, temperature=temperature,
                      seed=seed)
    return [row[: row.index(eos) + 1] if eos in row else row for row in rows]


@dataclass
class OwnOutputs:
    """Held-out prompts and the source's own greedy continuations of them, for the measures of a compile
    on what the model decodes (compile.json's `own_outputs`)."""

    prompts: list[list[int]]
    continuations: list[list[int]]
    batch: dict[str, Tensor]  # prompt + continuation, scored at the continuation's tokens
    new_tokens: int
    seconds: float  # the decode's time: it measures the compile, so fit_time_s leaves it out


def own_outputs(adapted, tokenizer, prompts: list[list[int]], new_tokens: int, max_length: int) -> OwnOutputs | None:
    """The source's greedy continuations of the first OWN_OUTPUTS `prompts` (None when none gets a token)."""
    prompts = prompts[:OWN_OUTPUTS]
    start = time.perf_counter()
    decoded = continuations(adapted, tokenizer, prompts, new_tokens)
    seconds = time.perf_counter() - start
    keep = [i for i, c in enumerate(decoded) if c]
    if not keep:
        return None
    prompts, decoded = [prompts[i] for i in keep], [decoded[i] for i in keep]
    batch = encode_continuations(tokenizer, prompts, decoded, max_length + new_tokens)
    return OwnOutputs(prompts, decoded, batch, new_tokens, seconds)


def resolve_decode(spec: CompileSpec, source: CompileSource) -> CompileSpec:
    """`spec` with calib_decode=auto made concrete: the source's own sampled continuations for a single
    generation task (measured best of the four on E2E: docs/results/compile_methods.md), the data as it is
    for a classification task (its class is read before any continuation), a mixture and a prompt file
    (whose prompts may be classification prompts)."""
    if spec.calib_decode is not CalibDecode.auto:
        return spec
    generates = isinstance(source.data, DataSpec) and source.data.task is TaskKind.generation
    return dataclasses.replace(spec, calib_decode=CalibDecode.sample if generates and source.prompts is None
                               else CalibDecode.reference)


def calibrate(source: CompileSource, tokenizer, spec: CompileSpec, adapted=None) -> Calibration:
    """The source's calibration and held-out batches, from its task or its prompt file; `adapted` (the
    source as a PEFT model) decodes the continuations calib_decode asks for."""
    spec = resolve_decode(spec, source)
    if source.prompts is not None:
        return _prompt_file(source.prompts, tokenizer, spec, source.seed, adapted)
    if isinstance(source.data, MixSpec):
        return _mixture(source.data, tokenizer, spec, source.seed)
    dm = TaskDataModule(source.data, tokenizer, seed=source.seed)
    fit, held_out = calibration_batches(dm, spec, source.seed, adapted)
    own = None
    if adapted is not None and dm.task.kind.value == "generation":
        prompts = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in dm.prompts("validation", spec.eval_size)]
        own = own_outputs(adapted, tokenizer, prompts, spec.calib_new_tokens or dm.spec.max_new_tokens,
                          dm.spec.max_length)
    return Calibration(fit, held_out, dm.splits["train"], dm.collate, getattr(dm.task, "verbalizer_ids", None),
                       dm.task.kind.value, _decode_record(fit, spec), own)


def _prompt_file(prompts: list[str], tokenizer, spec: CompileSpec, seed: int, adapted) -> Calibration:
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(HOLD_OUT_SEED)).tolist()
    n_held = min(spec.eval_size, max(1, round(HOLD_OUT * len(prompts))))
    held_out = [prompts[i] for i in order[:n_held]]
    rest = [prompts[i] for i in order[n_held:]]
    calib = seeded_subset(rest, spec.calib_size, 1000 + seed + spec.calib_seed, "calib_size")
    max_length = spec.calib_max_length or PROMPT_MAX_LENGTH
    fit = encode_prompts(tokenizer, calib, max_length)
    if spec.calib_decode is not CalibDecode.reference:
        ids = _rows(fit)
        targets = _decoded(adapted, tokenizer, ids, None, spec, spec.calib_new_tokens or PROMPT_NEW_TOKENS, seed)
        alone = [i for i, t in enumerate(targets) if not t]  # mix: a prompt alone, scored at its last token
        decoded = [i for i, t in enumerate(targets) if t]
        parts = [encode_continuations(tokenizer, [ids[i] for i in decoded], [targets[i] for i in decoded],
                                      max_length + max(len(targets[i]) for i in decoded))]
        if alone:
            parts.append({k: v[alone] for k, v in fit.items()})
        fit = _stack(parts, tokenizer.pad_token_id)
    record = {"prompts": len(prompts), "held_out": n_held, "calibration": len(calib), **_decode_record(fit, spec)}
    held = encode_prompts(tokenizer, held_out, PROMPT_MAX_LENGTH)
    own = None
    if adapted is not None:
        own = own_outputs(adapted, tokenizer, _rows(held), spec.calib_new_tokens or PROMPT_NEW_TOKENS, PROMPT_MAX_LENGTH)
    return Calibration(fit, held, calib, partial(encode_prompts, tokenizer, max_length=PROMPT_MAX_LENGTH), None,
                       "prompts", record, own)


def _mixture(data: MixSpec, tokenizer, spec: CompileSpec, seed: int) -> Calibration:
    """A task mixture's calibration: each task's share of calib_size (by the mixture's own mixing rule) and
    of eval_size, each encoded as its task encodes it (classification scored at the prompt's last token,
    generation at the reference's tokens), in one batch."""
    if spec.calib_decode is not CalibDecode.reference:
        raise UserError(f"calib_decode={spec.calib_decode.value}", "applies to a single generation task or a prompt "
                        f"file; the mixture {', '.join(data.specs)} calibrates on its tasks' own data",
                        "drop calib_decode (its default, auto, reads the data as it is here)")
    mix = MixDataModule(data, tokenizer, seed)
    mix.setup()
    weights = mix.weights() or mix.train_sizes
    shares = [max(1, round(spec.calib_size * w / sum(weights))) for w in weights]
    held = max(1, spec.eval_size // len(weights))
    fits, helds = [], []
    for dm, n in zip(mix.modules.values(), shares):
        fit, held_out = calibration_batches(dm, dataclasses.replace(spec, calib_size=n, eval_size=held), seed)
        fits.append({k: fit[k] for k in BATCH_KEYS})
        helds.append({k: held_out[k] for k in BATCH_KEYS})
    fit = _stack(fits, tokenizer.pad_token_id)
    record = {"tasks": dict(zip(mix.names, shares)), **_decode_record(fit, spec)}
    return Calibration(fit, _stack(helds, tokenizer.pad_token_id), mix.train,
                       partial(_mixture_collate, mix, tokenizer.pad_token_id), None, "mixture", record)


def _mixture_collate(mix: MixDataModule, pad_id: int, items: list[tuple[int, dict]]) -> dict[str, Tensor]:
    """A batch of (task index, example) items from several tasks, each encoded by its own task, scored where
    that task is read (distillation matches the source there)."""
    groups = {}
    for index, example in items:
        groups.setdefault(index, []).append(example)
    parts = [mix.tasks[mix.names[i]].encode(examples) for i, examples in groups.items()]
    return _stack([{k: part[k] for k in BATCH_KEYS} for part in parts], pad_id)


def _rows(batch: dict[str, Tensor]) -> list[list[int]]:
    """Each row's real token ids."""
    return [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]


def _stack(batches: list[dict[str, Tensor]], pad_id: int) -> dict[str, Tensor]:
    """Right-padded batches with the same keys, as one (rows in order)."""
    width = max(b["input_ids"].shape[1] for b in batches)
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE, "scored": False}
    keys = set.intersection(*(set(b) for b in batches))
    def pad(t: Tensor, value) -> Tensor:
        return torch.cat([t, torch.full((t.shape[0], width - t.shape[1]), value, dtype=t.dtype)], 1)

    return {k: torch.cat([pad(b[k], fill[k]) for b in batches]) for k in keys}


def _decode_record(fit: dict[str, Tensor], spec: CompileSpec) -> dict[str, Any]:
    record: dict[str, Any] = {"decode": spec.calib_decode.value}
    if spec.calib_decode in (CalibDecode.sample, CalibDecode.mix):
        record["temperature"] = spec.calib_temperature
    record["scored_tokens"] = int(fit["scored"].sum())
    return record
