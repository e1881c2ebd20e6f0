"""Tasks: how examples become token batches, and what in them is scored.

Every batch is right-padded and holds `input_ids`, `attention_mask`, `labels` and `scored`, a (B, T)
bool mask of the positions whose output the task reads:
- classification: the prompt's last real token, where each class's verbalizer continuation starts;
  `labels` is the class index (B,);
- generation: the prompt, the target and EOS in one sequence; `labels` (B, T) holds the token each
  position predicts (-100 on the prompt and padding, so the loss falls on the target only), and
  `scored` marks those positions.
The compile reports its residuals at `scored`, and distillation matches the outputs there.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from feta.data.spec import DataSpec, TaskKind
from feta.errors import UserError

IGNORE = -100  # the label of positions that carry no loss (torch's cross_entropy ignore_index)
Example = dict[str, str]


def last_real_token(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: each right-padded row's last real token."""
    is_last = torch.zeros_like(attention_mask, dtype=torch.bool)
    is_last[torch.arange(attention_mask.shape[0]), attention_mask.sum(1) - 1] = True
    return is_last


def encode_prompts(tokenizer, prompts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `scored` (each prompt's last real token) of prompt
    texts. A long prompt loses its start, not its end: its end is where the next token is read."""
    rows = [ids[-max_length:] for ids in tokenizer(prompts)["input_ids"]]
    enc = tokenizer.pad({"input_ids": rows}, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "scored": last_real_token(enc["attention_mask"])}


class Task:
    """What both task kinds share: the template, the tokenizer, and the columns a file must hold."""

    kind: TaskKind
    main_metric: str  # what evaluate.py reports, higher is better
    train_metric: str  # what training's validation measures, higher is better (a sweep's default objective)

    def __init__(self, spec: DataSpec, tokenizer) -> None:
        self.spec, self.tokenizer = spec, tokenizer
        self.check_length(spec.max_length, "data.max_length")

    def template_tokens(self) -> int:
        """Tokens of the template's own text (its fields empty), plus what generation puts before a target."""
        empty = self.spec.prompt.format_map({k: "" for k in self.spec.prompt_fields})
        before_target = self.spec.target_prefix if self.kind is TaskKind.generation else ""
        return len(self.tokenizer(empty + before_target)["input_ids"])

    def check_length(self, max_length: int | None, key: str) -> None:
        """Refuse a length that leaves no token for an example's own text after the template: the cut
        would train and score the template alone."""
        n = self.template_tokens()
        if max_length is not None and max_length <= n:
            raise UserError(f"{key}={max_length}", f"cannot hold the template and an input: the template alone is "
                            f"{n} tokens", f"set {key} well above {n}")

    @property
    def columns(self) -> list[str]:
        return self.spec.prompt_fields

    @property
    def allowed(self) -> dict[str, list[str]]:
        """Column -> the values it may hold (the class labels)."""
        return {}

    def prompt(self, example: Example) -> str:
        """The model's input text for an example: the template filled with its columns."""
        return self.spec.prompt.format_map({k: example[k] for k in self.spec.prompt_fields})

    def prompts(self, examples: list[Example]) -> list[str]:
        return [self.prompt(ex) for ex in examples]

    def check_columns(self, columns: list[str], where: str) -> None:
        """Refuse a template or label field that the data does not have (hub tables, user files)."""
        missing = [c for c in self.columns if c not in columns]
        if missing:
            raise UserError(where, f"has no column {missing[0]!r} (columns: {columns})",
                            "fix data.prompt / the column settings, or the data")


class ClassificationTask(Task):
    """K classes; class k's score is the log-probability of its verbalizer after the prompt (summed over
    the verbalizer's tokens), so the adapter alone carries the adaptation (no new head)."""

    kind = TaskKind.classification
    main_metric = "val_acc"
    train_metric = "val_acc"

    def __init__(self, spec: DataSpec, tokenizer) -> None:
        super().__init__(spec, tokenizer)
        self.classes = list(spec.classes)
        self.verbalizer_ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in spec.verbalizers]
        for word, ids in zip(spec.verbalizers, self.verbalizer_ids):
            if not ids:
                raise UserError("data.verbalizers", f"{word!r} has no tokens", "give every class a real word")
        shared = [w for i, (w, ids) in enumerate(zip(spec.verbalizers, self.verbalizer_ids))
                  if ids in self.verbalizer_ids[:i]]
        if shared:
            raise UserError("data.verbalizers", f"{shared[0]!r} tokenizes like another class's word",
                            "give each class a distinct word")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def columns(self) -> list[str]:
        return [*self.spec.prompt_fields, self.spec.label_column]

    @property
    def allowed(self) -> dict[str, list[str]]:
        return {self.spec.label_column: self.classes}

    def label(self, example: Example) -> int:
        return self.classes.index(example[self.spec.label_column])

    def encode(self, examples: list[Example], max_length: int | None = None) -> dict[str, torch.Tensor]:
        # The template's end is where the class is read, so a long input is cut at its start.
        enc = encode_prompts(self.tokenizer, self.prompts(examples), max_length or self.spec.max_length)
        return {**enc, "labels": torch.tensor([self.label(ex) for ex in examples])}


class GenerationTask(Task):
    """A target text after the prompt. Training is teacher-forced on the target tokens (and EOS)."""

    kind = TaskKind.generation
    main_metric = "bleu"  # needs decoding: evaluate.py
    train_metric = "val_token_acc"  # teacher-forced top-1 on the targets

    @property
    def columns(self) -> list[str]:
        return [*self.spec.prompt_fields, self.spec.target_column]

    def target(self, example: Example) -> str:
        return self.spec.target_prefix + example[self.spec.target_column]

    def encode(self, examples: list[Example], max_length: int | None = None) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        prompts = [tok(self.prompt(ex), add_special_tokens=True)["input_ids"] for ex in examples]
        targets = [tok(self.target(ex), add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for ex in examples]
        return encode_continuations(tok, prompts, targets, max_length or self.spec.max_length)

    def references(self, examples: list[Example]) -> "OrderedDict[str, list[str]]":
        """Prompt text -> every target given for it, in first-appearance order (E2E: several per input)."""
        refs: OrderedDict[str, list[str]] = OrderedDict()
        for ex in examples:
            refs.setdefault(self.prompt(ex), []).append(ex[self.spec.target_column])
        return refs

    def unique_inputs(self, examples: list[Example]) -> list[Example]:
        """One example per distinct prompt (its first target), in first-appearance order."""
        seen: dict[str, Example] = {}
        for ex in examples:
            seen.setdefault(self.prompt(ex), ex)
        return list(seen.values())


def encode_continuations(tokenizer, prompts: list[list[int]], targets: list[list[int]],
                         max_length: int) -> dict[str, torch.Tensor]:
    """A generation batch from token ids: each prompt followed by its target (which ends in EOS, if it has
    one), cut to `max_length`, right-padded, with the target positions as `labels` and `scored`."""
    rows, labels = [], []
    for prompt, target in zip(prompts, targets):
        ids = (prompt + target)[:max_length]
        if len(prompt) >= len(ids):
            raise UserError("data.max_length", f"{max_length} tokens leave no room for the target after a "
                            f"{len(prompt)}-token prompt", "raise data.max_length")
        # Position t predicts token t+1: the last prompt position predicts the first target token.
        rows.append(ids)
        labels.append([IGNORE] * (len(prompt) - 1) + ids[len(prompt):] + [IGNORE])
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    label_ids = torch.full((len(rows), width), IGNORE)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(rows, labels)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        label_ids[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": label_ids, "scored": label_ids != IGNORE}


def make_task(spec: DataSpec, tokenizer) -> ClassificationTask | GenerationTask:
    return ClassificationTask(spec, tokenizer) if spec.task is TaskKind.classification else GenerationTask(spec, tokenizer)
