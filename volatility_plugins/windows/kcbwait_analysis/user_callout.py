"""UCALLOUT_FRAMEs on a thread's user stack: decoding one, and the fallback scan for them.

For every active kernel-to-user callback, KeUserModeCallback builds on the user stack an x64
UCALLOUT_FRAME (0x58 bytes) at ``(Rsp - (align16(InputLength) + 0x58)) & ~0xF``, where Rsp is the
interrupted system call's user stack pointer, copies the input right after it and stores that
Rsp/Rip in its MACHINE_FRAME.  ntdll!KiUserCallbackDispatcher then calls the handler, leaving a
return address into itself in the qword just below the frame (callback-machinery.md, steps 2-4;
WRK ke/amd64/callback.c; ReactOS ndk/amd64/ketypes.h).

Layout (offsets from the frame)::

    +0x00 P1Home..P4Home   +0x20 Buffer   +0x28 ULONG Length   +0x2C ULONG ApiNumber
    +0x30 MACHINE_FRAME { Rip +0x30, SegCs +0x38, EFlags +0x40, Rsp +0x48, SegSs +0x50 }

The kernel names every live frame (``callback_levels``); the scan here is only the fallback for
threads whose kernel stack cannot be read: from the start upward, the first frame with a
dispatcher return address below it is the innermost level, and each frame's MachineFrame.Rsp
(the Rsp of the system call that level interrupted, made from the previous level's handler)
is where the search for the next outer level starts.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, Optional

from volatility3.plugins.windows.kcbwait_analysis import findings, memory

UCALLOUT_FRAME_SIZE = 0x58
OFFSET_BUFFER = 0x20
OFFSET_LENGTH = 0x28
OFFSET_API_NUMBER = 0x2C
OFFSET_MACHINE_FRAME = 0x30
OFFSET_MF_RIP = 0x30
OFFSET_MF_SEGCS = 0x38
OFFSET_MF_EFLAGS = 0x40
OFFSET_MF_RSP = 0x48
OFFSET_MF_SEGSS = 0x50
# KeUserModeCallback aligns the frame down to 16 bytes.
FRAME_ALIGNMENT = 0x10
# The return address into KiUserCallbackDispatcher sits in the qword just below the frame.
RETURN_SLOT_OFFSET = -8

# Pages one thread's fallback scan may fetch: 2 MiB, twice the default stack reserve.
MAX_SCAN_PAGES = 0x200
# KeUserModeCallback fails beyond 31 nested callbacks (STATUS_STACK_OVERFLOW).
MAX_LEVELS = 32
# x64 user space ends below 0x8000'00000000 (128 TiB): a stack bound above it is corrupt.
USER_SPACE_END = 0x800000000000
# Largest user stack a TEB may describe: Windows reserves 1 MiB by default and a linker option
# can ask for more, but a 1 GiB span is corrupt, not a stack.
MAX_STACK_SPAN = 0x40000000

_QWORD = struct.Struct("<Q")


@dataclass(frozen=True)
class StackBounds:
    """The user stack [low, high): the TEB's NtTib.StackLimit .. NtTib.StackBase."""

    low: int
    high: int

    def contains_range(self, start: int, end: int) -> bool:
        return self.low <= start and end <= self.high


@dataclass(frozen=True)
class UcalloutFrame:
    """One decoded UCALLOUT_FRAME and the return address found just below it (None when that
    qword could not be read)."""

    address: int
    return_address: int | None
    buffer: int
    length: int
    api_number: int
    rip: int
    seg_cs: int
    eflags: int
    rsp: int
    seg_ss: int

    @classmethod
    def decode(cls, address: int, return_address: int | None, data: bytes) -> UcalloutFrame:
        """Decodes the 0x58 bytes of a frame located at ``address``."""
        if len(data) < UCALLOUT_FRAME_SIZE:
            raise ValueError("a UCALLOUT_FRAME is 0x58 bytes")
        buffer, length, api_number = struct.unpack_from("<QII", data, OFFSET_BUFFER)
        rip, seg_cs, eflags, rsp, seg_ss = struct.unpack_from("<QQQQQ", data, OFFSET_MF_RIP)
        return cls(
            address=address,
            return_address=return_address,
            buffer=buffer,
            length=length,
            api_number=api_number,
            rip=rip,
            seg_cs=seg_cs & 0xFFFF,
            eflags=eflags & 0xFFFFFFFF,
            rsp=rsp,
            seg_ss=seg_ss & 0xFFFF,
        )


