"""The Lightning data module: a task's examples, a seeded training subset, and batches from `Task.encode`."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from feta.data.files import read_splits
from feta.data.spec import DataSpec, TaskKind
from feta.data.tasks import Example, make_task


def seeded_subset(examples: list, n: int | None, seed: int) -> list:
    """A fixed seeded sample of `n` examples (all when n is None), the same on every machine."""
    if n is None:
        return examples
    g = torch.Generator().manual_seed(seed)
    return [examples[i] for i in torch.randperm(len(examples), generator=g)[:n].tolist()]


class TaskDataModule(L.LightningDataModule):
    """Training examples (a seeded subset with `train_limit`) and validation inputs (for generation, one
    per distinct prompt, with all of its references in `references`)."""

    def __init__(self, spec: DataSpec, tokenizer, seed: int = 0) -> None:
        super().__init__()
        self.spec, self.tokenizer, self.seed = spec, tokenizer, seed
        self.task = make_task(spec, tokenizer)
        self.splits: dict[str, list[Example]] | None = None
        self.references: list[list[str]] | None = None  # generation: per validation input

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        raw = read_splits(self.spec, self.task.columns, self.task.allowed)
        train = seeded_subset(raw["train"], self.spec.train_limit, self.seed)
        val = raw["validation"]
        if self.task.kind is TaskKind.generation:
            refs = self.task.references(val)
            val = self.task.unique_inputs(val)
        if self.spec.val_limit is not None:
            val = val[: self.spec.val_limit] if self.spec.val_seed is None else seeded_subset(
                val, self.spec.val_limit, self.spec.val_seed)
        if self.task.kind is TaskKind.generation:
            self.references = [refs[self.task.prompt(ex)] for ex in val]
        self.splits = {"train": train, "validation": val}

    def collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        return self.task.encode(examples)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(
            self.splits["train"], batch_size=self.spec.batch_size, shuffle=True, collate_fn=self.collate,
            num_workers=self.spec.num_workers, generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.splits["validation"], batch_size=self.spec.eval_batch_size, shuffle=False,
                          collate_fn=self.collate, num_workers=self.spec.num_workers)

    def prompts(self, split: str, n: int | None = None) -> list[str]:
        """Prompt texts of a split (first n), for decoding, calibration and latency inputs."""
        self.setup()
        return self.task.prompts(self.splits[split][:n])
