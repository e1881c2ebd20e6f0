"""Helpers shared by the config schemas (ModelSpec, DataSpec, the adapter specs)."""

from __future__ import annotations


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    """OmegaConf schemas cannot type `Literal` choices, so each spec checks them in `__post_init__`."""
    if value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(choices)}; got {value!r}")