def is_ucallout_frame(frame: UcalloutFrame, stack_top: int | None) -> bool:
    """The structure every genuine frame has, whatever its field values mean.

    * 16-byte aligned (``& ~0xF`` in KeUserModeCallback);
    * the input copied after the frame fits below the interrupted Rsp:
      ``frame + 0x58 + Length <= MachineFrame.Rsp``, and that Rsp is not above the stack top
      (the TEB's StackBase, when usable).

    MachineFrame.Rip, SegCs, EFlags and SegSs are not checked: KeUserModeCallback only stores
    Rip and Rsp, so the others hold whatever the stack held (WRK callback.c), and a wrong Rip is
    exactly what KernelSide must be able to report rather than hide.
    """
    if frame.address % FRAME_ALIGNMENT:
        return False
    if frame.address + UCALLOUT_FRAME_SIZE + frame.length > frame.rsp:
        return False
    return stack_top is None or frame.rsp <= stack_top


def read_frame(reader: memory.PagedReader, address: int) -> UcalloutFrame | None:
    """The frame at ``address`` and the qword below it, or None if the frame is unreadable."""
    raw = reader.read(address, UCALLOUT_FRAME_SIZE)
    if raw is None:
        return None
    slot = reader.read(address + RETURN_SLOT_OFFSET, 8)
    return_address = _QWORD.unpack(slot)[0] if slot is not None else None
    return UcalloutFrame.decode(address, return_address, raw)


ReturnCheck = Callable[[int], Optional[bool]]
"""True when a qword is a return address into KiUserCallbackDispatcher (None: unknown)."""


def _scan_for_frame(
    reader: memory.PagedReader, start: int, bounds: StackBounds, is_return: ReturnCheck
) -> UcalloutFrame | None:
    """The lowest candidate whose return slot lies in [start, bounds.high): unreadable pages
    are skipped (``reader`` remembers them); a spent page budget ends the search."""
    cursor = (start + 7) & ~7
    while cursor < bounds.high:
        page_base = cursor & ~(memory.PAGE_SIZE - 1)
        page_end = min(bounds.high, page_base + memory.PAGE_SIZE)
        data = reader.page(cursor)
        if data is None:
            if reader.exhausted:
                return None
            cursor = page_end
            continue
        for slot in range(cursor, page_end - 7, 8):
            (value,) = _QWORD.unpack_from(data, slot - page_base)
            if not is_return(value):
                continue
            address = slot - RETURN_SLOT_OFFSET
            if not bounds.contains_range(slot, address + UCALLOUT_FRAME_SIZE):
                continue
            raw = reader.read(address, UCALLOUT_FRAME_SIZE)
            if raw is None:
                continue
            frame = UcalloutFrame.decode(address, value, raw)
            if is_ucallout_frame(frame, bounds.high):
                return frame
        cursor = page_end
    return None


@dataclass(frozen=True)
class ScanResult:
    """Frames the fallback scan found, outermost first; ``unreadable`` when a page inside the
    TEB's bounds could not be read."""

    frames: tuple[UcalloutFrame, ...]
    unreadable: bool


def scan_callout_frames(
    reader: memory.PagedReader, start: int, bounds: StackBounds, is_return: ReturnCheck
) -> ScanResult:
    """The chain of UCALLOUT_FRAMEs from ``start`` upward (docs/output-contract.md, "Fallback").

    The innermost frame is the lowest candidate at or above ``start``; each frame's
    MachineFrame.Rsp is where the search for the next outer one starts.  At most MAX_LEVELS
    frames, at most the reader's page budget.
    """
    found: list[UcalloutFrame] = []
    cursor = max(start, bounds.low)
    for _ in range(MAX_LEVELS):
        if cursor >= bounds.high:
            break
        frame = _scan_for_frame(reader, cursor, bounds, is_return)
        if frame is None:
            break
        found.append(frame)
        # is_ucallout_frame guarantees rsp > frame, so every step moves strictly upward.
        cursor = frame.rsp
    found.reverse()
    return ScanResult(tuple(found), reader.unreadable)


def teb_limits_valid(teb_limits: tuple[int, int]) -> bool:
    """StackLimit < StackBase, both in user space, at most MAX_STACK_SPAN apart."""
    limit, base = teb_limits
    return 0 < limit < base <= USER_SPACE_END and base - limit <= MAX_STACK_SPAN


def usable_bounds(teb_limits: tuple[int, int] | None) -> StackBounds | None:
    """The TEB's [StackLimit, StackBase) when they were read and can be true."""
    if teb_limits is None or not teb_limits_valid(teb_limits):
        return None
    return StackBounds(*teb_limits)


def teb_problems(
    teb_limits: tuple[int, int] | None, rsp: int | None
) -> tuple[findings.Unreadable | None, findings.Invalid | None]:
    """What is wrong with the TEB's stack limits for a thread whose user Rsp is ``rsp``."""
    if teb_limits is None:
        return findings.Unreadable.TEB, None
    bounds = usable_bounds(teb_limits)
    if bounds is None:
        return None, findings.Invalid.STACK_BOUNDS
    if rsp is not None and not bounds.low <= rsp < bounds.high:
        return None, findings.Invalid.RSP_OUTSIDE_STACK
    return None, None
