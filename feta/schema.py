"""Helpers shared by the config schemas (ModelSpec, DataSpec, the adapter specs)."""

from __future__ import annotations

import dataclasses

from omegaconf import DictConfig, OmegaConf


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    """OmegaConf schemas cannot type `Literal` choices, so each spec checks them in `__post_init__`."""
    if value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(choices)}; got {value!r}")


def to_spec(cfg: DictConfig, key: str, spec_cls: type | None = None):
    """Build the dataclass behind `cfg[key]` (runs its `__post_init__` checks); `spec_cls` types
    an untyped node, such as a run directory's saved config.yaml.

    Hydra lets `+adapter.foo=1` add a key the schema lacks and `OmegaConf.to_object` then drops it
    silently; a typo must not be ignored, so unknown keys are refused here.
    """
    node = cfg[key]
    spec_cls = spec_cls or OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(spec_cls):
        raise TypeError(f"{key} has no schema (got {spec_cls}); its YAML must list a *_schema in its defaults")
    known = {f.name for f in dataclasses.fields(spec_cls)}
    unknown = sorted(set(node.keys()) - known)
    if unknown:
        raise ValueError(f"{key}.{unknown[0]} is not a setting of {spec_cls.__name__}; known: {', '.join(sorted(known))}")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(spec_cls), node))
