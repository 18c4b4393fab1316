"""The exact texts of docs/output-contract.md for the analysis' findings.

Only the plugins' row rendering calls this module; the analysis itself works with the values
of ``findings.py``.
"""

from __future__ import annotations

from typing import Iterable

from volatility3.plugins.windows.kcbwait_analysis import callback_table, findings, stack_walk

NOTE_SEPARATOR = "; "

AT_RETURN = "at-return"
IN_CALLBACK = "in-callback"
NONE = "none"
CALLBACK = "callback"

_UNREADABLE = {
    findings.Unreadable.TRAP_FRAME: "trap frame",
    findings.Unreadable.TEB: "TEB",
    findings.Unreadable.USER_STACK: "user stack",
    findings.Unreadable.CALLBACK_TABLE: "KernelCallbackTable",
    findings.Unreadable.NTDLL_EXPORTS: "ntdll exports",
    findings.Unreadable.KERNEL_STACK: "kernel stack",
}
_INVALID = {
    findings.Invalid.STACK_BOUNDS: "TEB stack bounds",
    findings.Invalid.RSP_OUTSIDE_STACK: "Rsp outside the TEB stack",
    findings.Invalid.CALLBACK_TABLE: "KernelCallbackTable",
    findings.Invalid.API_NUMBER: "ApiNumber",
    findings.Invalid.NTDLL_EXPORTS: "ntdll exports",
}
_UNREADABLE_SIDE = {
    findings.UnreadableSide.USER_STACK: "user stack",
    findings.UnreadableSide.KERNEL_STACK: "kernel stack",
    findings.UnreadableSide.KERNEL_STACK_NOT_RESIDENT: "kernel stack not resident",
}


def reason(value: findings.Reason) -> str:
    """``at-return``, ``in-callback``, ``at-return+in-callback`` or ``none``."""
    if value.at_return and value.in_callback:
        return f"{AT_RETURN}+{IN_CALLBACK}"
    if value.at_return:
        return AT_RETURN
    if value.in_callback:
        return IN_CALLBACK
    return NONE


def difference(item: findings.Difference) -> str:
    if isinstance(item, findings.FrameOutsideStack):
        return f"Frame {item.frame:#x} outside the TEB stack"
    if isinstance(item, findings.NotAFrame):
        return f"Frame {item.frame:#x} is not a UCALLOUT_FRAME"
    if isinstance(item, findings.RipDiffers):
        return (
            f"trap frame Rip {item.trap_frame_rip:#x} != MachineFrame.Rip "
            f"{item.machine_frame_rip:#x}"
        )
    return (
        f"KCALLOUT_FRAME.TrapFrame {item.kcallout_trap_frame:#x} != trap frame {item.trap_frame:#x}"
    )


def kernel_side(value: findings.KernelSide | None, thread_row: bool = False) -> str | None:
    """A level's ``agrees`` / ``mismatch: ...`` / ``unreadable: ...``; on a thread row a
    mismatch is the bare word (its levels say what differs)."""
    if value is None:
        return None
    if value.verdict is findings.Verdict.AGREES:
        return "agrees"
    if value.verdict is findings.Verdict.MISMATCH:
        if thread_row or not value.differences:
            return "mismatch"
        return "mismatch: " + ", ".join(difference(d) for d in value.differences)
    side = value.unreadable or findings.UnreadableSide.KERNEL_STACK
    return f"unreadable: {_UNREADABLE_SIDE[side]}"


def _ordered(items: Iterable[findings.Unreadable], table: dict, prefix: str) -> list[str]:
    # Enum declaration order is the contract's note order.
    ordered = sorted(set(items), key=lambda item: item.value)
    return [f"{prefix}: {table[item]}" for item in ordered]


def _fact_notes(
    unreadable: Iterable[findings.Unreadable], invalid: Iterable[findings.Invalid]
) -> list[str]:
    return _ordered(unreadable, _UNREADABLE, "unreadable") + _ordered(invalid, _INVALID, "invalid")


def return_address_note(value: int) -> str:
    return f"return address {value:#x} not in KiUserCallbackDispatcher"


def foreign_note(foreign: findings.ForeignThread) -> str:
    if foreign.owner_pid is not None:
        return f"mismatch: KTHREAD.Process is PID {foreign.owner_pid}"
    return f"mismatch: KTHREAD.Process {foreign.owner_address:#x} is not a listed process"


def thread_notes(notes: findings.ThreadNotes) -> str:
    """The thread row's Notes, in the contract's order, or ``""``."""
    out = []
    if notes.foreign is not None:
        out.append(foreign_note(notes.foreign))
    if notes.instrumentation_callback is not None:
        out.append(instrumentation_note(*notes.instrumentation_callback))
    if notes.kernel_stack_not_resident:
        out.append("kernel stack not resident")
    if notes.no_user_trap_frame:
        out.append("no user-mode trap frame")
    if notes.trap_frame_differs is not None:
        out.append(f"KTHREAD.TrapFrame differs: {notes.trap_frame_differs:#x}")
    if notes.kernel_levels is not None:
        out.append(
            f"kernel callout levels: {notes.kernel_levels.found}, "
            f"CallbackNestingLevel: {notes.kernel_levels.nesting_level}"
        )
    if notes.frames_found is not None:
        out.append(
            f"callback frames found: {notes.frames_found.found}, "
            f"CallbackNestingLevel: {notes.frames_found.nesting_level}"
        )
    out.extend(return_address_note(value) for value in notes.return_addresses)
    out.extend(_fact_notes(notes.unreadable, notes.invalid))
    return NOTE_SEPARATOR.join(out)


