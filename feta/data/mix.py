"""A task mixture: one adapter trained on several tasks, each example keeping its own template and classes.

    python train.py data=mix 'data.tasks=[sst2,agnews,snli]'          # shipped tasks by name
    python train.py data=mix 'data.tasks=[sst2,my_task.yaml]'          # or a data YAML of your own (CSV)

Every batch holds examples of one task, so each is scored as its task alone would score it. The mixing
rule picks the task of each batch: `proportional` visits every training example once per epoch, in a
seeded random order of the tasks' batches (with `mixing_temperature` T != 1, a task is drawn with
probability proportional to n_task^(1/T), so T > 1 evens the tasks out); `equal` draws each task alike.
An epoch has as many batches as the tasks' examples fill. Validation scores every task on its own split.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch.utils.data import DataLoader, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from feta.configs import group_option
from feta.data.datamodule import TaskDataModule, Resumable
from feta.data.spec import DataSpec
from feta.data.tasks import Example, Task
from feta.errors import UserError, check_choice, check_positive, first_line

MIXING = ("proportional", "equal")
MIX_INSTRUCTION = "Read the input below carefully, then answer as the task at hand asks, in its own words and form."


@dataclass
class MixSpec:
    """What `data=mix` sets: the tasks by name, the mixing rule, and the settings every task shares."""

    name: str = field(default="mix", metadata={"help": "The mixture's name (runs and reports)."})
    tasks: list[str] = field(default_factory=lambda: ["sst2", "agnews"],
                             metadata={"help": "conf/data/<name>.yaml names, or paths to data YAML files."})
    mixing: str = field(default="proportional", metadata={"help": "proportional | equal: the task of each batch."})
    mixing_temperature: float = field(default=1.0, metadata={
        "help": "proportional: draw a task with probability ~ n_task^(1/T); 1 = every example once an epoch."})
    train_limit: int | None = field(default=None, metadata={"help": "Per task; null = each task's own."})
    val_limit: int | None = field(default=None, metadata={"help": "Per task; null = each task's own."})
    val_seed: int | None = field(default=None, metadata={"help": "Per task; null = each task's own."})
    batch_size: int = field(default=16, metadata={"help": "Training batch size (one task per batch)."})
    eval_batch_size: int = field(default=32, metadata={"help": "Validation batch size."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers."})
    instruction: str = field(default=MIX_INSTRUCTION,
                             metadata={"help": "adapter.init=text starts a shared prefix or prompt from it."})

    def __post_init__(self) -> None:
        check_choice("data.mixing", self.mixing, MIXING)
        check_positive("data.mixing_temperature", self.mixing_temperature, what="number")
        for key in ("batch_size", "eval_batch_size"):
            check_positive(f"data.{key}", getattr(self, key))
        for key in ("train_limit", "val_limit"):
            check_positive(f"data.{key}", getattr(self, key), allow_none=True)
        if len(self.tasks) < 2:
            raise UserError("data.tasks", f"names {len(self.tasks)} task(s)", "list two or more, e.g. [sst2,agnews]")
        self.specs: dict[str, DataSpec] = {}
        for name in self.tasks:
            spec = self._task_spec(name)
            if spec.name in self.specs:
                raise UserError("data.tasks", f"holds the task {spec.name} twice", "list each task once")
            self.specs[spec.name] = spec

    def _task_spec(self, name: str) -> DataSpec:
        node = group_option("data", name, f"data.tasks={name}")
        if "tasks" in node:
            raise UserError(f"data.tasks={name}", "is itself a mixture", "list single tasks")
        shared = {k: getattr(self, k) for k in ("train_limit", "val_limit", "val_seed") if getattr(self, k) is not None}
        shared |= {k: getattr(self, k) for k in ("batch_size", "eval_batch_size", "num_workers")}
        try:
            return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataSpec), node, shared))
        except OmegaConfBaseException as e:
            raise UserError(f"data.tasks={name}", first_line(e), "fix that task's data YAML") from None

    @property
    def max_length(self) -> int:
        return max(spec.max_length for spec in self.specs.values())

    def with_validation(self, val_limit: int | None = None, val_seed: int | None = None) -> "MixSpec":
        """As DataSpec.with_validation, for every task (None keeps the mixture's own)."""
        return dataclasses.replace(self, val_limit=self.val_limit if val_limit is None else val_limit,
                                   val_seed=self.val_seed if val_seed is None else val_seed)


ConfigStore.instance().store(group="data", name="mix_schema", node=MixSpec)


class MixtureBatches(Resumable, Sampler):
    """Batches of indices into the tasks' concatenated training examples, each batch from one task, the
    tasks' batches interleaved by the mixing rule (seeded per epoch); resumable like ResumableShuffle."""

    def __init__(self, sizes: list[int], batch_size: int, weights: list[float] | None, seed: int) -> None:
        super().__init__()
        self.sizes, self.batch_size, self.weights, self.seed = sizes, batch_size, weights, seed
        self.n_batches = sum(-(-n // batch_size) for n in sizes)

    def order(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        pools, start = [], 0
        for n in self.sizes:
            perm = (torch.randperm(n, generator=g) + start).tolist()
            pools.append([perm[i:i + self.batch_size] for i in range(0, n, self.batch_size)])
            start += n
        if self.weights is None:  # every batch once, the tasks in a random order
            slots = torch.tensor([t for t, pool in enumerate(pools) for _ in pool])
            tasks = slots[torch.randperm(len(slots), generator=g)].tolist()
        else:
            tasks = torch.multinomial(torch.tensor(self.weights, dtype=torch.float64), self.n_batches,
                                      replacement=True, generator=g).tolist()
        taken, batches = [0] * len(pools), []
        for t in tasks:  # a task drawn more often than it has batches starts its pool over
            batches.append(pools[t][taken[t] % len(pools[t])])
            taken[t] += 1
        return batches

    def __len__(self) -> int:
        return self.n_batches


class MixDataModule(L.LightningDataModule):
    """The tasks' data modules side by side: training batches of one task each (`task`: its index in
    `names`), one validation loader per task."""

    def __init__(self, spec: MixSpec, tokenizer, seed: int = 0) -> None:
        super().__init__()
        self.spec, self.seed = spec, seed
        self.modules = {name: TaskDataModule(s, tokenizer, seed) for name, s in spec.specs.items()}
        self.names = list(self.modules)
        self.tasks: dict[str, Task] = {name: m.task for name, m in self.modules.items()}
        self.train: list[tuple[int, Example]] | None = None

    def setup(self, stage: str | None = None) -> None:
        for m in self.modules.values():
            m.setup()
        self.train = [(i, ex) for i, m in enumerate(self.modules.values()) for ex in m.splits["train"]]

    @property
    def train_sizes(self) -> list[int]:
        """Each task's training examples, in `names` order."""
        return [len(m.splits["train"]) for m in self.modules.values()]

    @property
    def val_sizes(self) -> dict[str, int]:
        return {name: len(m.splits["validation"]) for name, m in self.modules.items()}

    def weights(self) -> list[float] | None:
        """The mixing rule's task probabilities (None: every example once an epoch)."""
        sizes = self.train_sizes
        if self.spec.mixing == "equal":
            return [1.0] * len(sizes)
        if self.spec.mixing_temperature == 1.0:
            return None
        return [n ** (1.0 / self.spec.mixing_temperature) for n in sizes]

    def collate(self, items: list[tuple[int, Example]]) -> dict[str, Any]:
        index = items[0][0]
        return {**self.tasks[self.names[index]].encode([ex for _, ex in items]), "task": index}

    def train_dataloader(self) -> StatefulDataLoader:
        self.setup()
        batches = MixtureBatches(self.train_sizes, self.spec.batch_size, self.weights(), self.seed)
        return StatefulDataLoader(self.train, batch_sampler=batches, collate_fn=self.collate,
                                  num_workers=self.spec.num_workers, generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> list[DataLoader]:
        self.setup()
        return [m.val_dataloader() for m in self.modules.values()]
