"""One step of x64 stack unwinding from a function's UNWIND_INFO, as RtlVirtualUnwind does it.

Every x64 function that allocates stack, saves a non-volatile register or calls out has a
RUNTIME_FUNCTION in its image's exception directory naming an UNWIND_INFO: version and flags,
the prologue's size, the frame register, and the prologue's operations as unwind codes in
reverse order (Microsoft, "x64 exception handling").  Undoing those codes from a frame's Rsp
restores the caller's Rsp and the saved non-volatile registers; the return address then sits at
Rsp.  ``UWOP_PUSH_MACHFRAME`` is the exception: the frame below was pushed by the processor (or,
for ``KiUserCallbackDispatcher``, by the kernel's KeUserModeCallback), so Rip and Rsp are
*loaded* from the machine frame instead of popped: this is how a stack crosses from a callback
handler back into the system call it interrupted (callback-machinery.md).

Everything here is pure: the image's bytes and the stack's bytes come in through readers, so
the rules can be tested against hand-written unwind data.  Epilogues are not detected (a frame
stopped inside an epilogue is unwound as if its body were running); docs/output-contract.md,
"windows.kcbstack", states every rule.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from volatility3.plugins.windows.kcbwait_analysis import runtime_functions

# UNWIND_INFO flags (high five bits of the first byte).
UNW_FLAG_CHAININFO = runtime_functions.UNW_FLAG_CHAININFO
# Unwind operation codes (UNWIND_CODE.UnwindOp).
UWOP_PUSH_NONVOL = 0
UWOP_ALLOC_LARGE = 1
UWOP_ALLOC_SMALL = 2
UWOP_SET_FPREG = 3
UWOP_SAVE_NONVOL = 4
UWOP_SAVE_NONVOL_FAR = 5
UWOP_EPILOG = 6  # version 2 only: describes an epilogue, nothing to undo
UWOP_SAVE_XMM128 = 8
UWOP_SAVE_XMM128_FAR = 9
UWOP_PUSH_MACHFRAME = 10
# Slots (16-bit UNWIND_CODEs) each operation occupies; ALLOC_LARGE depends on its info (1 + 1
# or 1 + 2).  Code 6 takes two slots as in Windows' own slot table; code 7 is unused.
_SLOTS = {
    UWOP_PUSH_NONVOL: 1,
    UWOP_ALLOC_SMALL: 1,
    UWOP_SET_FPREG: 1,
    UWOP_SAVE_NONVOL: 2,
    UWOP_SAVE_NONVOL_FAR: 3,
    UWOP_EPILOG: 2,
    UWOP_SAVE_XMM128: 2,
    UWOP_SAVE_XMM128_FAR: 3,
    UWOP_PUSH_MACHFRAME: 1,
}
RSP = 4  # integer register numbers: RAX 0, RCX 1, RDX 2, RBX 3, RSP 4, RBP 5, ... R15 15
RBP = 5
REGISTER_COUNT = 16
MACHINE_FRAME_RIP, MACHINE_FRAME_RSP = 0x0, 0x18  # MACHINE_FRAME: Rip, SegCs, EFlags, Rsp
MACHINE_FRAME_ERROR_CODE = 8  # PUSH_MACHFRAME info 1: an error code below the frame
MAX_CHAIN = runtime_functions.MAX_CHAIN

ImageReader = Callable[[int, int], Optional[bytes]]
"""(rva, length) -> the image's bytes, or None when unreadable."""
StackReader = Callable[[int], Optional[int]]
"""address -> the qword there, or None when unreadable."""

_HEADER = struct.Struct("<BBBB")
_SLOT = struct.Struct("<H")


class Problem(enum.Enum):
    """Why a frame could not be unwound by its unwind data."""

    UNWIND_DATA_UNREADABLE = enum.auto()
    UNWIND_DATA_INVALID = enum.auto()
    FRAME_REGISTER_UNKNOWN = enum.auto()
    STACK_UNREADABLE = enum.auto()


@dataclass(frozen=True)
class Code:
    """One decoded unwind operation; ``operand`` is its size or offset in bytes."""

    offset: int  # UNWIND_CODE.CodeOffset: the prologue offset after the operation
    op: int
    info: int
    operand: int = 0


@dataclass(frozen=True)
class UnwindInfo:
    """A decoded UNWIND_INFO; ``parent`` is the chained RUNTIME_FUNCTION, if any."""

    version: int
    flags: int
    prolog_size: int
    frame_register: int
    frame_offset: int
    codes: tuple[Code, ...]
    parent: tuple[int, int, int] | None = None


