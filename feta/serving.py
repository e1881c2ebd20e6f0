"""Serve many adapters from one base model: a mixed batch, each row through its own adapter and read with
its adapter's own task.

A weight adaptation (a LoRA run, or a prefix compiled into LoRA by compile.py) adds a low-rank term to
shared linear layers, so PEFT applies a different one to each row of a batch (`adapter_names`, its
mixed-batch inference). A prefix (token adaptation) instead lengthens every attention by m key/value
positions of its own; rows with different prefixes, or a prefix and a LoRA, cannot share one forward
pass. Compile the prefix first and serve its `compiled-r<r>/`.

Adapters may belong to different tasks (an SST-2 LoRA, an AG News and an E2E compiled prefix). Every
row of a batch, classification or generation, goes through one prefill forward pass: a classification
row is scored from it (its task's classes and verbalizers), a generation row continues through the
cached decoder with its adapter, up to its task's `max_new_tokens`. Classes whose words take several
tokens are scored in a second pass over their task's rows.

    server = AdapterServer.from_runs({"sst2": "multirun/.../1", "topics": "multirun/.../0/compiled-r64"})
    out = server.serve([Request("sst2", "sst2", {"sentence": "a gem"}),
                        Request("topics", "agnews", {"text": "Stocks fell ..."})])
"""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from peft import PeftModel

from feta import runs
from feta.data import DataSpec, Task, TaskDataModule, TaskKind, encode_prompts, make_task
from feta.decoding import continuation_text, left_padded, pad_token_of, prefill_then_greedy
from feta.errors import UserError, check_path
from feta.kinds import KINDS, kinds
from feta.models import load_base_model
from feta.scoring import class_log_probs

BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names
# What a served row is read with: two adapters naming one data.name must agree on these.
TASK_FIELDS = ("task", "prompt", "label_column", "classes", "verbalizers", "target_column", "target_prefix",
               "max_length", "max_new_tokens")


@dataclass(frozen=True)
class Request:
    """One row to serve: the adapter that reads it (BASE: the base model), the task (data.name) whose
    template and classes read it, and its columns."""

    adapter: str
    task: str
    example: dict[str, str]


def resolve_adapters(adapters: dict[str, str | Path]) -> dict[str, runs.ResolvedRun]:
    """Each adapters.NAME=DIR read and checked, without loading a model: LoRA runs or compiled
    directories, all on one base model."""
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
        runs.check_single_task(f"adapters.{name}={path}", run.cfg, "serve.py")
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
    model_spec = runs.run_specs(first.cfg)[0]
    for name, run in resolved.items():
        if runs.run_specs(run.cfg)[0] != model_spec:
            raise UserError(f"adapters.{name}", f"is trained on another base model than {first_name} "
                            f"({runs.run_specs(run.cfg)[0].name} vs {model_spec.name})",
                            "serve adapters of one base model together")
    return resolved


def adapter_tasks(resolved: dict[str, runs.ResolvedRun]) -> dict[str, DataSpec]:
    """Adapter name -> the data spec of its task. Adapters naming one task (data.name) must read it alike."""
    specs = {name: runs.run_specs(run.cfg)[1] for name, run in resolved.items()}
    owner: dict[str, str] = {}
    for name, spec in specs.items():
        other = owner.setdefault(spec.name, name)
        diff = [f for f in TASK_FIELDS if getattr(spec, f) != getattr(specs[other], f)]
        if diff:
            raise UserError(f"adapters.{name}", f"names the task {spec.name} as {other} does, with another "
                            f"data.{diff[0]} ({getattr(specs[other], diff[0])!r} vs {getattr(spec, diff[0])!r})",
                            "train it with the same task settings, or give its task another data.name")
    return specs


def make_request(adapter: str, row: dict[str, Any], specs: dict[str, DataSpec], where: str) -> Request:
    """A Request from a row's adapter name and columns, checked against the adapters' tasks: an unknown
    adapter, a base-model row without a task when several are served, or a missing column is refused."""
    tasks = {spec.name: spec for spec in specs.values()}
    if adapter != BASE and adapter not in specs:
        raise UserError(where, f"names unknown adapter {adapter!r}", f"use one of {', '.join([BASE, *specs])}")
    task = row.get("task")
    if adapter == BASE:
        if task is None and len(tasks) > 1:
            raise UserError(where, f"a {BASE} row needs its task among several ({', '.join(tasks)})",
                            'add "task": "<data name>" to the row')
        task = task if task is not None else next(iter(tasks))
        if task not in tasks:
            raise UserError(where, f"names unknown task {task!r}", f"use one of {', '.join(tasks)}")
    elif task is not None and task != specs[adapter].name:
        raise UserError(where, f"names task {task!r}, but adapter {adapter} serves {specs[adapter].name}",
                        'drop "task" from the row, or name the adapter of that task')
    spec = tasks[task] if adapter == BASE else specs[adapter]
    missing = [c for c in spec.prompt_fields if not isinstance(row.get(c), str)]
    if missing:
        raise UserError(where, f"lacks column {missing[0]!r} (a string) that the {spec.name} template needs",
                        f"give every row of {adapter} the columns {', '.join(spec.prompt_fields)}")
    return Request(adapter, spec.name, {c: row[c] for c in spec.prompt_fields})


