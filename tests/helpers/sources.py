"""Tiny compile sources built in-process: gpt2_tiny or llama_tiny as the compile loads them, a random PEFT
prefix on a copy of gpt2_tiny, a right-padded batch scored at each row's last token, and saving a PEFT
model where the compile can read it."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import PrefixTuningConfig, get_peft_model

from feta.data import last_real_token
from feta.models import load_base_model
from feta.schema import to_spec
from tests.conftest import compose_cfg


def tiny_base(model: str = "gpt2_tiny"):
    """conf/model/<model>.yaml loaded as train.py composes it, its tokenizer padding on the right with EOS."""
    base, tok = load_base_model(to_spec(compose_cfg("train", [f"model={model}"]), "model"))
    tok.pad_token, tok.padding_side = tok.eos_token, "right"
    return base, tok


def scored_batch(tok, texts: list[str]) -> dict[str, torch.Tensor]:
    """`texts` tokenized and padded, scored at each row's last real token."""
    batch = dict(tok(texts, padding=True, return_tensors="pt"))
    return {**batch, "scored": last_real_token(batch["attention_mask"])}


def tiny_prefix_source():
    """gpt2_tiny, a random prefix (m=4) on a deep copy of it, and a right-padded batch of 10 prompts."""
    base, tok = tiny_base()
    torch.manual_seed(0)
    source = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    return base, source, scored_batch(tok, [f"Review: a {'very ' * k}good film\nSentiment:" for k in range(10)])


def saved(peft_model, tmp_path: Path, name: str = "source") -> Path:
    """`peft_model` saved with save_pretrained to tmp_path/name; returns that directory."""
    peft_model.save_pretrained(str(tmp_path / name))
    return tmp_path / name
