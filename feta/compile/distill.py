"""Refine a compiled LoRA by distillation from its source prefix (compile methods distill, lstsq+distill).

The student (the compiled LoRA model) learns the teacher's (the prefix model's) output distribution at
the scored positions (KL: over the classes' verbalizer scores, or over the vocabulary at each target
token for generation) plus its hidden states (MSE): `distill_hidden=final` matches the last layer's
output only, which leaves the intermediate layers free to drift; `layers` matches every layer's output
relative to the prefix-induced change (the residual compile.json reports, squared), at the scored
positions (what the task reads) and at all content tokens (what later tokens attend to; a classified
token is one in ~17), weighted last_weight : 1 (1 = half each; preset=faithful uses 3). Attention
sinks, detected in the base model as in the closed form, are left out of the content term because their
change swamps every other token's.

`distill_data=calibration` distils on the calibration set instead, which with `calib_decode=sample` is
the source's own sampled continuations (on-policy, as in Prompt Baking and GKD): the source's top-k
log-probabilities at every scored token are computed once (as Cartridges does), and the steps run the
student alone, against that cache.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F

from feta.compile.calibration import Calibration
from feta.compile.spec import CompileSpec, DistillData, DistillHidden, Schedule
from feta.compile.tokens import micro_batches, sinks_in
from feta.compile.views import CompileModel
from feta.scoring import class_log_probs, input_positions, scored_logits


class DistillModule(L.LightningModule):
    """`student`: the LoRA PeftModel being trained; `teacher`: the source's forward (a model, or a view of the
    student's own base model, feta/compile/views.py); `base`: the base model's forward (None: the student with
    its adapter off). `verbalizer_ids`: the classes' token ids (classification), or None (generation: every
    target token)."""

    def __init__(self, student, teacher, verbalizer_ids: list[list[int]] | None, lr: float,
                 hidden: DistillHidden | str = DistillHidden.final, sink_ratio: float = 6.0,
                 schedule: Schedule | str = Schedule.constant, steps: int = 1, last_weight: float = 1.0,
                 base=None) -> None:
        super().__init__()
        self.student, self.teacher, self.base = student, teacher, base  # teacher None: CachedTeacherModule
        if isinstance(teacher, torch.nn.Module):
            self.teacher.requires_grad_(False)
        self.verbalizer_ids, self.lr, self.sink_ratio = verbalizer_ids, lr, sink_ratio
        self.hidden, self.schedule = DistillHidden(hidden), Schedule(schedule)
        self.steps, self.last_weight = steps, last_weight

    def _outputs(self, model, batch) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every layer's hidden states (B, T, d) and the log-distribution the task reads at the scored positions."""
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True,
                    logits_to_keep=1)
        hs = [input_positions(h, batch["input_ids"]) for h in out.hidden_states[1:]]  # hs[-1]: after the final norm
        if self.verbalizer_ids is None:
            scores = scored_logits(model, batch, h=hs[-1])  # (n_target_tokens, V)
        else:
            scores = class_log_probs(model, batch["input_ids"], batch["attention_mask"], self.verbalizer_ids, h=hs[-1])
        return hs, F.log_softmax(scores.float(), -1)

    def training_step(self, batch, batch_idx):
        mask = batch["attention_mask"].bool()
        with torch.no_grad():
            h_t, z_t = self._outputs(self.teacher, batch)
            if self.hidden is DistillHidden.layers:
                if self.base is not None:
                    h_b, _ = self._outputs(self.base, batch)
                else:
                    with self.student.disable_adapter():
                        h_b, _ = self._outputs(self.student, batch)
                content = mask & ~sinks_in(h_b[:-1], batch, self.sink_ratio)
                scored = batch["scored"]
        h_s, z_s = self._outputs(self.student, batch)
        kl = F.kl_div(z_s, z_t, log_target=True, reduction="batchmean")
        if self.hidden is DistillHidden.layers:
            def rel(s, t, b, sel):  # squared residual of one layer at the selected tokens
                return (s - t)[sel].pow(2).sum() / (t - b)[sel].pow(2).sum().clamp_min(1e-12)

            w = self.last_weight
            per_layer = [(rel(s, t, b, content) + w * rel(s, t, b, scored)) / (1 + w) for s, t, b in zip(h_s, h_t, h_b)]
            mse = torch.stack(per_layer).mean()
        else:  # relative, so the loss scale does not depend on the model's hidden-state norm
            mse = (h_s[-1] - h_t[-1])[mask].pow(2).sum() / h_t[-1][mask].pow(2).sum()
        loss = kl + mse
        self.log_dict({"distill/kl": kl, "distill/mse": mse}, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW([p for p in self.student.parameters() if p.requires_grad], lr=self.lr)
        if self.schedule is Schedule.constant:
            return opt
        # Cosine decay to zero. On SmolLM2 (docs/results/compile_methods.md) a constant lr stopped improving
        # after 100 steps and 1e-3 was worse than 3e-4; decaying 3e-4 gave +0.5 point and 96.3% agreement at
        # the same residual, and kept improving with more steps (0.295 -> 0.26 from 100 to 300).
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class CachedTeacherModule(DistillModule):
    """Distillation against a cache (`distill_data=calibration`): at every scored token of a batch, the
    source's top-k tokens and their log-probabilities, computed once before the steps (the batch's
    `top_ids`, `top_logp`), against the student's. The loss is the KL divergence between the two
    distributions over those k tokens and one bucket for the rest of the vocabulary,
    Σ_k p(k) log(p(k)/q(k)) + p(rest) log(p(rest)/q(rest)): zero exactly where the student gives each of
    the k tokens, and so the rest, the source's probability. No source forward runs during the steps."""

    def __init__(self, student, lr: float, schedule: Schedule | str, steps: int) -> None:
        super().__init__(student, None, None, lr, schedule=schedule, steps=steps)

    def training_step(self, batch, batch_idx):
        logq = F.log_softmax(scored_logits(self.student, batch).float(), -1).gather(1, batch["top_ids"])
        logp = batch["top_logp"]
        rest_p, rest_q = (torch.log1p(-t.exp().sum(-1).clamp(max=1 - 1e-6)) for t in (logp, logq))
        kl = ((logp.exp() * (logp - logq)).sum(-1) + rest_p.exp() * (rest_p - rest_q)).mean()
        self.log_dict({"distill/kl": kl}, prog_bar=True)
        return kl


@torch.no_grad()
def teacher_cache(source, batches: list[dict[str, torch.Tensor]], k: int) -> list[dict[str, torch.Tensor]]:
    """Each batch with the source's top-k next-token ids and their log-probabilities at its scored positions."""
    out = []
    for batch in batches:
        values, ids = torch.log_softmax(scored_logits(source, batch).float(), -1).topk(k, dim=-1)
        out.append({**batch, "top_ids": ids, "top_logp": values})
    return out


def distill(cm: CompileModel, calibration: Calibration, spec: CompileSpec, seed: int, device: torch.device,
            precision: str = "32-true") -> dict:
    """Run `spec.distill_steps` steps on `device`, in Lightning's `precision`; returns the final losses. One
    model: the teacher is the student's own base model with the source switched in. `distill_data=train`:
    the source's training examples (a task's training split, or a prompt file's calibration prompts) against
    the source's forwards; `calibration`: the calibration batch against the source's cached top-k."""
    L.seed_everything(seed + 2, workers=True, verbose=False)
    if spec.distill_data is DistillData.calibration:
        batches = [{k: v.to(device) for k, v in b.items()} for b in micro_batches(calibration.fit, spec.distill_batch_size)]
        loader = torch.utils.data.DataLoader(teacher_cache(cm.source, batches, spec.distill_top_k), batch_size=None,
                                             shuffle=True)
        module = CachedTeacherModule(cm.lora, spec.distill_lr, spec.distill_schedule, spec.distill_steps)
    else:
        loader = torch.utils.data.DataLoader(calibration.train, batch_size=spec.distill_batch_size, shuffle=True,
                                             collate_fn=calibration.collate)
        module = DistillModule(cm.lora, cm.source, calibration.verbalizer_ids, spec.distill_lr, spec.distill_hidden,
                               spec.sink_ratio, spec.distill_schedule, spec.distill_steps, spec.last_weight, base=cm.base)
    on_gpu = device.type == "cuda"
    trainer = L.Trainer(max_steps=spec.distill_steps, logger=False, enable_checkpointing=False, enable_model_summary=False,
                        accelerator="gpu" if on_gpu else "cpu", devices=[device.index or 0] if on_gpu else 1,
                        precision=precision, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=loader)
    cm.lora.eval()
    return {"steps": trainer.global_step, "data": spec.distill_data.value,
            **{k: float(v) for k, v in trainer.callback_metrics.items()}}
