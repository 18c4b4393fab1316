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
UWOP_ALLOC_SMALL = 2
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


def unwind_info(
    prologue: int, codes: list[UnwindCode], flags: int = 0, handler: str | None = None
) -> Code:
    """One UNWIND_INFO (version 1); ``handler`` labels the exception handler routine."""
    assert (handler is not None) == bool(flags & (UNW_FLAG_EHANDLER | UNW_FLAG_UHANDLER))
    record = bytearray([1 | (flags << 3), prologue, len(codes), 0])
    for offset, op, info in codes:
        record += bytes([offset, op | (info << 4)])
    if len(codes) % 2:
        record += b"\0\0"  # the array keeps an even number of slots
    if handler is None:
        return (bytes(record),)
    return (bytes(record), Rva32(handler), b"\0\0\0\0")  # handler RVA, empty handler data


def chained_unwind(prologue: int, codes: list[UnwindCode], parent: tuple[str, str, str]) -> Code:
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
