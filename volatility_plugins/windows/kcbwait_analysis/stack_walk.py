"""A thread's user-mode call stack through every callback level (windows.kcbstack).

The walk starts at the current trap frame T(K) and unwinds frame by frame with each module's
unwind data (``x64_unwind``).  A callback level ends where the stack meets
``KiUserCallbackDispatcher``: its frame sits directly on the level's UCALLOUT_FRAME, whose
MACHINE_FRAME holds the Rip/Rsp of the system call the callback interrupted, so the next
frame is read from there (callback-machinery.md, step 2; the dispatcher's own unwind data says
the same with UWOP_PUSH_MACHFRAME, but Wine's ntdll has no such code, so it is not relied on).
The kernel names where every level's frame is (kcbwait's analysis), so a level whose unwind
goes astray never costs the levels below it: the walk resynchronises on the kernel's frame.
Where unwind data is unreadable or corrupt, a bounded scan for call-site return addresses
continues.  docs/output-contract.md, "windows.kcbstack", states every rule and note.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable, Sequence

from volatility3.plugins.windows.kcbwait_analysis import (
    call_site,
    runtime_functions,
    symbolizer,
    x64_unwind,
)

# A real user stack is rarely deeper than a few hundred frames; a longer walk is a loop the
# monotonic-Rsp rule did not catch or a hostile image.
MAX_FRAMES = 512
# How far the scan looks for a return address (qwords from the frame's Rsp).
SCAN_SLOTS = 0x200
# UCALLOUT_FRAME.MachineFrame (+0x30): Rip at +0x30, Rsp at +0x48 (callback-machinery.md).
MACHINE_FRAME_RIP = 0x30
MACHINE_FRAME_RSP = 0x48


class How(enum.Enum):
    """How a frame was found."""

    TRAP_FRAME = enum.auto()
    UNWIND = enum.auto()
    MACHINE_FRAME = enum.auto()
    KERNEL_CALLBACK_FRAME = enum.auto()
    SCAN = enum.auto()
    FRAME_POINTER = enum.auto()


class Note(enum.Enum):
    """What a frame row says about the walk at that frame."""

    NO_USER_TRAP_FRAME = enum.auto()
    KERNEL_STACK_NOT_RESIDENT = enum.auto()
    TRAP_FRAME_UNREADABLE = enum.auto()
    UNWIND_DATA_UNREADABLE = enum.auto()
    UNWIND_DATA_INVALID = enum.auto()
    FRAME_REGISTER_UNKNOWN = enum.auto()
    NO_RETURN_ADDRESS = enum.auto()
    NOT_IN_MODULE = enum.auto()
    STACK_UNREADABLE = enum.auto()  # with the address
    RSP_NOT_INCREASING = enum.auto()
    FRAME_LIMIT = enum.auto()
    LEFT_LEVEL = enum.auto()
    NOT_KERNEL_FRAME = enum.auto()  # with the kernel's UCALLOUT_FRAME address
    MACHINE_RIP_DIFFERS = enum.auto()  # with T(k-1).Rip
    USER_STACK_UNREADABLE = enum.auto()
    WOW64_CONTEXT_UNREADABLE = enum.auto()


@dataclass(frozen=True)
class FrameNote:
    note: Note
    address: int | None = None


@dataclass(frozen=True)
class StackFrame:
    """One row of windows.kcbstack; ``index`` is None on a thread's only row when it has no
    usable start."""

    index: int | None
    level: int | None
    rip: int | None
    symbol: str | None
    rsp: int | None
    how: How | None
    notes: tuple[FrameNote, ...] = ()


@dataclass(frozen=True)
class LevelEntry:
    """Where the kernel says level k's callback sits, for the walk's crossing into level k-1.

    ``frame`` is F(k) (T(k-1).Rsp); ``rip``/``rsp`` are kcbwait's values for the level
    (MachineFrame.Rip/Rsp, or T(k-1).Rip and None when the frame is unreadable); ``caller_rip``
    and ``caller_rbp`` come from T(k-1).
    """

    number: int
    frame: int | None
    rip: int | None
    rsp: int | None
    caller_rip: int | None
    caller_rbp: int | None


@dataclass(frozen=True)
class UnwindSource:
    """One module copy's unwind data: its RUNTIME_FUNCTIONs and how much of them was read."""

    functions: runtime_functions.RuntimeFunctions
    directory: runtime_functions.DirectoryState
    read: x64_unwind.ImageReader
    parsed: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class ProcessCode:
    """What the walk needs from the thread's process: its modules, their unwind data and
    code bytes, the stack's qwords and the dispatcher test."""

    modules: Sequence[symbolizer.LoadedModule]
    unwind_source: Callable[[symbolizer.LoadedModule], UnwindSource]
    read_qword: x64_unwind.StackReader
    read_code: Callable[[int, int], bytes | None]
    in_dispatcher: Callable[[int], bool]
    symbolize: Callable[[int], str | None]


