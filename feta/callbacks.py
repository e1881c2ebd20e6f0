"""Lightning callbacks: the guard every run has (`StopOnNonFinite`), and those a run can add by name
(`callbacks.<name>._target_=...` in train.py's config)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import pandas as pd
import torch

from feta.decoding import decode_texts
from feta.errors import UserError, check_positive
from feta.metrics import generation_metrics

log = logging.getLogger("feta")

SCORES_FILE = "generation_scores.csv"


class StopOnNonFinite(L.Callback):
    """Stops a run whose loss or trainable weights turn nan or inf, naming the step. It runs before that
    step's checkpoint is written (Lightning calls ModelCheckpoint after the other callbacks), so the run's
    last.ckpt keeps the last finite weights, and no metrics.json marks the run finished."""

    def __init__(self, lr: float) -> None:
        self.lr = lr

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss).all():
            what = f"the training loss is {loss.item()}"
        elif not all(torch.isfinite(p).all() for p in pl_module.parameters() if p.requires_grad):
            what = "the trainable weights hold nan or inf"
        else:
            return
        raise UserError(f"training step {trainer.global_step}", what,
                        f"lower adapter.lr (it is {self.lr:g}) and train into a new output_dir")


def _scores_path(trainer: L.Trainer) -> Path:
    return Path(trainer.default_root_dir) / SCORES_FILE


class GenerationScores(L.Callback):
    """Greedy-decodes the first `limit` validation inputs every `every_n_steps` training steps (and
    before the first) and scores them (BLEU, ROUGE-L): the score against training steps, at the cost of
    one decode per point. Rows go to `<run>/generation_scores.csv` and to the run's logger.

        python train.py data=e2e adapter=lora +callbacks.scores._target_=feta.callbacks.GenerationScores \\
            +callbacks.scores.every_n_steps=40 +callbacks.scores.limit=100
    """

    def __init__(self, every_n_steps: int = 40, limit: int | None = 100) -> None:
        check_positive("every_n_steps", every_n_steps)  # train.py names them callbacks.<name>.<argument>
        check_positive("limit", limit, allow_none=True)
        self.every_n_steps, self.limit = every_n_steps, limit

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0:  # a resumed run scored its start already
            self._score(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._score(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = _scores_path(trainer)
        if path.exists() and trainer.global_step not in set(pd.read_csv(path)["step"]):
            self._score(trainer, pl_module)  # the last step, when it is not a multiple of every_n_steps

    def _score(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        dm = trainer.datamodule
        spec = dm.spec
        n = len(dm.references) if self.limit is None else min(self.limit, len(dm.references))
        pl_module.model.eval()  # no dropout while decoding
        outputs = decode_texts(pl_module.model, dm.tokenizer, dm.prompts("validation", n), spec.max_new_tokens,
                               spec.eval_batch_size, spec.max_length)
        pl_module.model.train()
        row = {"step": trainer.global_step, "inputs": n, **generation_metrics(outputs, dm.references[:n])}
        path = _scores_path(trainer)
        # Appended row by row, so a killed run keeps the points it reached; a resumed run adds the rest.
        pd.DataFrame([row]).to_csv(path, mode="a", header=not path.exists(), index=False)
        if trainer.logger is not None:
            trainer.logger.log_metrics({f"gen/{k}": row[k] for k in ("bleu", "rouge_l")}, step=trainer.global_step)
        log.info(f"step {row['step']}: BLEU {row['bleu']:.1f}, ROUGE-L {row['rouge_l']:.1f} on {n} inputs")
