"""GenerationScores: the score of a generation run against its training steps."""

from __future__ import annotations

import pandas as pd
import pytest
from omegaconf import open_dict

from feta.callbacks import SCORES_FILE
from feta.data import TaskDataModule
from feta.decoding import decode_texts
from feta.errors import UserError
from feta.metrics import generation_metrics
from feta.models import load_base_model
from feta.schema import to_spec
from tests.conftest import tiny_train_cfg
from train import train

pytestmark = pytest.mark.usefixtures("one_thread")

SCORES = ["+callbacks.scores._target_=feta.callbacks.GenerationScores", "+callbacks.scores.every_n_steps=2",
          "+callbacks.scores.limit=3"]
TEXTS = [f"{a} {b}" for a in ("red", "blue", "green", "small", "large", "old") for b in ("cup", "door", "tree", "road")]
E2E = ["data=e2e", "data.train_limit=16", "data.val_limit=6", "data.max_new_tokens=4", "data.batch_size=4",
       "adapter=lora", "adapter.lr=0.05", "trainer.max_steps=5"]


def _own_outputs_as_references(tmp_path, cfg) -> list[str]:
    """Rewrite the validation file so that each input's reference is the base model's greedy output."""
    base, tokenizer = load_base_model(to_spec(cfg, "model"))
    dm = TaskDataModule(to_spec(cfg, "data"), tokenizer, seed=cfg.seed)
    dm.setup()
    spec = dm.spec
    outputs = decode_texts(base.eval(), tokenizer, dm.prompts("validation"), spec.max_new_tokens,
                           spec.eval_batch_size, spec.max_length)
    pd.DataFrame({"text": TEXTS[:6], "ref": outputs}).to_csv(tmp_path / "val.csv", index=False)
    return outputs


def test_scores_are_written_every_n_steps_and_start_at_the_base_model(tmp_path):
    rows = pd.DataFrame({"text": TEXTS, "ref": [f"the {t} is fine" for t in TEXTS]})
    rows.to_csv(tmp_path / "train.csv", index=False)
    rows[:6].to_csv(tmp_path / "val.csv", index=False)
    data = ["data=csv", "data.task=generation", "data.target_column=ref", 'data.prompt="Item: {text}. Say:"',
            f"data.train_file={tmp_path / 'train.csv'}", f"data.validation_file={tmp_path / 'val.csv'}",
            "data.max_new_tokens=6", "data.batch_size=4"]
    cfg = tiny_train_cfg(tmp_path, *data, "adapter=lora", "adapter.lr=0.05", "trainer.max_steps=5", *SCORES)
    outputs = _own_outputs_as_references(tmp_path, cfg)
    train(cfg)
    scores = pd.read_csv(tmp_path / "run" / SCORES_FILE)
    assert scores["step"].tolist() == [0, 2, 4, 5]  # before the first step, every 2 steps, and the last
    assert (scores["inputs"] == 3).all()
    assert scores[["bleu", "rouge_l"]].apply(lambda c: c.between(0, 100 + 1e-9)).all().all()
    # A fresh LoRA (B = 0) is the base model, whose outputs are the references: a perfect score at step 0.
    assert scores.loc[0, "rouge_l"] == pytest.approx(100.0)
    assert scores.loc[0, "bleu"] == pytest.approx(generation_metrics(outputs[:3], [[o] for o in outputs[:3]])["bleu"])
    assert scores.loc[0, "bleu"] > 0


def test_a_bad_setting_is_named_and_nothing_is_written(tmp_path):
    cfg = tiny_train_cfg(tmp_path, *E2E, *SCORES)
    with open_dict(cfg):
        cfg.callbacks.scores.every_n_steps = 0
    with pytest.raises(UserError, match=r"^callbacks\.scores\.every_n_steps: must be a positive int"):
        train(cfg)
    assert not (tmp_path / "run").exists()