@dataclass
class _Row:
    level: int
    rip: int | None
    rsp: int | None
    how: How
    notes: list[FrameNote] = field(default_factory=list)


class _Walk:
    def __init__(self, code: ProcessCode, stack_base: int | None) -> None:
        self.code = code
        self.stack_base = stack_base
        self.rows: list[_Row] = []
        self.limit: int | None = None
        """The scan's upper bound: the level's UCALLOUT_FRAME, or the TEB's StackBase."""

    def emit(self, level: int, rip: int | None, rsp: int | None, how: How) -> _Row:
        row = _Row(level, rip, rsp, how)
        self.rows.append(row)
        return row

    def full(self) -> bool:
        return len(self.rows) >= MAX_FRAMES

    def unwind(
        self, registers: x64_unwind.Registers, row: _Row
    ) -> tuple[x64_unwind.Registers, How] | None:
        """The caller of the frame ``registers`` and how it was found; None (with a note on
        ``row``) when the unwind cannot continue."""
        code = self.code
        module = symbolizer.find_module(code.modules, registers.rip)
        if module is None:
            row.notes.append(FrameNote(Note.NOT_IN_MODULE))
            return None
        source = code.unwind_source(module)
        rva = registers.rip - module.base
        index = source.functions.covering(rva)
        if index is not None:
            entry = (
                source.functions.begins[index],
                source.functions.ends[index],
                source.functions.unwind[index],
            )
            step = x64_unwind.unwind_function(
                registers, module.base, entry, source.read, code.read_qword, source.parsed
            )
        elif source.directory is runtime_functions.DirectoryState.COMPLETE:
            step = x64_unwind.unwind_leaf(registers, code.read_qword)
        else:
            step = x64_unwind.Step(None, problem=x64_unwind.Problem.UNWIND_DATA_UNREADABLE)
        if step.registers is not None:
            return step.registers, How.MACHINE_FRAME if step.machine_frame else How.UNWIND
        problem = step.problem
        if problem is x64_unwind.Problem.STACK_UNREADABLE:
            row.notes.append(FrameNote(Note.STACK_UNREADABLE, step.address))
            return None
        row.notes.append(FrameNote(_PROBLEM_NOTES[problem]))
        found = self.scan(registers.rsp, row)
        return (found, How.SCAN) if found is not None else None

    def scan(self, rsp: int, row: _Row) -> x64_unwind.Registers | None:
        """The first call-site return address at or above ``rsp`` (bounded)."""
        code = self.code
        for slot in range(rsp, rsp + 8 * SCAN_SLOTS, 8):
            if self.limit is not None and slot + 8 > self.limit:
                break
            value = code.read_qword(slot)
            if value is None or symbolizer.find_module(code.modules, value) is None:
                continue
            before = code.read_code(value - call_site.LOOKBEHIND, call_site.LOOKBEHIND)
            if before is not None and call_site.follows_call(before):
                return x64_unwind.Registers(value, slot + 8)
        row.notes.append(FrameNote(Note.NO_RETURN_ADDRESS))
        return None


