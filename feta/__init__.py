"""feta: token adaptation (prefixes) vs weight adaptation (LoRA), trained, compiled and compared."""

from __future__ import annotations

import logging
import re
import warnings

__version__ = "0.1.0"

# Messages libraries print about their own internals, which no feta setting or user code changes.
# Python warnings: (message regex, category, module regex of the line the warning points at). pytest resets
# the filters per test, so pyproject.toml's `filterwarnings` lists the same ones.
LIBRARY_WARNINGS = (
    # PEFT passes `past_key_values` to the model's forward; transformers < 5.40 accepts it (pinned). The
    # warning points at the forward's caller: a transformers wrapper or torch's Module.__call__.
    (r"`past_key_values` is deprecated and will be removed", FutureWarning, r"(transformers|torch\.nn)\."),
    # PEFT reads `model.is_gradient_checkpointing` when it wraps a model.
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\.modeling_utils"),
    # Lightning's own pytree helpers still use torch's LeafSpec.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree"),
    # PEFT takes the 1-D lora_B.bias of a LoRA with lora_bias (compile.py's closed form) for an unsaved shard.
    # ':' is written \x3a so that pyproject.toml's `action:message:category:module` can hold the same regex.
    (r"Adapter \S+\x3a \d+ LoRA tensor\(s\) have invalid shape\x3a \S+\.lora_B\.bias\x3a\(\d+,\)"
     r"(, \S+\.lora_B\.bias\x3a\(\d+,\))*( \(\+\d+ more\))?\. A 1-D", UserWarning, r"peft\.utils\.save_and_load"),
    # PEFT warns that a bias-free layer cannot merge a lora_bias; feta's merge gives the model zero-initialized
    # biases first (attention_bias=True), and the merged logits match the adapter's (compile.json: merge).
    (r"`lora_bias=True` was passed but the targeted layer of type \w+ has no bias", UserWarning,
     r"peft\.tuners\.lora\.layer"),
    # torchdata's StatefulDataLoader still calls torch.set_vital.
    (r"'set_vital' is deprecated", UserWarning, r"torchdata\.stateful_dataloader\.stateful_dataloader"),
)
# Log records: (logger name, message regex).
LIBRARY_LOG_LINES = (
    # transformers' logged twin of the `past_key_values` warning above.
    ("transformers.utils.generic", r"`past_key_values`/`cache_params` are deprecated"),
    # Lightning advertises its cloud logger whenever a Trainer is built without it.
    ("lightning.pytorch.utilities.rank_zero", r"💡 Tip: For seamless cloud logging"),
)


class _DropMatching(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def quiet_library_warnings() -> None:
    """Hide `LIBRARY_WARNINGS` and `LIBRARY_LOG_LINES`, each by its exact message and module; every
    other warning still shows. Idempotent."""
    for message, category, module in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, message in LIBRARY_LOG_LINES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMatching) and f.pattern.pattern == message for f in logger.filters):
            logger.addFilter(_DropMatching(message))


# At import, so that every process that runs feta code has them: the entry points, a launcher's worker
# processes (which import feta to run a job), benchmarks and notebooks.
quiet_library_warnings()
