"""x64 UNWIND_INFO records (Microsoft's "x64 exception handling" documentation).

UNWIND_INFO: UBYTE Version:3, Flags:5; UBYTE SizeOfProlog; UBYTE CountOfCodes;
UBYTE FrameRegister:4, FrameOffset:4; UNWIND_CODE[CountOfCodes rounded up to even];
then, with UNW_FLAG_EHANDLER or UNW_FLAG_UHANDLER, the handler's RVA and its data.
An UNWIND_CODE is UBYTE CodeOffset; UBYTE UnwindOp:4, OpInfo:4.  The array lists the codes in
the order an unwinder applies them: the reverse of the prologue's order.
"""

from __future__ import annotations

from imagebuilder.x64_code import Code, Rva32

UNW_FLAG_EHANDLER = 0x1
UNW_FLAG_UHANDLER = 0x2
UNW_FLAG_CHAININFO = 0x4
UWOP_PUSH_NONVOL = 0
UWOP_ALLOC_LARGE = 1
UWOP_ALLOC_SMALL = 2
UWOP_SET_FPREG = 3
UWOP_SAVE_NONVOL = 4
UWOP_EPILOG = 6  # version 2 only; one record takes two slots (docs/output-contract.md)
UWOP_SAVE_XMM128 = 8
UWOP_PUSH_MACHFRAME = 10

UnwindCode = tuple[int, int, int]  # CodeOffset, UnwindOp, OpInfo


def alloc_small(offset: int, size: int) -> UnwindCode:
    """UWOP_ALLOC_SMALL: 8..128 bytes, OpInfo = size / 8 - 1."""
    assert 8 <= size <= 0x80 and size % 8 == 0
    return (offset, UWOP_ALLOC_SMALL, size // 8 - 1)


def push_nonvol(offset: int, register: int) -> UnwindCode:
    """UWOP_PUSH_NONVOL: OpInfo is the register number (RBX = 3)."""
    return (offset, UWOP_PUSH_NONVOL, register)


def push_machframe(offset: int, error_code: bool = False) -> UnwindCode:
    return (offset, UWOP_PUSH_MACHFRAME, int(error_code))


# Codes that take more than one slot are given as (offset, op, info, extra slot values...).
def alloc_large(offset: int, size: int) -> tuple:
    """UWOP_ALLOC_LARGE: OpInfo 0 with size / 8 in the next slot (up to 512K - 8), OpInfo 1
    with the size as a ULONG in the next two slots (512K and above)."""
    assert size % 8 == 0 and size > 0x80
    if size < 0x80000:
        return (offset, UWOP_ALLOC_LARGE, 0, size // 8)
    return (offset, UWOP_ALLOC_LARGE, 1, size & 0xFFFF, size >> 16)


def set_fpreg(offset: int) -> UnwindCode:
    """UWOP_SET_FPREG: the frame register and offset are the UNWIND_INFO's own fields."""
    return (offset, UWOP_SET_FPREG, 0)


def save_nonvol(offset: int, register: int, displacement: int) -> tuple:
    """UWOP_SAVE_NONVOL: the register at [frame base + slot * 8]."""
    assert displacement % 8 == 0 and displacement < 0x80000
    return (offset, UWOP_SAVE_NONVOL, register, displacement // 8)


def save_xmm128(offset: int, register: int, displacement: int) -> tuple:
    """UWOP_SAVE_XMM128: xmm register at [frame base + slot * 16]."""
    assert displacement % 16 == 0
    return (offset, UWOP_SAVE_XMM128, register, displacement // 16)


def epilog(size: int, distance: int) -> tuple:
    """A version 2 UWOP_EPILOG record: two slots (size and flags; the epilog's distance from
    the function's end)."""
    return (size, UWOP_EPILOG, 1, (distance & 0xFF) | (UWOP_EPILOG | (distance >> 8) << 4) << 8)


def code_slots(codes: list) -> list[int]:
    """The UNWIND_CODE slots (16-bit values) of ``codes``."""
    slots = []
    for code in codes:
        offset, op, info, *extra = code
        slots.append(offset | (op | info << 4) << 8)
        slots.extend(extra)
    return slots


def unwind_info(
    prologue: int,
    codes: list,
    flags: int = 0,
    handler: str | None = None,
    *,
    version: int = 1,
    frame_register: int = 0,
    frame_offset: int = 0,
) -> Code:
    """One UNWIND_INFO; ``handler`` labels the exception handler routine."""
    assert (handler is not None) == bool(flags & (UNW_FLAG_EHANDLER | UNW_FLAG_UHANDLER))
    slots = code_slots(codes)
    record = bytearray(
        [version | (flags << 3), prologue, len(slots), frame_register | frame_offset << 4]
    )
    for slot in slots:
        record += slot.to_bytes(2, "little")
    if len(slots) % 2:
        record += b"\0\0"  # the array keeps an even number of slots
    if handler is None:
        return (bytes(record),)
    return (bytes(record), Rva32(handler), b"\0\0\0\0")  # handler RVA, empty handler data


def chained_unwind(prologue: int, codes: list, parent: tuple[str, str, str]) -> Code:
    """A secondary UNWIND_INFO with UNW_FLAG_CHAININFO: its own codes (a secondary prologue,
    or none for a separated fragment of the function), then the parent's RUNTIME_FUNCTION
    (labels of its BeginAddress, EndAddress and UnwindData), which an unwinder follows to the
    function's primary entry."""
    head = unwind_info(prologue, codes)
    flags = head[0][0] | (UNW_FLAG_CHAININFO << 3)
    begin, end, unwind = parent
    return (bytes([flags]) + head[0][1:], Rva32(begin), Rva32(end), Rva32(unwind))


def frame_unwind(frame: int) -> Code:
    """The ordinary routine's record: prologue 4 (`sub rsp,N`), one UWOP_ALLOC_SMALL."""
    return unwind_info(4, [alloc_small(4, frame)])


LEAF_STUB_UNWIND: Code = unwind_info(0, [])  # a system-call stub: no prologue, no codes


# -- what the codes do, in the builder's own terms (truth: stack_truth.py) -------------------------
# An op, in the order an unwinder applies them: ("push", reg), ("alloc", size),
# ("setfp", reg, offset), ("save", reg, displacement), ("machframe", error code).
Op = tuple


def ops_of(codes: list, frame_register: int = 0, frame_offset: int = 0) -> tuple[Op, ...]:
    """The effect of ``codes`` (as given to unwind_info) on the stack, in applying order."""
    ops: list[Op] = []
    for code in codes:
        _offset, op, info, *extra = code
        if op == UWOP_PUSH_NONVOL:
            ops.append(("push", info))
        elif op == UWOP_ALLOC_SMALL:
            ops.append(("alloc", info * 8 + 8))
        elif op == UWOP_ALLOC_LARGE:
            ops.append(("alloc", extra[0] * 8 if info == 0 else extra[0] | extra[1] << 16))
        elif op == UWOP_SET_FPREG:
            ops.append(("setfp", frame_register, 16 * frame_offset))
        elif op == UWOP_SAVE_NONVOL:
            ops.append(("save", info, extra[0] * 8))
        elif op == UWOP_PUSH_MACHFRAME:
            ops.append(("machframe", info))
        # SAVE_XMM128 and EPILOG leave the integer registers and Rsp alone.
    return tuple(ops)
