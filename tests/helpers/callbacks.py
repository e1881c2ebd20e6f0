"""Callbacks that simulate failures, for resume tests."""

import lightning as L


class CrashAt(L.Callback):
    """Raise after optimizer step `step`, as a killed job would stop (after its last checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError(f"simulated crash at step {trainer.global_step}")
