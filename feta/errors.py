"""The one exception type for configuration and input errors.

A `UserError` is the user's to fix: entry points print it as one line,
`error: <field or file>: <what is wrong>; <how to fix it>`, with no traceback, and exit with status 2.
Every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


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
    """Refuse 0, negative and non-numeric sizes; None only where it has a documented meaning."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        hint = "a positive " + what + (" or null" if allow_none else "")
        raise UserError(key, f"must be {hint}, got {value!r}", f"set {key} to {hint}")
