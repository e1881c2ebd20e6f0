"""Schema of `conf/data/*.yaml`: which task, which files, how an example becomes a prompt."""

from __future__ import annotations

import dataclasses
import string
from dataclasses import dataclass, field
from enum import Enum

from hydra.core.config_store import ConfigStore

from feta.errors import UserError, check_positive


# SST-2's task in words. A text-initialized prefix or prompt starts from its key/value cache (adapter.init=text).
SST2_INSTRUCTION = (
    "Classify the sentiment of each movie review as positive or negative. Read the whole review, "
    "weigh praise against criticism, and answer with one word: positive or negative."
)


class TaskKind(str, Enum):
    classification = "classification"  # K classes, each scored as its verbalizer's continuation
    generation = "generation"  # a target text after the prompt, trained on the target tokens only


class DataSource(str, Enum):
    local = "local"  # files: the copy shipped in feta/assets, or `path` / `train_file` + `validation_file`
    hub = "hub"  # `datasets.load_dataset(hub_id, hub_config)`; needs the network or a hub cache


@dataclass
class DataSpec:
    """What `data=<name>` sets. `__post_init__` checks values when a task function builds it."""

    name: str = field(default="sst2", metadata={"help": "Data set name; a shipped one reads feta/assets/<name>."})
    task: TaskKind = field(default=TaskKind.classification, metadata={"help": "classification | generation."})
    source: DataSource = field(default=DataSource.local, metadata={"help": "local files | hub (datasets)."})
    path: str | None = field(default=None, metadata={"help": "Folder with train.* and validation.* files "
                                                              "(.tsv, .csv, .jsonl, optionally .gz)."})
    train_file: str | None = field(default=None, metadata={"help": "A training file (CSV, TSV or JSON Lines)."})
    validation_file: str | None = field(default=None, metadata={"help": "A validation file, same format."})
    hub_id: str | None = field(default=None, metadata={"help": "source=hub: the datasets id, e.g. glue."})
    hub_config: str | None = field(default=None, metadata={"help": "source=hub: its configuration, e.g. sst2."})
    hub_validation_split: str = field(default="validation", metadata={"help": "source=hub: the split scored."})
    prompt: str = field(default="Review: {sentence}\nSentiment:",
                        metadata={"help": "Template; each {field} is a column of the data file; \\n and \\t as typed "
                                          "on a command line are a newline and a tab."})
    instruction: str | None = field(default=SST2_INSTRUCTION,
                                    metadata={"help": "The task in words; adapter.init=text starts a prefix or a "
                                                      "prompt from it (adapter.init_text: ${data.instruction})."})
    label_column: str = field(default="label", metadata={"help": "classification: the column holding the class."})
    classes: list[str] = field(default_factory=lambda: ["0", "1"],
                               metadata={"help": "classification: class names as they appear in label_column."})
    verbalizers: list[str] = field(default_factory=lambda: [" negative", " positive"],
                                   metadata={"help": "classification: the word scored for each class, in order; "
                                                     "several tokens are scored as a whole continuation."})
    target_column: str | None = field(default=None, metadata={"help": "generation: the column holding the target."})
    target_prefix: str = field(default=" ", metadata={"help": "generation: text between prompt and target."})
    max_new_tokens: int = field(default=64, metadata={"help": "generation: decode at most this many tokens."})
    max_length: int = field(default=128, metadata={"help": "Truncate prompts (with their target) to this many tokens."})
    batch_size: int = field(default=16, metadata={"help": "Training batch size."})
    eval_batch_size: int = field(default=32, metadata={"help": "Validation batch size."})
    train_limit: int | None = field(default=None, metadata={"help": "A fixed seeded subset of this many training "
                                                                    "examples; null = all."})
    val_limit: int | None = field(default=None, metadata={"help": "Score this many validation inputs; null = all."})
    val_seed: int | None = field(default=None, metadata={"help": "null: the first val_limit inputs; an int: a "
                                                                 "sample of val_limit inputs seeded by it."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers."})

    def __post_init__(self) -> None:
        # Hydra keeps `\n` typed in a command-line override as two characters; in a template it means a newline.
        self.prompt = self.prompt.replace("\\n", "\n").replace("\\t", "\t")
        fields = self.prompt_fields
        if not fields:
            raise UserError("data.prompt", f"{self.prompt!r} names no column",
                            "put each input column in braces, e.g. 'Review: {sentence}\\nSentiment:'")
        if self.task is TaskKind.classification:
            if len(self.classes) < 2:
                raise UserError("data.classes", f"needs at least 2 classes, got {list(self.classes)}",
                                "list the class names found in the label column")
            if len(self.verbalizers) != len(self.classes):
                raise UserError("data.verbalizers", f"{len(self.verbalizers)} words for {len(self.classes)} classes",
                                "give one word per class, in the order of data.classes")
            for key, values in (("data.classes", self.classes), ("data.verbalizers", self.verbalizers)):
                seen = [v for i, v in enumerate(values) if v in values[:i]]
                if seen:
                    raise UserError(key, f"{seen[0]!r} is given to two classes", "make each entry distinct")
            if any(not v.strip() for v in self.verbalizers):
                raise UserError("data.verbalizers", "an empty word", "give every class a word")
        elif not self.target_column:
            raise UserError("data.target_column", "is required for data.task=generation",
                            "name the column that holds the target text")
        elif self.target_column in fields:
            raise UserError("data.prompt", f"uses the target column {{{self.target_column}}}",
                            "the prompt may only use input columns")
        if self.source is DataSource.hub and not self.hub_id:
            raise UserError("data.hub_id", "is required for data.source=hub", "e.g. data.hub_id=glue data.hub_config=sst2")
        if bool(self.train_file) != bool(self.validation_file):
            raise UserError("data.train_file" if not self.train_file else "data.validation_file", "is missing",
                            "give both data.train_file and data.validation_file")
        for key in ("max_length", "batch_size", "eval_batch_size", "max_new_tokens"):
            check_positive(f"data.{key}", getattr(self, key))
        for key in ("train_limit", "val_limit"):
            check_positive(f"data.{key}", getattr(self, key), allow_none=True)
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise UserError("data.num_workers", f"must be an int >= 0, got {self.num_workers!r}", "0 = load in the main process")

    def with_validation(self, val_limit: int | None = None, val_seed: int | None = None) -> "DataSpec":
        """This spec with another validation subset (None keeps this spec's own). Every entry point scores
        the subset the data module picks from these two keys: the first val_limit inputs, or with
        val_seed a seeded sample of them; eval.json records both."""
        return dataclasses.replace(self, val_limit=self.val_limit if val_limit is None else val_limit,
                                   val_seed=self.val_seed if val_seed is None else val_seed)

    @property
    def prompt_fields(self) -> list[str]:
        """The columns the template reads, in order of first use."""
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(self.prompt) if name]
        except ValueError as e:  # an unmatched brace
            raise UserError("data.prompt", f"{self.prompt!r} is not a template ({e})",
                            "write each column as {name}; a literal brace as {{ or }}") from e
        return list(dict.fromkeys(names))


ConfigStore.instance().store(group="data", name="data_schema", node=DataSpec)
