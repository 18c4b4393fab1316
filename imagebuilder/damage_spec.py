"""The ``damage`` fields of a scenario: what the builder breaks on purpose, validated.

Damage is declared where it applies (scenario, process, thread) and checked here like every
other field, so a typo is an error naming the field, never a silently healthy image.  What each
kind does to memory and what windows.kcbwait must then report is decided in damage.py and
documented in docs/output-contract.md ("Damaged images").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from imagebuilder import spec_fields
from imagebuilder.spec_fields import choice as _choice
from imagebuilder.spec_fields import number as _number
from imagebuilder.spec_fields import obj as _obj

# Thread damage without parameters.
TRAP_FRAME_KINDS = ("trap_frame_null", "trap_frame_unmapped", "trap_frame_kernel")
TEB_KINDS = ("teb_paged_out", "stack_bounds_inverted", "stack_bounds_absurd")
# Damage to the outermost (level 1) UCALLOUT_FRAME that makes it fail the plugin's structural
# checks: MachineFrame.Rsp at the frame itself, below it, beyond the stack; Length 0xFFFFFFFF.
OUTER_FRAME_KINDS = ("ucallout_loop", "ucallout_downward", "ucallout_beyond_stack", "length_max")
SIMPLE_THREAD_KINDS = (
    *TRAP_FRAME_KINDS,
    *TEB_KINDS,
    "user_stack_paged_out",
    "rsp_outside_stack",
    *OUTER_FRAME_KINDS,
)
# Thread damage with parameters: {"kind": ..., ...}.
PARAMETER_KINDS = {
    "api_number": ("level", "value"),
    "nesting_level": ("value",),
    "return_address_overwritten": ("level",),
}
# Kinds that change what the user-stack scan sees; at most one of them per thread (each one's
# outcome is defined on an otherwise healthy stack).
SCAN_KINDS = (*TEB_KINDS, "user_stack_paged_out", "rsp_outside_stack", *OUTER_FRAME_KINDS)

NTDLL_EXPORT_KINDS = (
    "lying_header",
    "absurd_counts",
    "absurd_rvas",
    "unterminated_names",
    "decoy_alias",
)
PROCESS_LIST_KINDS = ("revisit", "unmapped")
THREAD_LIST_KINDS = ("cycle", "self_loop", "unmapped", "not_thread")
THREAD_LISTS = ("ethread", "kthread", "both")
CALLBACK_TABLE_KINDS = ("null", "unmapped")
MAX_NESTING_VALUE = 255  # KTHREAD.CallbackNestingLevel is a UCHAR in some builds


class DamageError(spec_fields.FieldError):
    """A damage field is wrong; the message names it (ScenarioError re-raises it)."""


@dataclass(frozen=True)
class ThreadDamage:
    kind: str
    level: int = 0  # api_number: the callback level (1 = outermost)
    value: int = 0  # api_number: the ApiNumber written; nesting_level: the count written


@dataclass(frozen=True)
class ThreadListDamage:
    """ETHREAD/KTHREAD list link of thread ``at`` redirected (``to``: target thread)."""

    at: int
    kind: str
    to: int = 0
    lists: str = "ethread"


@dataclass(frozen=True)
class ProcessDamage:
    thread_list: ThreadListDamage | None = None
    kernel_callback_table: str | None = None
    # "unwind_data_paged_out": module name whose .pdata pages this process cannot read.
    unwind_data_paged_out: str | None = None
    # "unwind_info_corrupt": (module name, function) whose UNWIND_INFO has an invalid version
    # in this process's copy.
    unwind_info_corrupt: tuple[str, str] | None = None


@dataclass(frozen=True)
class ProcessListDamage:
    """ActiveProcessLinks.Flink of process ``at`` redirected to process ``to`` or unmapped."""

    at: int
    kind: str
    to: int = 0


@dataclass(frozen=True)
class ForeignThread:
    """A copy of thread ``tid``'s ETHREAD linked into process ``into``'s thread lists."""

    tid: int
    into: int


@dataclass(frozen=True)
class ScenarioDamage:
    ntdll_exports: str | None = None
    process_list: ProcessListDamage | None = None
    foreign_threads: tuple[ForeignThread, ...] = ()


def parse_thread_damage(data: Any, where: str, levels: int, kind: str) -> tuple[ThreadDamage, ...]:
    """``damage`` of a thread: a list of kind names or {"kind": ..., parameters} objects."""
    if not isinstance(data, list):
        raise DamageError(f"{where}: expected a list, got {type(data).__name__}")
    if data and kind != "user":
        raise DamageError(f"{where}: only user threads can be damaged")
    items: list[ThreadDamage] = []
    for index, item in enumerate(data):
        at = f"{where}[{index}]"
        if isinstance(item, str):
            items.append(ThreadDamage(_choice(item, at, SIMPLE_THREAD_KINDS)))
            continue
        obj = _obj(item, at, {"kind", "level", "value"})
        name = _choice(obj.get("kind"), f"{at}.kind", tuple(PARAMETER_KINDS))
        for key in PARAMETER_KINDS[name]:
            if key not in obj:
                raise DamageError(f"{at}.{key}: missing")
        if name == "api_number":
            level = _number(obj["level"], f"{at}.level", 1, max(1, levels))
            items.append(
                ThreadDamage(name, level, _number(obj["value"], f"{at}.value", 0, 2**32 - 1))
            )
        elif name == "return_address_overwritten":
            items.append(ThreadDamage(name, _number(obj["level"], f"{at}.level", 0, levels)))
        else:
            items.append(
                ThreadDamage(name, 0, _number(obj["value"], f"{at}.value", 0, MAX_NESTING_VALUE))
            )
    kinds = [d.kind for d in items]
    if len(set(kinds)) != len(kinds):
        raise DamageError(f"{where}: a damage kind is listed twice")
    if len([k for k in kinds if k in TRAP_FRAME_KINDS]) > 1:
        raise DamageError(f"{where}: at most one of {', '.join(TRAP_FRAME_KINDS)}")
    scan = [k for k in kinds if k in SCAN_KINDS]
    if len(scan) > 1:
        raise DamageError(f"{where}: {scan[0]} cannot be combined with {scan[1]}")
    needs_callbacks = [k for k in kinds if k in (*OUTER_FRAME_KINDS, "api_number")]
    if needs_callbacks and not levels:
        raise DamageError(f"{where}: {needs_callbacks[0]} needs a thread with callbacks")
    return tuple(items)


def parse_process_damage(data: Any, where: str, tids: list[int]) -> ProcessDamage:
    obj = _obj(
        data,
        where,
        {"thread_list", "kernel_callback_table", "unwind_data_paged_out", "unwind_info_corrupt"},
    )
    thread_list = None
    if "thread_list" in obj:
        at_where = f"{where}.thread_list"
        spec = _obj(obj["thread_list"], at_where, {"at", "kind", "to", "lists"})
        kind = _choice(spec.get("kind"), f"{at_where}.kind", THREAD_LIST_KINDS)
        at = spec.get("at")
        if at not in tids:
            raise DamageError(f"{at_where}.at: {at!r} is not a thread of this process")
        to = spec.get("to", at if kind == "self_loop" else 0)
        if kind == "cycle":
            if to not in tids or tids.index(to) > tids.index(at):
                raise DamageError(
                    f"{at_where}.to: {to!r} must be a thread of this process listed at or"
                    " before 'at' (a cycle links back)"
                )
        elif "to" in spec and kind != "self_loop":
            raise DamageError(f"{at_where}.to: only a cycle names a target thread")
        lists = _choice(spec.get("lists", "ethread"), f"{at_where}.lists", THREAD_LISTS)
        thread_list = ThreadListDamage(at, kind, to, lists)
    table = None
    if "kernel_callback_table" in obj:
        table = _choice(
            obj["kernel_callback_table"], f"{where}.kernel_callback_table", CALLBACK_TABLE_KINDS
        )
    paged = obj.get("unwind_data_paged_out")
    if paged is not None and not isinstance(paged, str):
        raise DamageError(f"{where}.unwind_data_paged_out: a module name")
    corrupt = None
    if "unwind_info_corrupt" in obj:
        at_where = f"{where}.unwind_info_corrupt"
        spec = _obj(obj["unwind_info_corrupt"], at_where, {"module", "function"})
        if not all(isinstance(spec.get(k), str) for k in ("module", "function")):
            raise DamageError(f"{at_where}: needs 'module' and 'function' names")
        corrupt = (spec["module"], spec["function"])
    return ProcessDamage(thread_list, table, paged, corrupt)


def parse_scenario_damage(
    data: Any, where: str, pids: list[int], threads_of: dict[int, int]
) -> ScenarioDamage:
    """``threads_of`` maps each user thread's TID to its process's PID."""
    obj = _obj(data, where, {"ntdll_exports", "process_list", "foreign_threads"})
    ntdll = None
    if "ntdll_exports" in obj:
        ntdll = _choice(obj["ntdll_exports"], f"{where}.ntdll_exports", NTDLL_EXPORT_KINDS)
    process_list = None
    if "process_list" in obj:
        at_where = f"{where}.process_list"
        spec = _obj(obj["process_list"], at_where, {"at", "kind", "to"})
        kind = _choice(spec.get("kind"), f"{at_where}.kind", PROCESS_LIST_KINDS)
        at = spec.get("at")
        if at not in pids:
            raise DamageError(f"{at_where}.at: {at!r} is not a process of the scenario")
        to = spec.get("to", 0)
        if kind == "revisit" and (to not in pids or pids.index(to) > pids.index(at)):
            raise DamageError(f"{at_where}.to: {to!r} must be a process listed at or before 'at'")
        process_list = ProcessListDamage(at, kind, to if kind == "revisit" else 0)
    foreign: list[ForeignThread] = []
    items = obj.get("foreign_threads", [])
    if not isinstance(items, list):
        raise DamageError(f"{where}.foreign_threads: expected a list")
    for index, item in enumerate(items):
        at_where = f"{where}.foreign_threads[{index}]"
        spec = _obj(item, at_where, {"tid", "into"})
        tid, into = spec.get("tid"), spec.get("into")
        if tid not in threads_of:
            raise DamageError(f"{at_where}.tid: {tid!r} is not a user thread of the scenario")
        if into not in pids or into == threads_of[tid]:
            raise DamageError(f"{at_where}.into: {into!r} must be another process's PID")
        foreign.append(ForeignThread(tid, into))
    return ScenarioDamage(ntdll, process_list, tuple(foreign))
