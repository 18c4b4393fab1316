"""Checks shared by the declarative ``damage`` and ``conditions`` fields of a scenario.

Each raises ``FieldError`` with a message that starts with the field's path; scenario.py turns
it into a ScenarioError.
"""

from __future__ import annotations

from typing import Any


class FieldError(ValueError):
    """A declared field is wrong; the message names it."""


def obj(value: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    """``value`` as an object whose keys are all in ``allowed``."""
    if not isinstance(value, dict):
        raise FieldError(f"{where}: expected an object, got {type(value).__name__}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise FieldError(
            f"{where}: unknown field {unknown[0]!r} (known: {', '.join(sorted(allowed))})"
        )
    return value


def choice(value: Any, where: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise FieldError(f"{where}: {value!r} is not one of {', '.join(choices)}")
    return value


def number(value: Any, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(f"{where}: expected an integer, got {value!r}")
    if not low <= value <= high:
        raise FieldError(f"{where}: {value} is outside {low}..{high}")
    return value
