"""SST-2 for an LM: a prompt template, the label words the LM head scores, and dynamic padding."""

from __future__ import annotations

import csv
import gzip
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from hydra.core.config_store import ConfigStore
from torch.utils.data import DataLoader

from feta.schema import check_choice

ASSETS = Path(__file__).parent / "assets" / "sst2"
SPLITS = ("train", "validation")


@dataclass
class DataSpec:
    """Schema of `conf/data/*.yaml`; `__post_init__` checks values when the task builds it."""

    name: str = field(default="sst2", metadata={"help": "Dataset name (only sst2 so far)."})
    source: str = field(
        default="local", metadata={"help": "local: the copy shipped in feta/assets (or `path`); hub: datasets' glue/sst2."}
    )
    path: str | None = field(default=None, metadata={"help": "Folder with train.tsv[.gz] and validation.tsv[.gz]."})
    prompt: str = field(default="Review: {sentence}\nSentiment:", metadata={"help": "Template; must contain {sentence}."})
    label_words: list[str] = field(
        default_factory=lambda: [" negative", " positive"],
        metadata={"help": "One word per label (0, 1); each must be a single token."},
    )
    max_length: int = field(default=128, metadata={"help": "Truncate prompts to this many tokens."})
    batch_size: int = field(default=16, metadata={"help": "Training batch size."})
    eval_batch_size: int = field(default=32, metadata={"help": "Validation batch size."})
    train_limit: int | None = field(
        default=None, metadata={"help": "Use a fixed seeded subset of this many training examples (short runs)."}
    )
    val_limit: int | None = field(default=None, metadata={"help": "Use the first N validation sentences."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers."})

    def __post_init__(self) -> None:
        check_choice("data.source", self.source, ("local", "hub"))
        if "{sentence}" not in self.prompt:
            raise ValueError(f"data.prompt must contain '{{sentence}}', got {self.prompt!r}")
        if len(self.label_words) != 2:
            raise ValueError(f"data.label_words needs one word per SST-2 label (2), got {list(self.label_words)}")
        for key in ("max_length", "batch_size", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"data.{key} must be a positive int, got {getattr(self, key)}")
        for key in ("train_limit", "val_limit"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"data.{key} must be a positive int or null (all examples), got {value}")


ConfigStore.instance().store(group="data", name="data_schema", node=DataSpec)


def _read_tsv(path: Path) -> list[tuple[str, int]]:
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None or header[:2] != ["sentence", "label"]:
            raise ValueError(f"{path}: expected a header 'sentence<TAB>label', got {header}; fix data.path")
        for lineno, row in enumerate(reader, start=2):
            if len(row) != 2 or row[1].strip() not in ("0", "1"):
                raise ValueError(f"{path}:{lineno}: expected 'sentence<TAB>0|1', got {row!r}; fix data.path")
            rows.append((row[0].strip(), int(row[1])))
    if not rows:
        raise ValueError(f"{path}: no examples; fix data.path")
    return rows


def load_sst2(spec: DataSpec) -> dict[str, list[tuple[str, int]]]:
    """{"train": [(sentence, label)], "validation": [...]} from the shipped copy, a folder, or the hub."""
    if spec.source == "hub":
        import datasets  # only the online path needs it

        ds = datasets.load_dataset("glue", "sst2")
        return {s: list(zip(ds[s]["sentence"], ds[s]["label"])) for s in SPLITS}
    folder = Path(spec.path) if spec.path else ASSETS
    out = {}
    for split in SPLITS:
        candidates = [folder / f"{split}.tsv", folder / f"{split}.tsv.gz"]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise FileNotFoundError(
                f"data.path={folder}: neither {candidates[0].name} nor {candidates[1].name} found; "
                "point data.path at a folder with SST-2 TSVs, or use data.source=hub"
            )
        out[split] = _read_tsv(found)
    return out


def label_token_ids(tokenizer, label_words: list[str]) -> list[int]:
    """Token id of each label word; the LM head's logit at that id is the class score."""
    ids = []
    for word in label_words:
        toks = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            raise ValueError(f"data.label_words: {word!r} is {len(toks)} tokens {toks} for this tokenizer; use single-token words")
        ids.append(toks[0])
    return ids


class SST2DataModule(L.LightningDataModule):
    """Tokenized prompts, right-padded per batch; the classified token is the last real one."""

    def __init__(self, spec: DataSpec, tokenizer, seed: int = 0) -> None:
        super().__init__()
        self.spec, self.tokenizer, self.seed = spec, tokenizer, seed
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        self.label_ids = label_token_ids(tokenizer, spec.label_words)
        self.splits: dict[str, list[tuple[str, int]]] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        raw = load_sst2(self.spec)
        train = raw["train"]
        if self.spec.train_limit is not None:
            # A seeded permutation, so a limited run sees the same examples on every machine.
            g = torch.Generator().manual_seed(self.seed)
            idx = torch.randperm(len(train), generator=g)[: self.spec.train_limit].tolist()
            train = [train[i] for i in idx]
        val = raw["validation"][: self.spec.val_limit]
        self.splits = {"train": train, "validation": val}

    def collate(self, rows: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
        texts = [self.spec.prompt.format(sentence=s) for s, _ in rows]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.spec.max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": torch.tensor([y for _, y in rows])}

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(
            self.splits["train"], batch_size=self.spec.batch_size, shuffle=True, collate_fn=self.collate,
            num_workers=self.spec.num_workers, generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(
            self.splits["validation"], batch_size=self.spec.eval_batch_size, shuffle=False, collate_fn=self.collate,
            num_workers=self.spec.num_workers,
        )

    def sentences(self, split: str, n: int | None = None) -> list[str]:
        """Prompts of a split (first n), for calibration passes and latency inputs."""
        self.setup()
        return [self.spec.prompt.format(sentence=s) for s, _ in self.splits[split][:n]]
