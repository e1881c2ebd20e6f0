"""Lightning checkpoints that survive a kill: the writer train.py plugs into its Trainer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins import TorchCheckpointIO

from feta.storage import failed_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint beside its target and renames it over the target, so a job killed mid-write
    leaves the previous checkpoint whole. Lightning's own writer stages the file in the system temp
    directory; when that is another filesystem (a tmpfs /tmp), its final move is a copy into the target,
    and a kill during the copy leaves a truncated last.ckpt that cannot be resumed from. A failed write
    (a full disk) removes its partial file and stops the run with one line; the previous checkpoint stays."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        partial = path.with_name(path.name + ".partial")  # not *.ckpt: ckpt_path="last" never picks it
        with failed_write(path):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with partial.open("wb") as f:
                    torch.save(checkpoint, f)
                    f.flush()
                    os.fsync(f.fileno())  # the bytes are on disk before the name points at them
                os.replace(partial, path)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
