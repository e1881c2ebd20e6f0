"""The Lightning data module: a task's examples, a seeded training subset, and batches from `Task.encode`."""

from __future__ import annotations

import logging
from typing import Any, Iterator, Sized

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from feta.data.files import read_splits
from feta.data.spec import DataSpec, TaskKind
from feta.data.tasks import Example, make_task

log = logging.getLogger("feta")


def note_clamp(key: str | None, n: int | None, available: int) -> None:
    """Say so when a size setting asks for more examples than there are (all of them are used)."""
    if key and n is not None and n > available:
        log.warning(f"{key}={n} is more than the {available:,} examples there are: using all {available:,}")


def seeded_subset(examples: list, n: int | None, seed: int, key: str | None = None) -> list:
    """A fixed seeded sample of `n` examples (all when n is None), the same on every machine; `key` names
    the setting that chose `n`, logged when it asks for more than there are."""
    note_clamp(key, n, len(examples))
    if n is None:
        return examples
    g = torch.Generator().manual_seed(seed)
    return [examples[i] for i in torch.randperm(len(examples), generator=g)[:n].tolist()]


class Resumable:
    """A shuffling sampler's place, two ints (epoch, position), which a `StatefulDataLoader` checkpoints:
    a resumed run sees the rest of the interrupted epoch and then the same later epochs. Lightning calls
    `set_epoch` at each epoch's start; `order` is that epoch's full order."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.epoch, self.position = 0, 0  # position: indices handed out in `epoch`
        self._resume_at: tuple[int, int] | None = None

    def order(self) -> list[int]:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        # A generator: the epoch and resume point are read at the first index, after Lightning's set_epoch
        # (a run resumed from an epoch's last step goes on with the next epoch, from its start).
        resume_at, self._resume_at = self._resume_at, None
        start = resume_at[1] if resume_at is not None and resume_at[0] == self.epoch else 0
        self.position = start
        for i in self.order()[start:]:
            self.position += 1
            yield i
        self.epoch, self.position = self.epoch + 1, 0  # the next pass is the next epoch, as with a DataLoader

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]
        self._resume_at = (state["epoch"], state["position"])


class ResumableShuffle(Resumable, RandomSampler):
    """The order a `DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed))` of
    `batch_size` gives Lightning, epoch after epoch, resumable."""

    def __init__(self, data_source: Sized, seed: int, batch_size: int) -> None:
        super().__init__(data_source)
        self.seed, self.batch_size = seed, batch_size

    def order(self) -> list[int]:
        # Each epoch the DataLoader's iterator draws its workers' base seed from the generator, then the
        # sampler its permutation. Lightning takes len(loader) batches and stops, so torch's sampler runs
        # out, and draws one more (unused) permutation, only to fill a short last batch.
        g = torch.Generator().manual_seed(self.seed)
        n = len(self.data_source)
        for _ in range(self.epoch):
            torch.empty((), dtype=torch.int64).random_(generator=g)
            torch.randperm(n, generator=g)
            if n % self.batch_size:
                torch.randperm(n, generator=g)
        torch.empty((), dtype=torch.int64).random_(generator=g)
        return torch.randperm(n, generator=g).tolist()


class ResumableDistributedShuffle(Resumable, DistributedSampler):
    """This process's share of the order Lightning's DistributedSampler draws (seeded by `seed`, the
    permutation of `seed + epoch`), resumable. Lightning leaves a DistributedSampler in place; the one
    it would put in place keeps no position, and a run resumed from an epoch's last step would train
    no further."""

    def __init__(self, dataset: Sized, seed: int, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)

    def order(self) -> list[int]:
        return list(DistributedSampler.__iter__(self))


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
        train = seeded_subset(raw["train"], self.spec.train_limit, self.seed, "data.train_limit")
        val = raw["validation"]
        if self.task.kind is TaskKind.generation:
            refs = self.task.references(val)
            val = self.task.unique_inputs(val)
        if self.spec.val_limit is not None:
            note_clamp("data.val_limit", self.spec.val_limit, len(val))
            val = val[: self.spec.val_limit] if self.spec.val_seed is None else seeded_subset(
                val, self.spec.val_limit, self.spec.val_seed)
        if self.task.kind is TaskKind.generation:
            self.references = [refs[self.task.prompt(ex)] for ex in val]
        self.splits = {"train": train, "validation": val}

    def collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        return self.task.encode(examples)

    def train_dataloader(self) -> StatefulDataLoader:
        """Shuffled batches whose position Lightning checkpoints (the loop state's `combined_loader`)."""
        self.setup()
        train = self.splits["train"]
        distributed = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        if distributed:  # DDP, also on one device: the order of Lightning's DistributedSampler
            sampler = ResumableDistributedShuffle(train, self.seed, distributed["num_replicas"], distributed["rank"])
        else:
            sampler = ResumableShuffle(train, self.seed, self.spec.batch_size)
        # The generator seeds the workers only; without one the loader would draw their seed from torch's
        # global RNG, the stream dropout draws from.
        return StatefulDataLoader(
            train, batch_size=self.spec.batch_size, sampler=sampler,
            collate_fn=self.collate, num_workers=self.spec.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.splits["validation"], batch_size=self.spec.eval_batch_size, shuffle=False,
                          collate_fn=self.collate, num_workers=self.spec.num_workers)

    def prompts(self, split: str, n: int | None = None) -> list[str]:
        """Prompt texts of a split (first n), for decoding, calibration and latency inputs."""
        self.setup()
        return self.task.prompts(self.splits[split][:n])
