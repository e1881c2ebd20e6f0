"""The one exception type for configuration and input errors.

A `UserError` is the user's to fix: entry points print it as one line,
`error: <field or file>: <what is wrong>; <how to fix it>`, with no traceback, and exit with status 2.
Every other exception is a bug and keeps its traceback. `from_config_error` turns the errors Hydra and
OmegaConf raise while composing a config (a typo'd key, a wrong type, an unknown group option) into
UserErrors that name the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from pathlib import Path

from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

EXIT_USER_ERROR = 2
OVERRIDE_GRAMMAR = "https://hydra.cc/docs/advanced/override_grammar/basic/"


class UserError(ValueError):
    """A bad value, path or file, named: `UserError("data.path=x", "no such directory", "fix data.path")`.

    Subclasses ValueError so that library code catching ValueError (Hydra, OmegaConf) treats it alike.
    """

    def __init__(self, where: str, what: str, fix: str | None = None) -> None:
        self.where, self.what, self.fix = where, what, fix
        super().__init__(f"{where}: {what}" + (f"; {fix}" if fix else ""))


def check_choice(key: str, value: object, choices: tuple[str, ...]) -> None:
    """Refuse a value outside `choices`, naming the key and the choices."""
    if value not in choices:
        raise UserError(key, f"unknown choice {value!r}", f"use one of {', '.join(choices)}")


def check_positive(key: str, value: object, allow_none: bool = False, what: str = "int") -> None:
    """Refuse 0, negative, non-finite and non-numeric sizes; None only where it has a documented meaning."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        hint = "a positive " + what + (" or null" if allow_none else "")
        raise UserError(key, f"must be {hint}, got {value!r}", f"set {key} to {hint}")


def check_finite(node: DictConfig | ListConfig | dict | list, prefix: str = "") -> None:
    """Refuse a nan or inf anywhere in a composed config: no setting of feta or Lightning means it, and a
    nan slips past every range check (nan <= 0 is False)."""
    if isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.to_container(node, resolve=False)
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in items:
        where = f"{prefix}{key}" if isinstance(node, dict) else f"{prefix[:-1]}[{key}]"
        if isinstance(value, (dict, list)):
            check_finite(value, where + ".")
        elif isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{where}={value}", "is not a finite number", f"give {where} a finite value")


def check_path(where: str, path: str | Path, kind: str, fix: str) -> Path:
    """`path` if it exists as a `kind` ("file" or "directory"); else the UserError saying what it is instead."""
    path = Path(path)
    if kind == "file" and path.is_file() or kind == "directory" and path.is_dir():
        return path
    if not path.exists():
        raise UserError(where, f"no such {kind}", fix)
    found = "directory" if path.is_dir() else "file" if path.is_file() else "special file"
    raise UserError(where, f"is a {found}, not a {kind}", fix)


def first_line(text: object) -> str:
    return str(text).strip().splitlines()[0].strip() if str(text).strip() else ""


def _fields(schema: object) -> dict[str, str]:
    """A dataclass schema's field names -> their type as written ({} for anything else)."""
    if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
        return {}
    return {f.name: f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            for f in dataclasses.fields(schema)}


def _bad_key(cause: ConfigKeyError | ConfigAttributeError) -> UserError:
    where, known = cause.full_key or str(cause.key), sorted(_fields(cause.object_type))
    owner = f" of {cause.object_type_str}" if known else ""
    close = difflib.get_close_matches(str(cause.key), known, n=1)
    fix = f"did you mean {where.rsplit('.', 1)[0] + '.' if '.' in where else ''}{close[0]}?" if close else (
        f"known: {', '.join(known)}" if known else "check the spelling (python <script> --cfg job lists the settings)")
    return UserError(where, f"is not a setting{owner}", fix)


def _bad_value(cause: ValidationError, override: str) -> UserError:
    where = cause.full_key or str(cause.key)
    what = first_line(cause.msg or cause)
    what = what[:1].lower() + what[1:]
    type_ = _fields(cause.object_type).get(str(cause.key))
    fix = f"{where} takes a value of type {type_}" if type_ else f"correct the override {override}"
    return UserError(where, what, fix)


def _missing_option(e: MissingConfigException) -> UserError:
    path = str(e.missing_cfg_file or "")
    if "/" not in path:  # the primary config itself
        return UserError(path or "config", "not found", "run the entry point from the repository's root")
    group, option = path.rsplit("/", 1)
    options = [o for o in (e.options or []) if not o.endswith("_schema")]  # schemas are no choice to make
    fix = f"use one of {', '.join(options)}" if options else f"add conf/{group}/{option}.yaml"
    return UserError(f"{group}={option}", f"no such {group.rsplit('/', 1)[-1]} option", fix)


def _quoted(override: str) -> str:
    """How to type `key=value` so that Hydra reads the value as one string: braces, spaces, colons and
    non-ASCII letters are override syntax (or refused) unless the value is quoted."""
    key, sep, value = override.partition("=")
    if not sep or not value or value[0] in "'\"" or not re.fullmatch(r"[+~]{0,2}[\w.\[\]/@-]+", key):
        return f"see {OVERRIDE_GRAMMAR}"
    if "'" not in value:
        return f"quote the value, in the shell: \"{key}='{value}'\""
    if '"' not in value:
        return f"quote the value, in the shell: '{key}=\"{value}\"'"
    return f"quote the value and escape its quotes (see {OVERRIDE_GRAMMAR})"


def from_config_error(e: BaseException) -> UserError | None:
    """The UserError a config-composition error stands for (None: not a configuration error)."""
    if isinstance(e, UserError):
        return e
    if isinstance(e, OverrideParseException):
        return UserError(e.override, f"cannot be parsed ({first_line(e.message)})", _quoted(e.override))
    if isinstance(e, MissingConfigException):
        return _missing_option(e)
    if not isinstance(e, ConfigCompositionException):
        return None
    cause = e.__cause__
    override = str(e).removeprefix("Error merging override ").strip()
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.full_key:
        return _bad_key(cause)
    if isinstance(cause, ValidationError) and cause.full_key:
        return _bad_value(cause, override)
    if isinstance(cause, OmegaConfBaseException) and cause.full_key:
        return UserError(cause.full_key, first_line(cause.msg or cause), f"correct the override {override}")
    # Hydra's own messages ("Could not delete from config. 'x' does not exist.") quote the key.
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or ["cannot be composed"]
    key = re.search(r"'([^'\s]+)'", lines[0])  # no spaces: the apostrophe in "Hydra's" opens no key
    if key and lines[0].startswith("Sweeping over Hydra's configuration"):
        name = key.group(1).split("=", 1)[0]
        return UserError(key.group(1), "sweeps a Hydra setting, which -m cannot do",
                         f"quote the comma list as one value: \"{name}='a,b'\"")
    return UserError(key.group(1) if key else "overrides", lines[0].rstrip("."),
                     " ".join(lines[1:]) or "check the command-line overrides (--help lists them)")
