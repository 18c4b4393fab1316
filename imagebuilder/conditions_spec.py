"""The ``conditions`` fields of a scenario: what every real machine has, validated.

Conditions are not damage: a kernel stack swapped out, stale UCALLOUT_FRAMEs left in stack
memory, a user-stack page paged out, a deep handler stack, an EDR's hook on the dispatcher.  A
thread or process declares them as a list; each item is a kind name or an object
``{"kind": ..., parameters}``, checked here like every other field so that a typo is an error
naming the field path.  What each kind does to memory is in conditions.py; what windows.kcbwait
must then report follows from docs/output-contract.md ("Conditions of real machines").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from imagebuilder import spec_fields
from imagebuilder.spec_fields import choice as _choice
from imagebuilder.spec_fields import number as _number
from imagebuilder.spec_fields import obj as _obj

# Thread conditions without parameters.
SIMPLE_THREAD_CONDITIONS = ("kernel_stack_swapped", "stale_trap_frame")
# Thread conditions with parameters: kind -> (required, optional).
FORGED_KINDS = ("forged_callout_trap_frame", "forged_trap_rip", "forged_trap_rsp")
PARAMETER_THREAD_CONDITIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "stale_frame": (("at",), ("level",)),
    "user_frame_paged_out": (("level",), ()),
    "deep_handler_stack": (("level",), ("size",)),
    **{kind: (("level",), ()) for kind in FORGED_KINDS},
}
# Where a stale frame lies: in live stack above the current Rsp, in the freed stack below it,
# or in the locals of level ``level``'s handler (between that level's frame and the next).
STALE_PLACES = ("above_rsp", "below_rsp", "handler_locals")
# "deeper than 256 KiB" (the contract's case), and small enough for the 1 MiB reservation.
DEEP_MIN, DEEP_MAX, DEEP_DEFAULT = 0x40001, 0xC0000, 0x48000
# Conditions whose outcome the contract defines for a resident kernel stack.
NEEDS_RESIDENT_STACK = (
    *FORGED_KINDS,
    "stale_trap_frame",
    "user_frame_paged_out",
    "deep_handler_stack",
)
PROCESS_CONDITIONS = ("hooked_dispatcher",)
# Modules whose images the builder lays out itself; a hook lives in some other module.
NOT_A_HOOK = ("ntdll.dll", "win32u.dll", "user32.dll")


class ConditionError(spec_fields.FieldError):
    """A conditions field is wrong; the message names it (ScenarioError re-raises it)."""


@dataclass(frozen=True)
class ThreadCondition:
    kind: str
    at: str = ""  # stale_frame: one of STALE_PLACES
    level: int = 0  # the callback level (1 = outermost) it applies to
    size: int = 0  # deep_handler_stack: bytes of handler stack below ``level``'s frame


@dataclass(frozen=True)
class ProcessCondition:
    kind: str
    module: str = ""  # hooked_dispatcher: the module holding the hook


def _parameters(obj: dict[str, Any], at: str, levels: int) -> ThreadCondition:
    kind = _choice(obj.get("kind"), f"{at}.kind", tuple(PARAMETER_THREAD_CONDITIONS))
    required, _optional = PARAMETER_THREAD_CONDITIONS[kind]
    for key in required:
        if key not in obj:
            raise ConditionError(f"{at}.{key}: missing")
    _obj(obj, at, {"kind", *required, *_optional})
    if kind != "stale_frame" and not levels:
        raise ConditionError(f"{at}: {kind} needs a thread with callbacks")
    if kind == "stale_frame":
        place = _choice(obj["at"], f"{at}.at", STALE_PLACES)
        if place != "handler_locals":
            if "level" in obj:
                raise ConditionError(f"{at}.level: only a stale frame in handler_locals has one")
            return ThreadCondition(kind, at=place)
        if not levels:
            raise ConditionError(f"{at}: handler_locals needs a thread with callbacks")
        if "level" not in obj:
            raise ConditionError(f"{at}.level: missing")
        level = _number(obj["level"], f"{at}.level", 1, levels)
        return ThreadCondition(kind, at=place, level=level)
    if kind == "deep_handler_stack":
        if levels < 2:
            raise ConditionError(
                f"{at}: deep_handler_stack lies between two levels; the thread has {levels}"
            )
        level = _number(obj["level"], f"{at}.level", 1, levels - 1)
        size = _number(obj.get("size", DEEP_DEFAULT), f"{at}.size", DEEP_MIN, DEEP_MAX)
        return ThreadCondition(kind, level=level, size=size)
    return ThreadCondition(kind, level=_number(obj["level"], f"{at}.level", 1, levels))


def parse_thread_conditions(
    data: Any, where: str, levels: int, kind: str, damaged: bool
) -> tuple[ThreadCondition, ...]:
    """``conditions`` of a thread with ``levels`` callbacks (``damaged``: it declares damage)."""
    if not isinstance(data, list):
        raise ConditionError(f"{where}: expected a list, got {type(data).__name__}")
    if data and kind != "user":
        raise ConditionError(f"{where}: only user threads have these conditions")
    if data and damaged:
        raise ConditionError(
            f"{where}: a thread declares conditions or damage, not both (use two threads)"
        )
    items: list[ThreadCondition] = []
    for index, item in enumerate(data):
        at = f"{where}[{index}]"
        if isinstance(item, str) and item in PARAMETER_THREAD_CONDITIONS:
            required = "".join(f', "{k}": ...' for k in PARAMETER_THREAD_CONDITIONS[item][0])
            raise ConditionError(f'{at}: {item} takes parameters: {{"kind": "{item}"{required}}}')
        if isinstance(item, str):
            items.append(ThreadCondition(_choice(item, at, SIMPLE_THREAD_CONDITIONS)))
        elif isinstance(item, dict):
            items.append(_parameters(item, at, levels))
        else:
            raise ConditionError(f"{at}: expected a kind name or an object, got {item!r}")
    if len(set(items)) != len(items):
        raise ConditionError(f"{where}: a condition is listed twice")
    kinds = [c.kind for c in items]
    if "kernel_stack_swapped" in kinds:
        clash = [k for k in kinds if k in NEEDS_RESIDENT_STACK]
        if clash:
            raise ConditionError(
                f"{where}: kernel_stack_swapped cannot be combined with {clash[0]}"
                " (its outcome needs a resident kernel stack)"
            )
    if sum(c.size for c in items) > DEEP_MAX:
        raise ConditionError(
            f"{where}: deep_handler_stack sizes add up to more than {DEEP_MAX} bytes"
            " (the thread's stack reservation)"
        )
    rsp_levels = {c.level for c in items if c.kind == "forged_trap_rsp"}
    for c in items:
        if c.kind == "stale_frame" and c.at == "handler_locals" and c.level in rsp_levels:
            raise ConditionError(
                f"{where}: forged_trap_rsp on level {c.level} points into the handler locals"
                " that hold its stale frame; use another level"
            )
    return tuple(items)


def parse_process_conditions(
    data: Any, where: str, modules: tuple[str, ...]
) -> tuple[ProcessCondition, ...]:
    if not isinstance(data, list):
        raise ConditionError(f"{where}: expected a list, got {type(data).__name__}")
    items: list[ProcessCondition] = []
    for index, item in enumerate(data):
        at = f"{where}[{index}]"
        obj = _obj(item, at, {"kind", "module"})
        kind = _choice(obj.get("kind"), f"{at}.kind", PROCESS_CONDITIONS)
        if "module" not in obj:
            raise ConditionError(f"{at}.module: missing")
        module = obj["module"]
        if module not in modules or module in NOT_A_HOOK:
            raise ConditionError(
                f"{at}.module: {module!r} must be one of the process's modules other than"
                f" {', '.join(NOT_A_HOOK)}"
            )
        items.append(ProcessCondition(kind, module))
    if len({c.kind for c in items}) != len(items):
        raise ConditionError(f"{where}: a condition is listed twice")
    return tuple(items)
