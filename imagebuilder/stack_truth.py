"""What windows.kcbstack must report for a thread (docs/output-contract.md, "windows.kcbstack").

The builder laid every frame out itself (thread_layout.py, call_chains.py) and keeps what it
wrote on each thread's user stack in a ``StackShadow``: every byte it, its conditions and its
damage wrote there, at the moment it wrote them.  The rows follow the contract's rules applied
to those facts: the unwind effect of each RUNTIME_FUNCTION is the builder's own record of the
codes it emitted (ModuleImage.unwind_ops), a call site is an address the builder knows follows
a call it placed (call_chains.call_returns), and whether a page can be read is asked of the
builder's own page tables.  Nothing here parses the image the builder wrote.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from imagebuilder.expectation import (
    NO_USER_TRAP_FRAME,
    NOT_RESIDENT,
    ImageFacts,
    ThreadExpectation,
    usable_bounds,
)
from imagebuilder.memory import PAGE
from imagebuilder.process_symbols import ProcessSymbols

RBP = 5
MAX_FRAMES = 512
SCAN_QWORDS = 0x200
MF_RIP, MF_RSP = 0x30, 0x48  # UCALLOUT_FRAME.MachineFrame.Rip/Rsp
WOW64_MAX_FRAMES = 256


class StackShadow:
    """An AddressSpace that remembers what was written in [low, high) (a user stack)."""

    def __init__(self, space: Any, low: int, high: int) -> None:
        self._space, self.low, self.high = space, low, high
        self._pages: dict[int, bytearray] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._space, name)

    def write(self, address: int, data: bytes) -> None:
        self._space.write(address, data)
        start, end = max(address, self.low), min(address + len(data), self.high)
        while start < end:
            page_start = start & ~(PAGE - 1)
            stop = min(end, page_start + PAGE)
            page = self._pages.setdefault(page_start, bytearray(PAGE))
            page[start - page_start : stop - page_start] = data[start - address : stop - address]
            start = stop

    def written(self, address: int, size: int) -> bytes:
        """What was written at ``address`` (zero where nothing was: a fresh stack page)."""
        out = bytearray()
        at, end = address, address + size
        while at < end:
            page_start = at & ~(PAGE - 1)
            stop = min(end, page_start + PAGE)
            page = self._pages.get(page_start)
            out += page[at - page_start : stop - page_start] if page else bytes(stop - at)
            at = stop
        return bytes(out)


@dataclass
class ProcessUnwind:
    """The process's view of unwind data: which modules' .pdata it cannot read, which
    UNWIND_INFO records are corrupt in its copy, the call sites the builder placed."""

    symbols: ProcessSymbols
    call_sites: set[int]
    corrupt: set[tuple[str, int]] = field(default_factory=set)  # (module name, begin RVA)

    def module_of(self, address: int):
        for entry in self.symbols.modules:
            if entry.module.contains(address):
                return entry
        return None


@dataclass
class _Row:
    frame: int
    level: int | None
    rip: int | None
    rsp: int | None
    how: str | None
    notes: list[str] = field(default_factory=list)
    registers: dict[int, int] = field(default_factory=dict)

    def record(self, symbols: ProcessSymbols) -> dict[str, Any]:
        return {
            "frame": self.frame,
            "callback_level": self.level,
            "rip": self.rip,
            "symbol": symbols.symbolize(self.rip),
            "rsp": self.rsp,
            "how": self.how,
            "notes": "; ".join(self.notes),
        }


def single_row(note: str) -> list[dict[str, Any]]:
    return [
        {
            "frame": None,
            "callback_level": None,
            "rip": None,
            "symbol": None,
            "rsp": None,
            "how": None,
            "notes": note,
        }
    ]


class _Fail(Exception):
    def __init__(self, note: str, scan: bool) -> None:
        super().__init__(note)
        self.note, self.scan = note, scan


class _Walk:
    def __init__(
        self,
        exp: ThreadExpectation,
        shadow: StackShadow,
        trap_rbps: tuple[int, ...],
        image: ImageFacts,
        unwind: ProcessUnwind,
    ) -> None:
        self.exp, self.shadow, self.rbps = exp, shadow, trap_rbps
        self.image, self.unwind = image, unwind
        self.rows: list[_Row] = []
        # The TEB's StackBase bounds level 0 only where the bounds can be true (as the
        # contract's `invalid: TEB stack bounds` judges them).
        bounds = usable_bounds(exp) if exp.teb_readable() else None
        self.stack_base = bounds[1] if bounds is not None else None

    def qword(self, address: int) -> int:
        if not self.exp.readable(address, 8):
            raise _Fail(f"unreadable: stack {address:#x}", False)
        assert self.shadow.low <= address < self.shadow.high, (
            f"thread {self.exp.tid}: the walk reads {address:#x}, outside the stack it knows"
        )
        return struct.unpack("<Q", self.shadow.written(address, 8))[0]

    def emit(self, rip: int | None, rsp: int | None, how: str, level: int | None, regs) -> _Row:
        row = _Row(len(self.rows), level, rip, rsp, how, [], dict(regs))
        self.rows.append(row)
        return row

    # -- one frame ------------------------------------------------------------------------------
    def unwind_frame(self, row: _Row) -> tuple[int, int, dict[int, int], str]:
        """The next frame (Rip, Rsp, registers, How) or _Fail."""
        entry = self.unwind.module_of(row.rip)
        assert entry is not None
        module, rva = entry.module, row.rip - entry.module.base
        try:
            if entry.functions is None:
                raise _Fail("unreadable: unwind data", True)
            begin = module.functions.entry(rva)
            if begin is None:  # a leaf
                return self.qword(row.rsp), row.rsp + 8, dict(row.registers), "unwind"
            info = module.unwind_records.get(begin)
            if info is not None and not self.exp.readable(module.base + info, 4):
                raise _Fail("unreadable: unwind data", True)
            if (module.name, begin) in self.unwind.corrupt:
                raise _Fail("invalid: unwind data", True)
            return self.apply(row, module.unwind_ops[begin])
        except _Fail as fail:
            if not fail.scan:
                raise
            row.notes.append(fail.note)
            return self.scan(row)

    def apply(self, row: _Row, ops: tuple) -> tuple[int, int, dict[int, int], str]:
        regs = dict(row.registers)
        rsp = base = row.rsp
        for op in ops:
            if op[0] == "push":
                regs[op[1]] = self.qword(rsp)
                rsp += 8
            elif op[0] == "alloc":
                rsp += op[1]
            elif op[0] == "setfp":
                if op[1] not in regs:
                    raise _Fail("frame register unknown", True)
                rsp = base = regs[op[1]] - op[2]
            elif op[0] == "save":
                regs[op[1]] = self.qword(base + op[2])
            elif op[0] == "machframe":
                rsp += 8 * op[1]
                return self.qword(rsp), self.qword(rsp + 0x18), regs, "machine frame"
        return self.qword(rsp), rsp + 8, regs, "unwind"

    def scan(self, row: _Row) -> tuple[int, int, dict[int, int], str]:
        limit = self.level_limit(row.level)
        for slot in range(row.rsp, row.rsp + 8 * SCAN_QWORDS, 8):
            if limit is not None and slot + 8 > limit:
                break
            if not self.exp.readable(slot, 8):
                continue
            value = struct.unpack("<Q", self.shadow.written(slot, 8))[0]
            if value in self.unwind.call_sites and self.unwind.module_of(value) is not None:
                return value, slot + 8, {}, "scan"
        raise _Fail("no return address found", False)

    def level_limit(self, level: int | None) -> int | None:
        if level:
            return self.exp.levels[level - 1].frame
        return self.stack_base

    # -- the walk -----------------------------------------------------------------------------
    def run(self) -> list[_Row]:
        exp = self.exp
        level = len(exp.levels)
        row = self.emit(exp.rip, exp.rsp, "trap frame", level, {RBP: self.rbps[level]})
        while True:
            level = self.frames_of_level(row, level)
            if level is None:
                return self.rows
            row, level = self.resync(level)
            if row is None:
                return self.rows

    def frames_of_level(self, row: _Row, level: int) -> int | None:
        """Unwinds from ``row`` until level ``level`` ends; returns the level that needs a
        resynchronisation, or None when the walk is over."""
        while True:
            if self.unwind.module_of(row.rip) is None:
                row.notes.append("not in a module")
                return level or None
            if level and self.image.in_dispatcher(row.rip):
                frame = exp_frame = self.exp.levels[level - 1].frame
                if row.rsp != frame:
                    row.notes.append(f"not the kernel's UCALLOUT_FRAME {exp_frame:#x}")
                    return level
                try:
                    rip, rsp = self.qword(frame + MF_RIP), self.qword(frame + MF_RSP)
                except _Fail as fail:
                    row.notes.append(fail.note)
                    return level
                level -= 1
                row = self.emit(rip, rsp, "machine frame", level, {RBP: self.rbps[level]})
                trap_rip = self.exp.levels[level].trap_rip
                if rip != trap_rip:
                    row.notes.append(f"machine frame Rip differs from the kernel's {trap_rip:#x}")
                continue
            if len(self.rows) >= MAX_FRAMES:
                row.notes.append("frame limit")
                return None
            try:
                rip, rsp, regs, how = self.unwind_frame(row)
            except _Fail as fail:
                row.notes.append(fail.note)
                return level or None
            if rsp <= row.rsp:
                row.notes.append("stack pointer did not increase")
                return level or None
            if level == 0:
                if rip == 0 or (self.stack_base is not None and rsp >= self.stack_base):
                    return None
            elif rsp > self.exp.levels[level - 1].frame:
                row.notes.append("left the callback level")
                return level
            row = self.emit(rip, rsp, how, level, regs)

    def resync(self, level: int) -> tuple[_Row | None, int]:
        """Level ``level`` ended early: the row from the kernel's view of its frame, and the
        levels below it whose frame cannot be read."""
        while level >= 1:
            lv = self.exp.levels[level - 1]
            user = self.exp.frame_at(lv.frame)
            rip = user.rip if user is not None else lv.trap_rip
            rsp = user.rsp if user is not None else None
            row = self.emit(
                rip, rsp, "callback frame (kernel)", level - 1, {RBP: self.rbps[level - 1]}
            )
            level -= 1
            if rsp is not None:
                return row, level
            row.notes.append("unreadable: user stack")
        return None, 0


def stack_rows(
    exp: ThreadExpectation,
    shadow: StackShadow,
    trap_rbps: tuple[int, ...],
    image: ImageFacts,
    unwind: ProcessUnwind,
    wow64: Callable[[], list[dict[str, Any]]] | None = None,
) -> list[dict[str, Any]]:
    """The thread's windows.kcbstack rows (docs/output-contract.md)."""
    if not exp.resident:
        return single_row(NOT_RESIDENT)
    if not exp.user_mode:
        return single_row(NO_USER_TRAP_FRAME)
    rows = [r.record(unwind.symbols) for r in _Walk(exp, shadow, trap_rbps, image, unwind).run()]
    if wow64 is not None:
        for row in wow64():
            if set(row) == {"notes"}:  # a note for the last row (the context unreadable)
                last = rows[-1]
                last["notes"] = "; ".join(n for n in (last["notes"], row["notes"]) if n)
                continue
            rows.append({**row, "frame": len(rows)})
    return rows
