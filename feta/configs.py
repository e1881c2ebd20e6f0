"""The repository's Hydra config files, read without Hydra: a group's option as a plain dict (tests,
benchmarks, and a task mixture naming its tasks by their `conf/data/<name>.yaml`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from feta.errors import UserError

CONF = Path(__file__).resolve().parents[1] / "conf"


def group_option(group: str, name: str, key: str) -> dict[str, Any]:
    """`conf/<group>/<name>.yaml` (or `name` as a path to such a YAML file) without its defaults list;
    `key` names the setting that chose it in an error."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else CONF / group / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
        raise UserError(key, f"no config {path}", f"use one of {', '.join(known)}, or a path to a {group} YAML file")
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    node.pop("defaults", None)
    return node
