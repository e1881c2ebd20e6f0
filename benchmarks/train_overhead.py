"""One training step through feta's Lightning module vs a plain PyTorch loop, same PEFT model and batch.

    python benchmarks/train_overhead.py [--model gpt2_small_random] [--adapter prefix|lora] [--steps 20]

Prints the median seconds per step of each and their ratio (target <= 1.10). A step is one full loop
iteration: forward, backward, optimizer step, zero_grad (and, for Lightning, its hooks and logging).
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch
import torch.nn.functional as F
from hydra import compose, initialize

from feta.adapters import build_adapter
from feta.data import TaskDataModule
from feta.models import load_base_model
from feta.schema import to_spec
from feta.scoring import class_log_probs
from feta.training import ClassifierModule


class StepTimer(L.Callback):
    """Wall time from one training batch's start to the next's: the whole loop iteration."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2_small_random")
    ap.add_argument("--adapter", default="prefix")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    with initialize(config_path="../conf", version_base="1.3"):
        cfg = compose("train", [f"model={args.model}", f"adapter={args.adapter}", "adapter.init=random"])
    model_spec, data_spec, spec = (to_spec(cfg, k) for k in ("model", "data", "adapter"))
    base, tok = load_base_model(model_spec)
    model = build_adapter(base, tok, spec, model_spec.arch, model_spec.name)
    dm = TaskDataModule(data_spec, tok)
    dm.setup()
    batch = dm.collate(dm.splits["train"][: data_spec.batch_size])
    verbalizer_ids = dm.task.verbalizer_ids
    n = args.warmup + args.steps

    # Plain PyTorch: the same forward, loss and AdamW as the module.
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr)
    model.train()
    plain = []
    for _ in range(n):
        t0 = time.perf_counter()
        scores = class_log_probs(model, batch["input_ids"], batch["attention_mask"], verbalizer_ids)
        loss = F.cross_entropy(scores, batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # the trainer config clips at 1.0 too
        opt.step()
        opt.zero_grad()
        plain.append(time.perf_counter() - t0)

    # Lightning: the same batch n times through feta's module and a Trainer like train.py's.
    timer = StepTimer()
    module = ClassifierModule(model, verbalizer_ids, lr=spec.lr)
    trainer = L.Trainer(max_steps=n, logger=False, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=False, accelerator="cpu", gradient_clip_val=1.0, callbacks=[timer],
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch] * n, batch_size=None))
    lightning = [b - a for a, b in zip(timer.starts, timer.starts[1:])]

    p = statistics.median(plain[args.warmup:])
    q = statistics.median(lightning[args.warmup:])
    print(f"model={args.model} adapter={args.adapter} batch={data_spec.batch_size} threads={torch.get_num_threads()}")
    print(f"plain PyTorch : {p * 1e3:8.1f} ms/step (median of {len(plain) - args.warmup})")
    print(f"Lightning     : {q * 1e3:8.1f} ms/step (median of {len(lightning) - args.warmup})")
    print(f"ratio Lightning / plain = {q / p:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
