"""Finding UCALLOUT_FRAMEs on a thread's user stack.

For every active kernel-to-user callback, KeUserModeCallback builds on the user stack an x64
UCALLOUT_FRAME (0x58 bytes) at ``(Rsp - (align16(InputLength) + 0x58)) & ~0xF``, where Rsp is the
interrupted system call's user stack pointer, copies the input right after it and stores that
Rsp/Rip in its MACHINE_FRAME.  ntdll!KiUserCallbackDispatcher then calls the handler, leaving a
return address into itself in the qword just below the frame (callback-machinery.md, steps 2-4;
WRK ke/amd64/callback.c; ReactOS ndk/amd64/ketypes.h).

Layout (offsets from the frame)::

    +0x00 P1Home..P4Home   +0x20 Buffer   +0x28 ULONG Length   +0x2C ULONG ApiNumber
    +0x30 MACHINE_FRAME { Rip +0x30, SegCs +0x38, EFlags +0x40, Rsp +0x48, SegSs +0x50 }

Search: scan upward from the current trap frame's Rsp for a qword inside the dispatcher's
function whose following frame passes ``frame_is_plausible``: that is the innermost level.  Its
MachineFrame.Rsp is the Rsp of the system call the callback interrupted, made from the previous
level's handler, so the scan for the previous level starts there.  Frames get higher (older)
as levels get shallower; level 1, the outermost, has MachineFrame.Rsp = the thread's original
user Rsp.
"""

import struct
from dataclasses import dataclass

from volatility3.plugins.windows.kcbwait_analysis import memory, reason

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

# How far above its start one level's scan looks for the next return address (the stack a
# handler used before its system call, or the gap between two levels' frames).
LEVEL_WINDOW = 0x40000
# The stack extent assumed above the trap frame's Rsp when the TEB gives no usable bounds.
TOTAL_WINDOW = 0x100000
# Pages one thread's scan may fetch (a 2 MiB stack); scans are also bounded per level.
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
    """The user stack [low, high): TEB NtTib.StackLimit .. NtTib.StackBase.

    ``from_teb`` is False when the TEB was unusable and the bounds are only a window above the
    trap frame's Rsp; an unreadable page then simply marks the end of the stack.
    """

    low: int
    high: int
    from_teb: bool = True

    def contains_range(self, start: int, end: int) -> bool:
        return self.low <= start and end <= self.high


@dataclass(frozen=True)
class UcalloutFrame:
    """One decoded UCALLOUT_FRAME and the return address found just below it."""

    address: int
    return_address: int
    buffer: int
    length: int
    api_number: int
    rip: int
    seg_cs: int
    eflags: int
    rsp: int
    seg_ss: int

    @classmethod
    def decode(cls, address: int, return_address: int, data: bytes) -> "UcalloutFrame":
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


def frame_is_plausible(frame: UcalloutFrame, bounds: StackBounds) -> bool:
    """Structural checks a genuine frame always passes, whatever its field values mean.

    * the frame is 16-byte aligned (``& ~0xF`` in KeUserModeCallback);
    * the return slot and the whole frame lie inside the user stack;
    * the input copied after the frame fits below the interrupted Rsp:
      ``frame + 0x58 + Length <= MachineFrame.Rsp``, and that Rsp is inside the stack.

    MachineFrame.Rip, SegCs, EFlags and SegSs are not checked: KeUserModeCallback only stores
    Rip and Rsp, so the others hold whatever the stack held (WRK callback.c), and a wrong Rip is
    exactly what KernelSide must be able to report rather than hide.
    """
    if frame.address % FRAME_ALIGNMENT:
        return False
    frame_end = frame.address + UCALLOUT_FRAME_SIZE
    if not bounds.contains_range(frame.address + RETURN_SLOT_OFFSET, frame_end):
        return False
    return frame_end + frame.length <= frame.rsp <= bounds.high


