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
E2E = ["data=e2e", "data.train_limit=24", "data.val_limit=6", "data.max_new_tokens=4", "data.batch_size=4",
       "adapter=lora", "adapter.lr=0.05", "trainer.max_steps=5"]


def test_scores_are_written_every_n_steps_and_start_at_the_base_model(tmp_path):
    cfg = tiny_train_cfg(tmp_path, *E2E, *SCORES)
    train(cfg)
    scores = pd.read_csv(tmp_path / "run" / SCORES_FILE)
    assert scores["step"].tolist() == [0, 2, 4, 5]  # every 2 steps, and the last
    assert (scores["inputs"] == 3).all()
    assert scores[["bleu", "rouge_l"]].apply(lambda c: c.between(0, 100)).all().all()

    # A fresh LoRA (B = 0) is the base model: step 0 must score exactly what the base model's outputs score.
    base, tokenizer = load_base_model(to_spec(cfg, "model"))
    dm = TaskDataModule(to_spec(cfg, "data"), tokenizer, seed=cfg.seed)
    dm.setup()
    spec = dm.spec
    outputs = decode_texts(base.eval(), tokenizer, dm.prompts("validation", 3), spec.max_new_tokens,
                           spec.eval_batch_size, spec.max_length)
    expected = generation_metrics(outputs, dm.references[:3])
    assert scores.loc[0, "bleu"] == pytest.approx(expected["bleu"], abs=1e-9)
    assert scores.loc[0, "rouge_l"] == pytest.approx(expected["rouge_l"], abs=1e-9)


def test_a_bad_setting_is_named_and_nothing_is_written(tmp_path):
    cfg = tiny_train_cfg(tmp_path, *E2E, *SCORES)
    with open_dict(cfg):
        cfg.callbacks.scores.every_n_steps = 0
    with pytest.raises(UserError, match=r"^callbacks\.scores\.every_n_steps: must be a positive int"):
        train(cfg)
    assert not (tmp_path / "run").exists()