def read_requests(path: str, specs: dict[str, DataSpec]) -> list[Request]:
    """Rows from JSON Lines ({"adapter": ..., "<column>": ...}; "task" for a base-model row) or from
    adapter<TAB>text lines (one-column templates); '-' reads stdin."""
    if path != "-":
        check_path(f"input={path}", path, "file", "give JSON Lines or adapter<TAB>text lines")
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"input={path}", "is not UTF-8 text", "save it as UTF-8") from e
    lines = [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise UserError(f"input={path}", "holds no rows", "write one row per line")
    as_json = lines[0][1].lstrip().startswith("{")
    requests = []
    for i, line in lines:
        where = f"input={path}:{i}"
        if as_json:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(where, f"is not JSON ({e.msg})", 'write one {"adapter": ..., "<column>": ...} per line') from e
            if not isinstance(row, dict) or not isinstance(row.get("adapter"), str):
                raise UserError(where, 'has no "adapter"', 'write one {"adapter": ..., "<column>": ...} per line')
            requests.append(make_request(row["adapter"], row, specs, where))
            continue
        parts = line.split("\t", 1)
        if len(parts) != 2 or not parts[1].strip():
            raise UserError(where, "is not adapter<TAB>text", "write one adapter<TAB>text per line, or JSON Lines")
        spec = specs.get(parts[0]) or next(iter(specs.values()))
        if len(spec.prompt_fields) != 1:
            raise UserError(where, f"the {spec.name} template needs columns {spec.prompt_fields}",
                            'give such rows as JSON Lines: {"adapter": ..., "<column>": ...}')
        requests.append(make_request(parts[0], {spec.prompt_fields[0]: parts[1]}, specs, where))
    return requests


class AdapterServer:
    """One base model holding several LoRA adapters by name, each with its task (`tasks`, by data.name)."""

    def __init__(self, model: PeftModel, specs: dict[str, DataSpec], tokenizer) -> None:
        not_lora = {n: type(c).__name__ for n, c in model.peft_config.items() if type(c).__name__ != "LoraConfig"}
        if not_lora:
            raise UserError("adapters", f"mixed-batch serving needs LoRA adapters; {not_lora} are not",
                            "compile a prefix first")
        self.model, self.specs, self.tokenizer = model.eval(), specs, tokenizer
        self.tasks: dict[str, Task] = {}
        for spec in specs.values():
            self.tasks.setdefault(spec.name, make_task(spec, tokenizer))

    @classmethod
    def from_runs(cls, adapters: dict[str, str | Path]) -> "AdapterServer":
        """Load the base model once and every adapter onto it: {name: LoRA run dir or compiled dir}."""
        return cls.load(resolve_adapters(adapters))

    @classmethod
    def load(cls, resolved: dict[str, runs.ResolvedRun]) -> "AdapterServer":
        """As from_runs, from resolve_adapters' result."""
        specs = adapter_tasks(resolved)
        base, tokenizer = load_base_model(runs.run_specs(next(iter(resolved.values())).cfg)[0])
        model = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for name, run in resolved.items():
                path = str(run.run_dir / runs.ADAPTER)
                if model is None:
                    model = PeftModel.from_pretrained(base, path, adapter_name=name)
                else:
                    model.load_adapter(path, adapter_name=name)
        return cls(model, specs, tokenizer)

    @property
    def adapters(self) -> list[str]:
        return list(self.model.peft_config)

    def request(self, adapter: str, example: dict[str, str], task: str | None = None) -> Request:
        """A checked Request (task: for a base-model row among several tasks)."""
        return make_request(adapter, {**example, **({"task": task} if task else {})}, self.specs, "input")

    @torch.no_grad()
    def serve(self, requests: Sequence[Request], batch_size: int = 32) -> list[dict]:
        """One result per row, in order: {"class", "scores"} (classification) or {"output"} (generation),
        with the row's adapter, task and input. Rows go `batch_size` at a time, mixed."""
        for r in requests:  # rows built by hand get the checks read_requests gives a file's rows
            make_request(r.adapter, {**r.example, "task": r.task}, self.specs, "input")
        out: list[dict] = []
        for start in range(0, len(requests), batch_size):
            out += self._batch(requests[start:start + batch_size])
        return out

    def serve_sequential(self, requests: Sequence[Request], batch_size: int = 32) -> list[dict]:
        """What `serve` computes, one adapter and task at a time over its own rows (the baseline)."""
        out: list[dict | None] = [None] * len(requests)
        for key in dict.fromkeys((r.adapter, r.task) for r in requests):  # first-appearance order
            idx = [i for i, r in enumerate(requests) if (r.adapter, r.task) == key]
            for i, result in zip(idx, self.serve([requests[i] for i in idx], batch_size)):
                out[i] = result
        return out

    @contextlib.contextmanager
    def _routing(self, names: list[str]) -> Iterator[dict[str, Any]]:
        """The forward kwargs that route each row: one adapter active, or PEFT's per-row adapter_names."""
        if len(set(names)) > 1:
            yield {"adapter_names": names}
        elif names[0] == BASE:
            with self.model.disable_adapter():
                yield {}
        else:
            self.model.set_adapter(names[0])
            yield {}

    def _batch(self, requests: Sequence[Request]) -> list[dict]:
        tasks = [self.tasks[r.task] for r in requests]
        prompts = [t.tokenizer(t.prompt(r.example))["input_ids"][-t.spec.max_length:] for r, t in zip(requests, tasks)]
        budgets = [t.spec.max_new_tokens if t.kind is TaskKind.generation else 0 for t in tasks]
        pad = pad_token_of(self.tokenizer)
        device = next(self.model.parameters()).device
        ids, mask = left_padded(prompts, pad, device)
        names = [r.adapter for r in requests]
        with self._routing(names) as route:
            first, tokens = prefill_then_greedy(self.model, ids, mask, budgets, self.tokenizer.eos_token_id, pad, **route)
        results = [self._result(r, t, first[i], tokens[i, :budgets[i]].tolist())
                   for i, (r, t) in enumerate(zip(requests, tasks))]
        for name, task in self.tasks.items():  # classes of several tokens: a second pass over their rows
            rows = [i for i, r in enumerate(requests) if r.task == name]
            if task.kind is TaskKind.classification and rows and max(map(len, task.verbalizer_ids)) > 1:
                enc = encode_prompts(self.tokenizer, [task.prompt(requests[i].example) for i in rows], task.spec.max_length)
                with self._routing([names[i] for i in rows]) as route:
                    scores = class_log_probs(self.model, enc["input_ids"].to(device), enc["attention_mask"].to(device),
                                             task.verbalizer_ids, **route)
                for i, row in zip(rows, scores.tolist()):
                    results[i].update(self._classified(task, row))
        return results

    def _result(self, request: Request, task: Task, logits: torch.Tensor, tokens: list[int]) -> dict:
        result = {"adapter": request.adapter, "task": request.task, "input": request.example}
        if task.kind is TaskKind.generation:
            return {**result, "output": continuation_text(self.tokenizer, tokens, self.tokenizer.eos_token_id)}
        if max(map(len, task.verbalizer_ids)) > 1:
            return result  # scored by the second pass
        scores = F.log_softmax(logits.float(), -1)[[v[0] for v in task.verbalizer_ids]]
        return {**result, **self._classified(task, scores.tolist())}

    @staticmethod
    def _classified(task: Task, scores: list[float]) -> dict:
        return {"class": task.classes[max(range(len(scores)), key=scores.__getitem__)], "scores": scores}


def validation_requests(server: AdapterServer, val_limit: int | None, val_seed: int | None, base: bool
                        ) -> tuple[list[Request], list]:
    """(rows, truth): each adapter's own validation subset (the one evaluate.py scores), the adapters (and,
    with `base`, the base model on every task) taking turns row by row. Truth is the class index, or a
    generation input's references."""
    per_task = {}
    for name, task in server.tasks.items():
        dm = TaskDataModule(task.spec.with_validation(val_limit, val_seed), server.tokenizer)
        dm.setup()
        rows = dm.splits["validation"]
        truth = dm.references if task.kind is TaskKind.generation else [task.label(ex) for ex in rows]
        per_task[name] = ([{c: ex[c] for c in task.spec.prompt_fields} for ex in rows], truth)
    rotation = [(a, server.specs[a].name) for a in server.adapters] + ([(BASE, t) for t in server.tasks] if base else [])
    requests, truth = [], []
    for i in range(max(len(rows) for rows, _ in per_task.values())):
        for adapter, task in rotation:
            rows, answers = per_task[task]
            if i < len(rows):
                requests.append(Request(adapter, task, rows[i]))
                truth.append(answers[i])
    return requests, truth