def level_notes(notes: findings.LevelNotes) -> str:
    """A callback row's Notes: the facts about that level only."""
    out = []
    if notes.return_address is not None:
        out.append(return_address_note(notes.return_address))
    out.extend(_fact_notes(notes.unreadable, notes.invalid))
    return NOTE_SEPARATOR.join(out)


def where(value: callback_table.Where) -> str:
    """``module+0xRVA``, ``private RWX memory 0x...`` or ``private memory 0x...``."""
    if isinstance(value, callback_table.InModule):
        return f"{value.module}+{value.rva:#x}"
    kind = "private RWX memory" if value.rwx else "private memory"
    return f"{kind} {value.address:#x}"


def hijack(item: callback_table.Hijack) -> str:
    """One hijack item; every one starts with ``hijacked`` (``grep -i hijack``)."""
    if isinstance(item, callback_table.TableOutsideOwner):
        return f"hijacked: table at {item.table:#x} in {where(item.where)}"
    if isinstance(item, callback_table.TableInWritableSection):
        return (
            f"hijacked: table at {item.table:#x} in writable section {item.section} of {item.owner}"
        )
    if isinstance(item, callback_table.TableOutsideSections):
        return f"hijacked: table at {item.table:#x} outside the sections of {item.owner}"
    return f"hijacked: entry {item.index} -> {where(item.where)}"


def table_verdict(value: callback_table.TableVerdict | None) -> str | None:
    """``ok``, or the hijack items and ``unreadable: KernelCallbackTable`` (when something could
    not be read) joined with ``; ``."""
    if value is None:
        return None
    items = [hijack(item) for item in value.hijacks]
    if value.unreadable:
        items.append("unreadable: KernelCallbackTable")
    return NOTE_SEPARATOR.join(items) if items else "ok"


def instrumentation_note(address: int, target: callback_table.Where) -> str:
    return f"instrumentation callback {address:#x} in {where(target)}"


# windows.kcbstack (docs/output-contract.md, "windows.kcbstack").
_HOW = {
    stack_walk.How.TRAP_FRAME: "trap frame",
    stack_walk.How.UNWIND: "unwind",
    stack_walk.How.MACHINE_FRAME: "machine frame",
    stack_walk.How.KERNEL_CALLBACK_FRAME: "callback frame (kernel)",
    stack_walk.How.SCAN: "scan",
    stack_walk.How.FRAME_POINTER: "frame pointer",
}
_FRAME_NOTES = {
    stack_walk.Note.NO_USER_TRAP_FRAME: "no user-mode trap frame",
    stack_walk.Note.KERNEL_STACK_NOT_RESIDENT: "kernel stack not resident",
    stack_walk.Note.TRAP_FRAME_UNREADABLE: "unreadable: trap frame",
    stack_walk.Note.UNWIND_DATA_UNREADABLE: "unreadable: unwind data",
    stack_walk.Note.UNWIND_DATA_INVALID: "invalid: unwind data",
    stack_walk.Note.FRAME_REGISTER_UNKNOWN: "frame register unknown",
    stack_walk.Note.NO_RETURN_ADDRESS: "no return address found",
    stack_walk.Note.NOT_IN_MODULE: "not in a module",
    stack_walk.Note.STACK_UNREADABLE: "unreadable: stack {:#x}",
    stack_walk.Note.RSP_NOT_INCREASING: "stack pointer did not increase",
    stack_walk.Note.FRAME_LIMIT: "frame limit",
    stack_walk.Note.LEFT_LEVEL: "left the callback level",
    stack_walk.Note.NOT_KERNEL_FRAME: "not the kernel's UCALLOUT_FRAME {:#x}",
    stack_walk.Note.MACHINE_RIP_DIFFERS: "machine frame Rip differs from the kernel's {:#x}",
    stack_walk.Note.USER_STACK_UNREADABLE: "unreadable: user stack",
    stack_walk.Note.WOW64_CONTEXT_UNREADABLE: "unreadable: WoW64 context",
}


def how(value: stack_walk.How | None) -> str | None:
    return _HOW[value] if value is not None else None


def frame_notes(notes: Iterable[stack_walk.FrameNote]) -> str:
    """A frame row's notes in the order they arose."""
    texts = []
    for item in notes:
        template = _FRAME_NOTES[item.note]
        texts.append(template.format(item.address) if "{" in template else template)
    return NOTE_SEPARATOR.join(texts)
