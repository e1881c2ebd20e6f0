"""Serve many adapters from one base model: a mixed batch, one forward pass, each row names its adapter.

A weight adaptation (a LoRA run, or a prefix compiled into LoRA by compile.py) adds a low-rank term to
shared linear layers, so PEFT applies a different one to each row of a batch (`adapter_names`, its
mixed-batch inference). A prefix (token adaptation) instead lengthens every attention by m key/value
positions of its own; rows with different prefixes, or a prefix and a LoRA, cannot share one forward
pass. Compile the prefix first and serve its `compiled-r<r>/`.

    server = AdapterServer.from_runs({"lora": "multirun/.../1", "compiled": "multirun/.../0/compiled-r4"})
    logits = server.classify(["a gem", "a mess"], ["lora", "compiled"])   # (2, 2), one forward pass
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import torch
from peft import PeftModel

from feta import runs
from feta.data import label_token_ids
from feta.module import label_logits

BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names


class AdapterServer:
    """One base model holding several LoRA adapters by name; classifies SST-2 prompts with any of them."""

    def __init__(self, model: PeftModel, tokenizer, label_ids: list[int], prompt: str = "{sentence}",
                 max_length: int = 128) -> None:
        self.model = model.eval()
        self.tokenizer, self.label_ids, self.prompt, self.max_length = tokenizer, label_ids, prompt, max_length
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"  # label_logits reads each row's last real token
        kinds = {name: type(cfg).__name__ for name, cfg in model.peft_config.items()}
        not_lora = {n: k for n, k in kinds.items() if k != "LoraConfig"}
        if not_lora:
            raise ValueError(f"mixed-batch serving needs LoRA adapters; {not_lora} are not (compile a prefix first)")

    @classmethod
    def from_runs(cls, adapters: dict[str, str | Path]) -> "AdapterServer":
        """Load the base model once and every adapter onto it: {name: LoRA run dir or compiled dir}."""
        from feta.evaluation import resolve
        from feta.models import load_base_model

        if not adapters:
            raise ValueError("no adapters to serve: pass name=<run dir or compiled dir> pairs")
        targets = {}
        for name, path in adapters.items():
            if not name or name == BASE:
                raise ValueError(f"adapter name {name!r} is reserved or empty; {BASE} means the base model")
            target = resolve(Path(path))
            if target.kind == "prefix":
                raise ValueError(
                    f"{name}={path} is a prefix (token adaptation): its rows cannot share a forward pass with "
                    f"other adapters. Compile it first (python compile.py ckpt={path} rank=4) and serve "
                    f"{Path(path) / 'compiled-r4'}"
                )
            targets[name] = target
        first_name, first = next(iter(targets.items()))
        model_spec, data_spec, _ = runs.run_specs(first.cfg)
        for name, t in targets.items():  # one base model and one prompt format for all rows
            m, d, _ = runs.run_specs(t.cfg)
            for what, a, b in (("model", m, model_spec), ("data.prompt", d.prompt, data_spec.prompt),
                               ("data.label_words", list(d.label_words), list(data_spec.label_words))):
                if a != b:
                    raise ValueError(f"adapters {first_name} and {name} differ in {what} ({b} vs {a}); "
                                     "serve adapters of one base model and prompt together")
        base, tokenizer = load_base_model(model_spec)
        model = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for name, t in targets.items():
                path = str(t.run_dir / runs.ADAPTER)
                if model is None:
                    model = PeftModel.from_pretrained(base, path, adapter_name=name)
                else:
                    model.load_adapter(path, adapter_name=name)
        label_ids = label_token_ids(tokenizer, list(data_spec.label_words))
        return cls(model, tokenizer, label_ids, data_spec.prompt, data_spec.max_length)

    @property
    def adapters(self) -> list[str]:
        return list(self.model.peft_config)

    def encode(self, sentences: Sequence[str]) -> dict[str, torch.Tensor]:
        texts = [self.prompt.format(sentence=s) for s in sentences]
        return self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")

    def _check(self, sentences: Sequence[str], adapter_names: Sequence[str]) -> list[str]:
        names = list(adapter_names)
        if len(names) != len(sentences):
            raise ValueError(f"{len(sentences)} sentences but {len(names)} adapter names; give one name per row")
        unknown = sorted(set(names) - {BASE, *self.adapters})
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; loaded: {', '.join([BASE, *self.adapters])}")
        return names

    @torch.no_grad()
    def classify(self, sentences: Sequence[str], adapter_names: Sequence[str]) -> torch.Tensor:
        """(B, n_labels) label-word logits; row i through adapter `adapter_names[i]`, all in one forward pass."""
        names = self._check(sentences, adapter_names)
        enc = self.encode(sentences)
        return label_logits(self.model, enc["input_ids"], enc["attention_mask"], self.label_ids, adapter_names=names)

    @torch.no_grad()
    def classify_with(self, sentences: Sequence[str], adapter: str) -> torch.Tensor:
        """(B, n_labels) with one adapter active (or BASE): the one-adapter-at-a-time way."""
        self._check(sentences, [adapter] * len(sentences))
        enc = self.encode(sentences)
        if adapter == BASE:
            with self.model.disable_adapter():
                return label_logits(self.model, enc["input_ids"], enc["attention_mask"], self.label_ids)
        self.model.set_adapter(adapter)
        return label_logits(self.model, enc["input_ids"], enc["attention_mask"], self.label_ids)

    def classify_sequential(self, sentences: Sequence[str], adapter_names: Sequence[str]) -> torch.Tensor:
        """What `classify` computes, as one forward pass per adapter over its own rows (the baseline)."""
        names = self._check(sentences, adapter_names)
        out = torch.empty(len(names), len(self.label_ids))
        for name in dict.fromkeys(names):  # first-appearance order
            rows = [i for i, n in enumerate(names) if n == name]
            out[rows] = self.classify_with([sentences[i] for i in rows], name)
        return out
