"""Serve many adapters from one base model: a mixed batch, one forward pass, each row names its adapter.

A classification task's rows are scored in one forward pass; a generation task's rows decode together,
one forward pass per new token, each row through its own adapter.

A weight adaptation (a LoRA run, or a prefix compiled into LoRA by compile.py) adds a low-rank term to
shared linear layers, so PEFT applies a different one to each row of a batch (`adapter_names`, its
mixed-batch inference). A prefix (token adaptation) instead lengthens every attention by m key/value
positions of its own; rows with different prefixes, or a prefix and a LoRA, cannot share one forward
pass. Compile the prefix first and serve its `compiled-r<r>/`.

    server = AdapterServer.from_runs({"lora": "multirun/.../1", "compiled": "multirun/.../0/compiled-r4"})
    scores = server.classify(["a gem", "a mess"], ["lora", "compiled"])   # (2, K), one forward pass
    texts = server.generate([mr1, mr2], ["lora", "compiled"])           # a generation task's runs
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Sequence

import torch
from peft import PeftModel

from feta import runs
from feta.data import Task, TaskKind, make_task
from feta.decoding import decode_texts
from feta.errors import UserError, check_path
from feta.kinds import KINDS, kinds
from feta.models import load_base_model
from feta.scoring import class_log_probs

BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names
log = logging.getLogger("feta")


class AdapterServer:
    """One base model holding several LoRA adapters by name; classifies a task's inputs, or continues them
    for a generation task, with any of them. An input is a text (templates with one column) or a dict of
    column -> text (pair templates)."""

    def __init__(self, model: PeftModel, task: Task) -> None:
        self.model, self.task = model.eval(), task
        self.tokenizer = task.tokenizer
        kinds = {name: type(cfg).__name__ for name, cfg in model.peft_config.items()}
        not_lora = {n: k for n, k in kinds.items() if k != "LoraConfig"}
        if not_lora:
            raise UserError("adapters", f"mixed-batch serving needs LoRA adapters; {not_lora} are not",
                            "compile a prefix first")

    @classmethod
    def from_runs(cls, adapters: dict[str, str | Path]) -> "AdapterServer":
        """Load the base model once and every adapter onto it: {name: LoRA run dir or compiled dir}."""
        if not adapters:
            raise UserError("adapters", "none given", "pass adapters.<name>=<run dir or compiled dir>")
        resolved = {}
        for name, path in adapters.items():
            if not name or name == BASE:
                raise UserError(f"adapters.{name}", f"the name is reserved or empty ({BASE} means the base model)",
                                "pick another name")
            # Checked here: resolve_run would name it ckpt=
            check_path(f"adapters.{name}={path}", path, "directory", "pass a LoRA run or a compiled directory")
            run = runs.resolve_run(Path(path))
            if KINDS[run.kind].compilable:
                raise UserError(f"adapters.{name}={path}", f"is a {run.kind} (token adaptation): its rows cannot "
                                "share a forward pass with other adapters",
                                f"compile it first (python compile.py ckpt={path}) and serve its compiled "
                                f"directory, {Path(path)}/compiled-r<rank>")
            if not KINDS[run.kind].mixed_batch:
                raise UserError(f"adapters.{name}={path}", f"is a {run.kind} run: PEFT runs only "
                                f"{' and '.join(kinds(mixed_batch=True))} adapters together in one batch",
                                "serve it alone with evaluate.py, or train a LoRA")
            resolved[name] = run
        first_name, first = next(iter(resolved.items()))
        model_spec, data_spec, _ = runs.run_specs(first.cfg)
        for name, run in resolved.items():  # one base model and one task format for all rows
            m, d, _ = runs.run_specs(run.cfg)
            for what, a, b in (("model", m, model_spec), ("data.prompt", d.prompt, data_spec.prompt),
                               ("data.task", d.task, data_spec.task),
                               ("data.classes", list(d.classes), list(data_spec.classes)),
                               ("data.verbalizers", list(d.verbalizers), list(data_spec.verbalizers))):
                if a != b:
                    raise UserError(f"adapters.{name}", f"differs from {first_name} in {what} ({b} vs {a})",
                                    "serve adapters of one base model and task together")
        base, tokenizer = load_base_model(model_spec)
        model = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for name, run in resolved.items():
                path = str(run.run_dir / runs.ADAPTER)
                if model is None:
                    model = PeftModel.from_pretrained(base, path, adapter_name=name)
                else:
                    model.load_adapter(path, adapter_name=name)
        return cls(model, make_task(data_spec, tokenizer))

    @property
    def adapters(self) -> list[str]:
        return list(self.model.peft_config)

    def example(self, text: str | dict[str, str]) -> dict[str, str]:
        """A dict of the template's columns; a plain text fills a one-column template."""
        if isinstance(text, dict):
            return text
        fields = self.task.spec.prompt_fields
        if len(fields) != 1:
            raise UserError("input", f"the template needs columns {fields}", "give each row as a dict of them")
        return {fields[0]: text}

    def encode(self, texts: Sequence[str | dict[str, str]]) -> dict[str, torch.Tensor]:
        prompts = [self.task.prompt(self.example(t)) for t in texts]
        return self.tokenizer(prompts, padding=True, truncation=True, max_length=self.task.spec.max_length,
                              return_tensors="pt")

    @property
    def generates(self) -> bool:
        return self.task.kind is TaskKind.generation

    def _scores(self, enc: dict[str, torch.Tensor], **forward_kwargs) -> torch.Tensor:
        return class_log_probs(self.model, enc["input_ids"], enc["attention_mask"], self.task.verbalizer_ids,
                               **forward_kwargs)

    def _check(self, sentences: Sequence[str], adapter_names: Sequence[str]) -> list[str]:
        names = list(adapter_names)
        if len(names) != len(sentences):
            raise UserError("input", f"{len(sentences)} rows but {len(names)} adapter names", "give one name per row")
        unknown = sorted(set(names) - {BASE, *self.adapters})
        if unknown:
            raise UserError("input", f"unknown adapter(s) {unknown}", f"use one of {', '.join([BASE, *self.adapters])}")
        return names

    @torch.no_grad()
    def classify(self, sentences: Sequence[str], adapter_names: Sequence[str]) -> torch.Tensor:
        """(B, K) class log-probabilities; row i through adapter `adapter_names[i]`, all in one forward pass."""
        names = self._check(sentences, adapter_names)
        return self._scores(self.encode(sentences), adapter_names=names)

    @torch.no_grad()
    def classify_with(self, sentences: Sequence[str], adapter: str) -> torch.Tensor:
        """(B, K) with one adapter active (or BASE): the one-adapter-at-a-time way."""
        self._check(sentences, [adapter] * len(sentences))
        enc = self.encode(sentences)
        if adapter == BASE:
            with self.model.disable_adapter():
                return self._scores(enc)
        self.model.set_adapter(adapter)
        return self._scores(enc)

    def classify_sequential(self, sentences: Sequence[str], adapter_names: Sequence[str]) -> torch.Tensor:
        """What `classify` computes, as one forward pass per adapter over its own rows (the baseline)."""
        return torch.stack(self._one_adapter_at_a_time(self.classify_with, sentences, adapter_names))

    @torch.no_grad()
    def generate(self, texts: Sequence[str | dict[str, str]], adapter_names: Sequence[str]) -> list[str]:
        """Greedy continuations (data.max_new_tokens at most); row i through `adapter_names[i]`, all rows
        decoded together by feta's cached decoder."""
        names = self._check(texts, adapter_names)
        if set(names) == {BASE}:
            with self.model.disable_adapter():
                return self._decode(texts)
        return self._decode(texts, names)

    def generate_sequential(self, texts: Sequence[str | dict[str, str]], adapter_names: Sequence[str]) -> list[str]:
        """What `generate` computes, one adapter at a time over its own rows (the baseline)."""
        return self._one_adapter_at_a_time(lambda rows, name: self.generate(rows, [name] * len(rows)), texts,
                                           adapter_names)

    def _decode(self, texts: Sequence[str | dict[str, str]], names: list[str] | None = None) -> list[str]:
        spec = self.task.spec
        prompts = [self.task.prompt(self.example(t)) for t in texts]
        return decode_texts(self.model, self.tokenizer, prompts, spec.max_new_tokens, len(prompts), spec.max_length,
                            adapter_names=names)

    def _one_adapter_at_a_time(self, run, rows: Sequence, adapter_names: Sequence[str]) -> list:
        names = self._check(rows, adapter_names)
        out: list = [None] * len(names)
        for name in dict.fromkeys(names):  # first-appearance order
            idx = [i for i, n in enumerate(names) if n == name]
            for i, result in zip(idx, run([rows[i] for i in idx], name)):
                out[i] = result
        return out





def read_rows(path: str) -> tuple[list[str], list[str]]:
    """(adapter names, texts) from adapter<TAB>text lines."""
    if path != "-":
        check_path(f"input={path}", path, "file", "give a TSV of adapter<TAB>text lines")
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"input={path}", "is not UTF-8 text", "save it as UTF-8") from e
    rows = [line.split("\t", 1) for line in text.splitlines() if line.strip()]
    bad = next((i for i, r in enumerate(rows, 1) if len(r) != 2 or not r[1].strip()), None)
    if bad is not None:
        raise UserError(f"input={path}:{bad}", "is not adapter<TAB>text", "write one adapter<TAB>text per line")
    return [r[0] for r in rows], [r[1] for r in rows]