def _operand(op: int, info: int, slots: Sequence[int]) -> int:
    """The byte size or offset encoded in an operation's extra slots."""
    if op == UWOP_ALLOC_SMALL:
        return info * 8 + 8
    if op == UWOP_ALLOC_LARGE:
        return slots[0] * 8 if info == 0 else slots[0] | slots[1] << 16
    if op == UWOP_SAVE_NONVOL:
        return slots[0] * 8
    if op == UWOP_SAVE_XMM128:
        return slots[0] * 16
    if op in (UWOP_SAVE_NONVOL_FAR, UWOP_SAVE_XMM128_FAR):
        return slots[0] | slots[1] << 16
    return 0


def decode_codes(raw: bytes, version: int) -> tuple[Code, ...] | None:
    """The unwind codes in ``raw`` (CountOfCodes slots), or None when they are invalid."""
    slots = [s for (s,) in _SLOT.iter_unpack(raw)]
    codes = []
    index = 0
    while index < len(slots):
        offset, op, info = slots[index] & 0xFF, (slots[index] >> 8) & 0xF, slots[index] >> 12
        if op == UWOP_ALLOC_LARGE:
            if info > 1:
                return None
            size = 2 + info
        elif op in _SLOTS and not (op == UWOP_EPILOG and version < 2):
            size = _SLOTS[op]
        else:
            return None
        if index + size > len(slots):
            return None
        if op == UWOP_PUSH_MACHFRAME and (info > 1 or index + size != len(slots)):
            return None
        codes.append(Code(offset, op, info, _operand(op, info, slots[index + 1 : index + size])))
        index += size
    return tuple(codes)


def parse_unwind_info(read: ImageReader, rva: int) -> UnwindInfo | Problem:
    """Decodes the UNWIND_INFO at ``rva``: the header, CountOfCodes slots and, with
    UNW_FLAG_CHAININFO, the parent RUNTIME_FUNCTION after the (even-padded) codes."""
    header = read(rva, _HEADER.size)
    if header is None:
        return Problem.UNWIND_DATA_UNREADABLE
    first, prolog_size, count, frame = _HEADER.unpack(header)
    version, flags = first & 0x7, first >> 3
    if version not in (1, 2):
        return Problem.UNWIND_DATA_INVALID
    raw = read(rva + _HEADER.size, 2 * count) if count else b""
    if raw is None:
        return Problem.UNWIND_DATA_UNREADABLE
    codes = decode_codes(raw, version)
    frame_register, frame_offset = frame & 0xF, frame >> 4
    if codes is None or (frame_register == 0 and any(c.op == UWOP_SET_FPREG for c in codes)):
        return Problem.UNWIND_DATA_INVALID
    parent = None
    if flags & UNW_FLAG_CHAININFO:
        entry = read(rva + _HEADER.size + 2 * ((count + 1) & ~1), 12)
        if entry is None:
            return Problem.UNWIND_DATA_UNREADABLE
        parent = struct.unpack("<III", entry)
        if any(c.op == UWOP_PUSH_MACHFRAME for c in codes):
            return Problem.UNWIND_DATA_INVALID
    return UnwindInfo(version, flags, prolog_size, frame_register, frame_offset, codes, parent)


@dataclass(frozen=True)
class Registers:
    """A frame's Rip and Rsp and what is known of the other integer registers (None =
    unknown), indexed by register number."""

    rip: int
    rsp: int
    known: tuple[int | None, ...] = (None,) * REGISTER_COUNT

    @classmethod
    def at(cls, rip: int, rsp: int, rbp: int | None = None) -> Registers:
        """A frame started from a trap frame: Rip, Rsp and the saved Rbp are known."""
        known: list[int | None] = [None] * REGISTER_COUNT
        known[RBP] = rbp
        return cls(rip, rsp, tuple(known))


@dataclass(frozen=True)
class Step:
    """The caller's registers, or why they could not be found (``address``: the stack qword
    that could not be read)."""

    registers: Registers | None
    machine_frame: bool = False
    problem: Problem | None = None
    address: int | None = None


class _StackUnreadable(Exception):
    def __init__(self, address: int) -> None:
        super().__init__(address)
        self.address = address


def _resolve_entry(
    entry: tuple[int, int, int], read: ImageReader
) -> tuple[int, int, int] | Problem:
    """An indirect RUNTIME_FUNCTION (UnwindData with bit 0 set) names the entry to use."""
    if not entry[2] & 1:
        return entry
    raw = read(entry[2] & ~1, 12)
    if raw is None:
        return Problem.UNWIND_DATA_UNREADABLE
    target = struct.unpack("<III", raw)
    return Problem.UNWIND_DATA_INVALID if target[2] & 1 else target