def scan_for_frame(
    reader: memory.PagedReader,
    start: int,
    end: int,
    bounds: StackBounds,
    dispatcher_range: tuple[int, int],
) -> UcalloutFrame | None:
    """Finds the lowest plausible frame whose return slot lies in [start, end).

    Reads page by page.  Within TEB bounds an unreadable page is skipped (and flagged on
    ``reader``); without them it ends the search, as the end of the mapped stack would.
    """
    low, high = dispatcher_range
    cursor = (start + 7) & ~7
    while cursor < end:
        page_base = cursor & ~(memory.PAGE_SIZE - 1)
        page_end = min(end, page_base + memory.PAGE_SIZE)
        data = reader.page(cursor)
        if data is None:
            if not bounds.from_teb:
                return None
            cursor = page_end
            continue
        for slot in range(cursor, page_end - 7, 8):
            (value,) = _QWORD.unpack_from(data, slot - page_base)
            if not low <= value < high:
                continue
            frame_address = slot - RETURN_SLOT_OFFSET
            raw = reader.read(frame_address, UCALLOUT_FRAME_SIZE)
            if raw is None:
                continue
            frame = UcalloutFrame.decode(frame_address, value, raw)
            if frame_is_plausible(frame, bounds):
                return frame
        cursor = page_end
    return None


@dataclass(frozen=True)
class ScanResult:
    """Frames found on one user stack, outermost (level 1) first."""

    frames: tuple[UcalloutFrame, ...]
    unreadable: bool


def scan_callout_frames(
    reader: memory.PagedReader,
    start_rsp: int,
    bounds: StackBounds,
    dispatcher_range: tuple[int, int],
    level_window: int = LEVEL_WINDOW,
) -> ScanResult:
    """Finds the chain of UCALLOUT_FRAMEs above ``start_rsp`` (the current trap frame's Rsp).

    The innermost frame is the first plausible one above ``start_rsp``; each frame's
    MachineFrame.Rsp is where the scan for the next outer level starts.  Every scan stays in
    ``bounds`` and covers at most ``level_window`` bytes; at most MAX_LEVELS frames are chained.
    """
    found: list[UcalloutFrame] = []
    cursor = max(start_rsp, bounds.low)
    for _ in range(MAX_LEVELS):
        end = min(bounds.high, cursor + level_window)
        if cursor >= end:
            break
        frame = scan_for_frame(reader, cursor, end, bounds, dispatcher_range)
        if frame is None:
            break
        found.append(frame)
        # frame_is_plausible guarantees rsp > frame, so every step moves strictly upward.
        cursor = frame.rsp
    found.reverse()
    # Without the TEB's bounds an unreadable page is just the end of the stack, not a gap.
    return ScanResult(tuple(found), reader.unreadable and bounds.from_teb)


def teb_limits_valid(teb_limits: tuple[int, int]) -> bool:
    """StackLimit < StackBase, both in user space, at most MAX_STACK_SPAN apart."""
    limit, base = teb_limits
    return 0 < limit < base <= USER_SPACE_END and base - limit <= MAX_STACK_SPAN


def teb_limits_problem(start_rsp: int, teb_limits: tuple[int, int] | None) -> str | None:
    """Why the TEB's limits cannot bound the scan (an ``invalid: X`` item), or None when they
    can or were not read at all (that is ``unreadable: TEB``)."""
    if teb_limits is None:
        return None
    if not teb_limits_valid(teb_limits):
        return reason.INVALID_STACK_BOUNDS
    limit, base = teb_limits
    if not limit <= start_rsp < base:
        return reason.INVALID_RSP
    return None


def stack_bounds(start_rsp: int, teb_limits: tuple[int, int] | None) -> StackBounds:
    """Bounds for scanning: the TEB's [StackLimit, StackBase) when they are valid and contain
    ``start_rsp``, else a TOTAL_WINDOW span above ``start_rsp``."""
    if teb_limits is not None and teb_limits_problem(start_rsp, teb_limits) is None:
        limit, base = teb_limits
        return StackBounds(limit, base, True)
    return StackBounds(start_rsp, start_rsp + TOTAL_WINDOW, False)
