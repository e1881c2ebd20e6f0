"""The LightningModules that train an adapter: classification through verbalizer scores, generation
through the target tokens' cross-entropy. Only the adapter's parameters train, and checkpoints hold
only those (with the optimizer, loop and RNG state), so a resumed run continues exactly."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, MetricCollection
from transformers import get_scheduler

from feta.metrics import classification_metrics
from feta.scoring import class_log_probs, scored_logits

RNG_KEY, CUDA_RNG_KEY = "torch_rng_state", "torch_cuda_rng_state"


def _rng_state() -> dict[str, torch.Tensor]:
    """The generators dropout draws from: the CPU one and, once CUDA is in use, the current device's."""
    state = {RNG_KEY: torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state[CUDA_RNG_KEY] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state[RNG_KEY])
    if CUDA_RNG_KEY in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state[CUDA_RNG_KEY])


def target_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, top-1 accuracy) of a generation batch's target tokens."""
    logits = scored_logits(model, batch)  # (n_target_tokens, V)
    labels = batch["labels"][batch["scored"]]
    return F.cross_entropy(logits.float(), labels), (logits.argmax(-1) == labels).float().mean()


class AdapterModule(L.LightningModule):
    """What both tasks share: the optimizer over trainable tensors and its LR schedule, slim checkpoints,
    the train mode."""

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float = 0.0,
                 lr_schedule: str = "constant", warmup_steps: int = 0) -> None:
        super().__init__()
        self.model = model
        # Checkpoints keep only trainable tensors (0.7 MB instead of a 515 MB frozen SmolLM2),
        # so loading one must not demand the frozen keys.
        self.strict_loading = False
        self.last_val_step = -1
        self.start_step = 0
        self._rng_to_restore: dict[str, torch.Tensor] | None = None

    def on_fit_start(self) -> None:
        # Base models are loaded in eval mode; train in the mode their config intends (e.g. GPT-2's dropout).
        self.model.train()

    def on_train_start(self) -> None:
        self.start_step = self.global_step  # > 0 when resumed from a checkpoint
        if self._rng_to_restore is not None:
            # Here, not at the first resumed batch: when the checkpoint preceded a validation, Lightning
            # skips that validation on resume but still creates its DataLoader iterator, which draws a
            # seed from the global generator just as the skipped validation did.
            _set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    def on_validation_epoch_end(self) -> None:
        self.last_val_step = self.global_step

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        schedule, warmup = self.hparams.lr_schedule, self.hparams.warmup_steps
        if schedule == "constant" and warmup == 0:
            return optimizer  # no scheduler state, so checkpoints written without one resume as they were
        if schedule == "constant":
            schedule = "constant_with_warmup"
        # Lightning saves and restores the scheduler's step with the checkpoint, so a resumed run
        # continues the same curve; the total counts max_steps or the epochs' batches.
        scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=warmup,
                                  num_training_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        # Lightning keeps no RNG state; dropout's draws continue from here in a resumed run.
        # Byte tensors, so `weights_only=True` loads them.
        checkpoint.update(_rng_state())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if RNG_KEY in checkpoint:
            self._rng_to_restore = {k: checkpoint[k] for k in (RNG_KEY, CUDA_RNG_KEY) if k in checkpoint}


class ClassifierModule(AdapterModule):
    """K-class classification: cross-entropy over the classes' verbalizer log-probabilities."""

    def __init__(self, model: torch.nn.Module, verbalizer_ids: list[list[int]], lr: float,
                 weight_decay: float = 0.0, lr_schedule: str = "constant", warmup_steps: int = 0) -> None:
        super().__init__(model, lr, weight_decay, lr_schedule, warmup_steps)
        self.save_hyperparameters(ignore=["model"])
        self.val_metrics = classification_metrics(len(verbalizer_ids))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return class_log_probs(self.model, batch["input_ids"], batch["attention_mask"], self.hparams.verbalizer_ids)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch), batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["labels"].numel())
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        scores = self(batch)
        n = batch["labels"].numel()
        self.log("val/loss", F.cross_entropy(scores, batch["labels"]), batch_size=n, sync_dist=True)
        self.val_metrics.update(scores.argmax(-1), batch["labels"])

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        values = self.val_metrics.compute()
        self.log("val/acc", values["val_acc"], prog_bar=True, sync_dist=True)
        self.log("val/macro_f1", values["macro_f1"], sync_dist=True)
        self.val_metrics.reset()

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self(batch).argmax(-1), batch["labels"]


class GeneratorModule(AdapterModule):
    """Generation: cross-entropy on the target tokens only (the prompt's positions carry no label)."""

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float = 0.0,
                 lr_schedule: str = "constant", warmup_steps: int = 0) -> None:
        super().__init__(model, lr, weight_decay, lr_schedule, warmup_steps)
        self.save_hyperparameters(ignore=["model"])

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return target_loss(self.model, batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=int(batch["scored"].sum()))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, token_acc = self.loss(batch)
        n = int(batch["scored"].sum())
        self.log("val/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
        self.log("val/token_acc", token_acc, batch_size=n, sync_dist=True)


class MixtureModule(AdapterModule):
    """Several tasks (data=mix): each batch is one task's (`batch["task"]`) and is scored as that task alone
    would score it; validation loader i is task i's split. Logs val/<task>/acc and macro_f1
    (classification) or token_acc (generation), val/<task>/loss, and val/task_mean, the mean of the tasks'
    main metrics."""

    def __init__(self, model: torch.nn.Module, tasks: dict[str, list[list[int]] | None], lr: float,
                 weight_decay: float = 0.0, lr_schedule: str = "constant", warmup_steps: int = 0) -> None:
        """`tasks`: name -> its classes' verbalizer ids (classification) or None (generation), in loader order."""
        super().__init__(model, lr, weight_decay, lr_schedule, warmup_steps)
        self.save_hyperparameters(ignore=["model"])
        self.names = list(tasks)
        self.val_metrics = torch.nn.ModuleDict({
            name: classification_metrics(len(ids)) if ids is not None else MetricCollection({"token_acc": MeanMetric()})
            for name, ids in tasks.items()})

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(loss, class scores (B, K) or target-token accuracy, examples or target tokens) of one task's batch."""
        ids = self.hparams.tasks[self.names[batch["task"]]]
        if ids is None:
            loss, token_acc = target_loss(self.model, batch)
            return loss, token_acc, int(batch["scored"].sum())
        scores = class_log_probs(self.model, batch["input_ids"], batch["attention_mask"], ids)
        return F.cross_entropy(scores, batch["labels"]), scores, batch["labels"].numel()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, _, n = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        name = self.names[dataloader_idx]
        loss, out, n = self.loss({**batch, "task": dataloader_idx})
        self.log(f"val/{name}/loss", loss, batch_size=n, sync_dist=True, add_dataloader_idx=False)
        if self.hparams.tasks[name] is None:
            self.val_metrics[name]["token_acc"].update(out, weight=n)
        else:
            self.val_metrics[name].update(out.argmax(-1), batch["labels"])

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        main = []
        for name in self.names:
            values = self.val_metrics[name].compute()
            if self.hparams.tasks[name] is None:
                self.log(f"val/{name}/token_acc", values["token_acc"], sync_dist=True)
                main.append(values["token_acc"])
            else:
                self.log(f"val/{name}/acc", values["val_acc"], sync_dist=True)
                self.log(f"val/{name}/macro_f1", values["macro_f1"], sync_dist=True)
                main.append(values["val_acc"])
            self.val_metrics[name].reset()
        self.log("val/task_mean", torch.stack(main).mean(), prog_bar=True, sync_dist=True)