_PROBLEM_NOTES = {
    x64_unwind.Problem.UNWIND_DATA_UNREADABLE: Note.UNWIND_DATA_UNREADABLE,
    x64_unwind.Problem.UNWIND_DATA_INVALID: Note.UNWIND_DATA_INVALID,
    x64_unwind.Problem.FRAME_REGISTER_UNKNOWN: Note.FRAME_REGISTER_UNKNOWN,
}


def walk_stack(
    code: ProcessCode,
    start: x64_unwind.Registers,
    levels: Sequence[LevelEntry],
    stack_base: int | None = None,
) -> tuple[StackFrame, ...]:
    """The frames from the trap frame ``start`` (level len(levels)) to the thread's first
    frame; ``levels`` are the kernel's levels, outermost (1) first."""
    walk = _Walk(code, stack_base)
    by_number = {entry.number: entry for entry in levels}
    level = len(levels)
    registers: x64_unwind.Registers | None = start
    row = walk.emit(level, start.rip, start.rsp, How.TRAP_FRAME)
    while True:
        registers = _walk_level(walk, registers, row, level, by_number.get(level))
        if registers is not None:
            # Crossed the level's machine frame: the walk goes on in the level below.
            level -= 1
            row = walk.emit(level, registers.rip, registers.rsp, How.MACHINE_FRAME)
            entry = by_number[level + 1]
            if entry.caller_rip is not None and registers.rip != entry.caller_rip:
                row.notes.append(FrameNote(Note.MACHINE_RIP_DIFFERS, entry.caller_rip))
            continue
        # The level ended without crossing: resynchronise on the kernel's frame.
        while level >= 1 and not walk.full():
            entry = by_number[level]
            level -= 1
            row = walk.emit(level, entry.rip, entry.rsp, How.KERNEL_CALLBACK_FRAME)
            if entry.rsp is not None and entry.rip is not None:
                registers = x64_unwind.Registers.at(entry.rip, entry.rsp, entry.caller_rbp)
                break
            row.notes.append(FrameNote(Note.USER_STACK_UNREADABLE))
        else:
            break
    return tuple(
        StackFrame(
            index,
            r.level,
            r.rip,
            code.symbolize(r.rip) if r.rip is not None else None,
            r.rsp,
            r.how,
            tuple(r.notes),
        )
        for index, r in enumerate(walk.rows)
    )


def _walk_level(
    walk: _Walk,
    registers: x64_unwind.Registers,
    row: _Row,
    level: int,
    entry: LevelEntry | None,
) -> x64_unwind.Registers | None:
    """Unwinds within ``level`` from ``registers`` (already emitted as ``row``); returns the
    registers read from the level's machine frame when the walk crossed it, else None (the
    level ended; notes say why)."""
    code = walk.code
    frame = entry.frame if entry is not None else None
    walk.limit = frame if level >= 1 else walk.stack_base
    while True:
        if walk.full():
            row.notes.append(FrameNote(Note.FRAME_LIMIT))
            return None
        if level >= 1 and entry is not None and code.in_dispatcher(registers.rip):
            if registers.rsp != frame or frame is None:
                row.notes.append(FrameNote(Note.NOT_KERNEL_FRAME, frame))
                return None
            rip = code.read_qword(frame + MACHINE_FRAME_RIP)
            rsp = code.read_qword(frame + MACHINE_FRAME_RSP)
            if rip is None or rsp is None:
                address = frame + (MACHINE_FRAME_RIP if rip is None else MACHINE_FRAME_RSP)
                row.notes.append(FrameNote(Note.STACK_UNREADABLE, address))
                return None
            return x64_unwind.Registers.at(rip, rsp, entry.caller_rbp)
        unwound = walk.unwind(registers, row)
        if unwound is None:
            return None
        caller, how = unwound
        if level == 0 and (
            caller.rip == 0 or (walk.stack_base is not None and caller.rsp >= walk.stack_base)
        ):
            return None
        if caller.rsp <= registers.rsp:
            row.notes.append(FrameNote(Note.RSP_NOT_INCREASING))
            return None
        if level >= 1 and frame is not None and caller.rsp > frame:
            row.notes.append(FrameNote(Note.LEFT_LEVEL))
            return None
        row = walk.emit(level, caller.rip, caller.rsp, how)
        registers = caller