def unwind_infos(
    entry: tuple[int, int, int], read: ImageReader, parsed: dict | None = None
) -> tuple[tuple[tuple[int, int, int], UnwindInfo], ...] | Problem:
    """The UNWIND_INFO of ``entry`` and of each entry it chains to (at most MAX_CHAIN
    links; a loop is invalid).  ``parsed`` caches decoded UNWIND_INFOs by RVA."""
    chain = []
    seen = set()
    current: tuple[int, int, int] | None = entry
    while current is not None:
        resolved = _resolve_entry(current, read)
        if isinstance(resolved, Problem):
            return resolved
        if resolved[2] in seen or len(chain) > MAX_CHAIN:
            return Problem.UNWIND_DATA_INVALID
        seen.add(resolved[2])
        info = parsed.get(resolved[2]) if parsed is not None else None
        if info is None:
            info = parse_unwind_info(read, resolved[2])
            if parsed is not None:
                parsed[resolved[2]] = info
        if isinstance(info, Problem):
            return info
        chain.append((resolved, info))
        current = info.parent
    return tuple(chain)


def unwind_leaf(registers: Registers, read_stack: StackReader) -> Step:
    """A function without unwind data allocates nothing: its return address is at Rsp."""
    value = read_stack(registers.rsp)
    if value is None:
        return Step(None, problem=Problem.STACK_UNREADABLE, address=registers.rsp)
    return Step(Registers(value, registers.rsp + 8, registers.known))


def unwind_function(
    registers: Registers,
    image_base: int,
    entry: tuple[int, int, int],
    read_image: ImageReader,
    read_stack: StackReader,
    parsed: dict | None = None,
) -> Step:
    """Unwinds one frame of the function whose RUNTIME_FUNCTION ``entry`` (RVAs) holds
    ``registers.rip``.

    The establisher frame (the base of SAVE_NONVOL offsets) is computed once from the first
    UNWIND_INFO, as RtlVirtualUnwind does: Rsp, or the frame register minus 16 x FrameOffset
    once SET_FPREG has executed.  Codes past the current prologue offset are skipped in the
    first UNWIND_INFO only; chained parents are applied whole.
    """
    chain = unwind_infos(entry, read_image, parsed)
    if isinstance(chain, Problem):
        return Step(None, problem=chain)
    first_entry, first = chain[0]
    prolog_offset = registers.rip - image_base - first_entry[0]
    in_prolog = 0 <= prolog_offset < first.prolog_size
    known = list(registers.known)
    rsp = registers.rsp

    def executed(code: Code, is_first: bool) -> bool:
        return not (is_first and in_prolog and code.offset > prolog_offset)

    base = rsp
    for index, (_entry, info) in enumerate(chain):
        if info.frame_register and any(
            c.op == UWOP_SET_FPREG and executed(c, index == 0) for c in info.codes
        ):
            value = known[info.frame_register]
            if value is None:
                return Step(None, problem=Problem.FRAME_REGISTER_UNKNOWN)
            base = value - 16 * info.frame_offset
            break

    def read(address: int) -> int:
        value = read_stack(address)
        if value is None:
            raise _StackUnreadable(address)
        return value

    rip = None
    try:
        for index, (_entry, info) in enumerate(chain):
            for code in info.codes:
                if not executed(code, index == 0):
                    continue
                if code.op == UWOP_PUSH_NONVOL:
                    known[code.info] = read(rsp)
                    rsp += 8
                elif code.op in (UWOP_ALLOC_SMALL, UWOP_ALLOC_LARGE):
                    rsp += code.operand
                elif code.op == UWOP_SET_FPREG:
                    value = known[info.frame_register]
                    if value is None:
                        return Step(None, problem=Problem.FRAME_REGISTER_UNKNOWN)
                    rsp = value - 16 * info.frame_offset
                elif code.op in (UWOP_SAVE_NONVOL, UWOP_SAVE_NONVOL_FAR):
                    known[code.info] = read(base + code.operand)
                elif code.op == UWOP_PUSH_MACHFRAME:
                    if code.info:
                        rsp += MACHINE_FRAME_ERROR_CODE
                    rip = read(rsp + MACHINE_FRAME_RIP)
                    rsp = read(rsp + MACHINE_FRAME_RSP)
                # SAVE_XMM128(_FAR) and version 2's EPILOG restore nothing we track.
        if rip is not None:
            known[RSP] = None
            return Step(Registers(rip, rsp, tuple(known)), machine_frame=True)
        return_address = read(rsp)
    except _StackUnreadable as unreadable:
        return Step(None, problem=Problem.STACK_UNREADABLE, address=unreadable.address)
    known[RSP] = None
    return Step(Registers(return_address, rsp + 8, tuple(known)))
