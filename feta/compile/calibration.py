"""A compile's fixed data: the calibration batch the fit reads and the held-out batch it is measured on.

From a task (a run's, or `data=<name>` for a PEFT adapter): a seeded sample of `calib_size` training
examples and the first `eval_size` validation examples. From a prompt file (`calib_file`): a seeded 20% of
its prompts (at most `eval_size`) held out, and at most `calib_size` of the rest; every prompt is scored
at its last token, the next token it predicts. Both give batches in the format the fit uses
(feta.compile.tokens.BATCH_KEYS, right-padded).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import torch
from torch import Tensor

from feta.compile.source import CompileSource
from feta.compile.spec import CompileSpec
from feta.data import TaskDataModule, encode_prompts, seeded_subset

# Share of a prompt file held out (at most eval_size); the split has its own seed, so that calib_seed
# changes only which prompts calibrate, never which ones measure.
HOLD_OUT = 0.2
HOLD_OUT_SEED = 0
# Tokens a held-out or distillation prompt keeps (the end of a longer one), as a task's default data.max_length.
PROMPT_MAX_LENGTH = 128


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


def calibration_batches(datamodule: TaskDataModule, spec: CompileSpec, seed: int) -> tuple[dict, dict]:
    """A seeded sample of the task's training examples (the fit; for generation prompt + reference target,
    teacher-forced) and the first validation examples (held out for the residuals)."""
    datamodule.setup()
    # Seeded apart from the training subset's permutation.
    calib = seeded_subset(datamodule.splits["train"], spec.calib_size, 1000 + seed + spec.calib_seed)
    task = datamodule.task
    held_out = datamodule.splits["validation"][: spec.eval_size]
    return task.encode(calib, spec.calib_max_length), task.encode(held_out)


def calibrate(source: CompileSource, tokenizer, spec: CompileSpec) -> Calibration:
    """The source's calibration and held-out batches, from its task or its prompt file."""
    if source.prompts is not None:
        return _prompt_file(source.prompts, tokenizer, spec, source.seed)
    dm = TaskDataModule(source.data, tokenizer, seed=source.seed)
    fit, held_out = calibration_batches(dm, spec, source.seed)
    return Calibration(fit, held_out, dm.splits["train"], dm.collate, getattr(dm.task, "verbalizer_ids", None),
                       dm.task.kind.value)


def _prompt_file(prompts: list[str], tokenizer, spec: CompileSpec, seed: int) -> Calibration:
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(HOLD_OUT_SEED)).tolist()
    n_held = min(spec.eval_size, max(1, round(HOLD_OUT * len(prompts))))
    held_out = [prompts[i] for i in order[:n_held]]
    rest = [prompts[i] for i in order[n_held:]]
    calib = seeded_subset(rest, spec.calib_size, 1000 + seed + spec.calib_seed)
    record = {"prompts": len(prompts), "held_out": n_held, "calibration": len(calib)}
    return Calibration(encode_prompts(tokenizer, calib, spec.calib_max_length or PROMPT_MAX_LENGTH),
                       encode_prompts(tokenizer, held_out, PROMPT_MAX_LENGTH), calib,
                       partial(encode_prompts, tokenizer, max_length=PROMPT_MAX_LENGTH), None, "prompts", record)
