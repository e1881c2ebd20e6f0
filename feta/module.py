"""The LightningModule: SST-2 classification through the LM head's logits of the label words.

No new head: the class score is the LM head's logit of each label word at the last real token,
so the prefix or the LoRA alone carries the adaptation.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F


def input_positions(h: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The input's own positions of a (B, n_virtual + T, ...) activation: a soft prompt (PEFT prompt
    tuning) prepends n_virtual positions to the sequence; a prefix (a KV cache) does not."""
    return h[:, h.size(1) - input_ids.size(1):]


def label_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, label_ids: list[int],
                 **forward_kwargs: Any) -> torch.Tensor:
    """(B, n_labels) LM-head logits of the label words at each row's last real token (right padding).

    `forward_kwargs` go to the model's forward, e.g. PEFT's `adapter_names` (one adapter per row)."""
    # logits_to_keep=1 skips the full-vocabulary head; we apply only the label words' rows below.
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=1,
                **forward_kwargs)
    h = input_positions(out.hidden_states[-1], input_ids)  # (B, T, d), after the final norm
    last = attention_mask.sum(dim=1) - 1  # (B,)
    h_last = h[torch.arange(h.size(0), device=h.device), last]  # (B, d)
    w = model.get_output_embeddings().weight[label_ids]  # (n_labels, d)
    return h_last @ w.T


class LabelWordClassifier(L.LightningModule):
    """Trains only the parameters that require grad (the adapter's); checkpoints hold only those."""

    def __init__(self, model: torch.nn.Module, label_ids: list[int], lr: float, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.save_hyperparameters(ignore=["model"])
        # Checkpoints keep only trainable tensors (0.7 MB instead of a 515 MB frozen base model),
        # so loading one must not demand the frozen keys.
        self.strict_loading = False
        self.last_val_step = -1
        self.start_step = 0

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return label_logits(self.model, batch["input_ids"], batch["attention_mask"], self.hparams.label_ids)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch), batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["labels"].numel())
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch)
        n = batch["labels"].numel()
        self.log("val/loss", F.cross_entropy(logits, batch["labels"]), batch_size=n, sync_dist=True)
        self.log("val/acc", (logits.argmax(-1) == batch["labels"]).float().mean(), prog_bar=True, batch_size=n, sync_dist=True)

    def on_fit_start(self) -> None:
        # Base models are loaded in eval mode; train in the mode their config intends (e.g. GPT-2's dropout).
        self.model.train()

    def on_train_start(self) -> None:
        self.start_step = self.global_step  # > 0 when resumed from a checkpoint

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self(batch).argmax(-1), batch["labels"]

    def on_validation_epoch_end(self) -> None:
        self.last_val_step = self.global_step

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
