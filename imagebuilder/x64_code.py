"""x64 machine code of the builder's user-mode images, as Microsoft's compiler emits it.

The routines reproduce the shapes ../shared/docs/real-binaries.md measured on Microsoft's own
ntdll.dll, user32.dll and win32u.dll.  Code is a tuple of pieces: literal bytes, or a reference
to a label (another routine, an import slot) resolved once every label has an RVA, so a
routine's size is known before anything is placed.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Rel32:
    """A signed 32-bit displacement to ``label`` from the end of this field: the operand of
    ``call rel32``/``jmp rel32`` and of RIP-relative operands with no immediate after them."""

    label: str


@dataclass(frozen=True)
class Rva32:
    """The RVA of ``label`` as a DWORD (UNWIND_INFO handler, import descriptors)."""

    label: str


@dataclass(frozen=True)
class Abs64:
    """The virtual address of ``label`` at the image's base: a pointer a loader relocates
    (an IMAGE_REL_BASED_DIR64 entry in .reloc)."""

    label: str


Piece = bytes | Rel32 | Rva32 | Abs64
Code = tuple[Piece, ...]


def piece_size(piece: Piece) -> int:
    if isinstance(piece, bytes):
        return len(piece)
    return 8 if isinstance(piece, Abs64) else 4


def code_size(code: Code) -> int:
    return sum(piece_size(p) for p in code)


def assemble(code: Code, rva: int, base: int, labels: Mapping[str, int]) -> bytes:
    """The bytes of ``code`` placed at ``rva`` in an image mapped at ``base``."""
    out = bytearray()
    for piece in code:
        if isinstance(piece, bytes):
            out += piece
        elif isinstance(piece, Rel32):
            out += struct.pack("<i", labels[piece.label] - (rva + len(out) + 4))
        elif isinstance(piece, Rva32):
            out += struct.pack("<I", labels[piece.label])
        else:
            out += struct.pack("<Q", base + labels[piece.label])
    return bytes(out)


def abs64_offsets(code: Code) -> list[int]:
    """Offsets of the relocated pointers in ``code``."""
    offsets, cursor = [], 0
    for piece in code:
        if isinstance(piece, Abs64):
            offsets.append(cursor)
        cursor += piece_size(piece)
    return offsets


# -- single instructions --------------------------------------------------------------------
INT3 = b"\xcc"
RET = b"\xc3"
NOP8 = b"\x0f\x1f\x84\x00\x00\x00\x00\x00"  # nop dword ptr [rax+rax]: MSVC's 8-byte filler


def sub_rsp(size: int) -> bytes:
    """sub rsp, imm8 (48 83 EC ib): the 4-byte prologue of real.binaries' ordinary routines."""
    assert 8 <= size < 0x80 and size % 8 == 0
    return b"\x48\x83\xec" + bytes([size])


def add_rsp(size: int) -> bytes:
    assert 8 <= size < 0x80 and size % 8 == 0
    return b"\x48\x83\xc4" + bytes([size])


def call(label: str) -> Code:
    return (b"\xe8", Rel32(label))  # call rel32


def call_indirect(slot: str) -> Code:
    return (b"\xff\x15", Rel32(slot))  # call qword ptr [rip+disp32]


def tail_jump_indirect(slot: str) -> Code:
    return (b"\x48\xff\x25", Rel32(slot))  # rex jmp qword ptr [rip+disp32] (MSVC tail call)


# -- system-call stubs ----------------------------------------------------------------------
STUB_SIZE = 0x20  # stubs follow each other every 0x20 bytes in ntdll and win32u
SYSCALL_RETURN = 0x14  # Rip of a thread stopped in the system call: after `syscall`
STUB_CODE_SIZE = 0x18  # the instructions; the rest is NOP8 filler


def syscall_stub(number: int) -> bytes:
    """The x64 system-call stub of ntdll and win32u (real-binaries.md), padded to 0x20."""
    stub = (
        b"\x4c\x8b\xd1"  # mov r10, rcx
        + b"\xb8"
        + struct.pack("<I", number)  # mov eax, N
        + b"\xf6\x04\x25\x08\x03\xfe\x7f\x01"  # test byte ptr [7FFE0308h], 1
        + b"\x75\x03"  # jne +3 (the int 2Eh path)
        + b"\x0f\x05"  # syscall
        + RET
        + b"\xcd\x2e"  # int 2Eh
        + RET
    )
    assert len(stub) == STUB_CODE_SIZE and stub[SYSCALL_RETURN - 2 : SYSCALL_RETURN] == b"\x0f\x05"
    return stub + NOP8


# -- ntdll!KiUserCallbackDispatcher and its CFG dispatch thunk --------------------------------
DISPATCHER_CALL_HANDLER = 0x1F  # call <CFG dispatch thunk>
DISPATCHER_HANDLER_RETURN = 0x24  # the handler's return address: just below the UCALLOUT_FRAME
DISPATCHER_CALL_RETURN = 0x2B  # call NtCallbackReturn
DISPATCHER_AFTER_RETURN = 0x30  # [Rsp] of a thread resting in NtCallbackReturn called from here
DISPATCHER_SIZE = 0x3B  # the RUNTIME_FUNCTION's EndAddress - BeginAddress
DISPATCHER_THUNK_DISTANCE = 0x160  # thunk start below the dispatcher (builds 17763-22000)


def dispatcher_code(thunk: str, callback_return: str, raise_status: str) -> Code:
    """KiUserCallbackDispatcher, byte for byte as in builds 14393-22000 (real-binaries.md):
    reads Buffer/Length/ApiNumber from the UCALLOUT_FRAME at [rsp+20h..2Ch], loads
    PEB->KernelCallbackTable[ApiNumber] and calls it through the CFG dispatch thunk, then hands
    the handler's status to NtCallbackReturn; RtlRaiseStatus if that ever returns."""
    code: Code = (
        b"\x48\x8b\x4c\x24\x20"  # +00 mov rcx, [rsp+20h]      Buffer
        b"\x8b\x54\x24\x28"  # +05 mov edx, [rsp+28h]          Length
        b"\x44\x8b\x44\x24\x2c"  # +09 mov r8d, [rsp+2Ch]      ApiNumber
        b"\x65\x48\x8b\x04\x25\x60\x00\x00\x00"  # +0E mov rax, gs:[60h]   PEB
        b"\x4c\x8b\x48\x58"  # +17 mov r9, [rax+58h]           KernelCallbackTable
        b"\x4b\x8b\x04\xc1",  # +1B mov rax, [r9+r8*8]         the handler
        *call(thunk),  # +1F call <CFG dispatch thunk>: jmp rax to the handler
        b"\x33\xc9"  # +24 xor ecx, ecx
        b"\x33\xd2"  # +26 xor edx, edx
        b"\x44\x8b\xc0",  # +28 mov r8d, eax
        *call(callback_return),  # +2B call NtCallbackReturn
        b"\x8b\xf0"  # +30 mov esi, eax
        b"\x8b\xce",  # +32 mov ecx, esi
        *call(raise_status),  # +34 call RtlRaiseStatus
        b"\xeb\xf7",  # +39 jmp +32
    )
    assert code_size(code) == DISPATCHER_SIZE
    return code


CFG_THUNK_FRAME = 0x48


def cfg_dispatch_thunk(check_slot: str) -> Code:
    """The non-exported control-flow-guard dispatch thunk the dispatcher calls: saves the
    argument registers, calls the CFG check on rax, restores them and tail-jumps to rax, so it
    is no longer on the stack while the handler runs (real-binaries.md)."""
    return (
        sub_rsp(CFG_THUNK_FRAME),
        b"\x48\x89\x4c\x24\x20"  # mov [rsp+20h], rcx
        b"\x48\x89\x54\x24\x28"  # mov [rsp+28h], rdx
        b"\x4c\x89\x44\x24\x30"  # mov [rsp+30h], r8
        b"\x4c\x89\x4c\x24\x38"  # mov [rsp+38h], r9
        b"\x48\x89\x44\x24\x40"  # mov [rsp+40h], rax
        b"\x48\x8b\xc8",  # mov rcx, rax
        *call_indirect(check_slot),  # call [__guard_check_icall_fptr]
        b"\x48\x8b\x44\x24\x40"  # mov rax, [rsp+40h]
        b"\x4c\x8b\x4c\x24\x38"  # mov r9, [rsp+38h]
        b"\x4c\x8b\x44\x24\x30"  # mov r8, [rsp+30h]
        b"\x48\x8b\x54\x24\x28"  # mov rdx, [rsp+28h]
        b"\x48\x8b\x4c\x24\x20",  # mov rcx, [rsp+20h]
        add_rsp(CFG_THUNK_FRAME),
        b"\x48\xff\xe0",  # jmp rax
    )


def cfg_check(bitmap_slot: str) -> Code:
    """A leaf CFG check (no RUNTIME_FUNCTION): tests the target's bit in the CFG bitmap and
    fails fast (int 29h, FAST_FAIL_GUARD_ICALL_CHECK_FAILURE) when it is clear."""
    return (
        b"\x4c\x8b\xd9"  # mov r11, rcx
        b"\x49\xc1\xeb\x09"  # shr r11, 9
        b"\x4c\x8b\x15",  # mov r10, [rip+bitmap]
        Rel32(bitmap_slot),
        b"\x4f\x8b\x14\xda"  # mov r10, [r10+r11*8]
        b"\x4c\x8b\xd9"  # mov r11, rcx
        b"\x49\xc1\xeb\x03"  # shr r11, 3
        b"\x4d\x0f\xa3\xda"  # bt r10, r11
        b"\x73\x01"  # jae +1
        b"\xc3"  # ret
        b"\xb9\x0a\x00\x00\x00"  # mov ecx, 0Ah
        b"\xcd\x29",  # int 29h
    )


def language_handler() -> Code:
    """A leaf exception handler returning ExceptionContinueSearch."""
    return (b"\xb8\x01\x00\x00\x00" + RET,)  # mov eax, 1; ret


# -- ordinary routines ----------------------------------------------------------------------
# Body instructions of filler routines: plain register and stack-slot moves MSVC emits.
_BODY = (
    b"\x48\x8b\xc1",  # mov rax, rcx
    b"\x48\x8b\xda",  # mov rbx, rdx
    b"\x33\xc0",  # xor eax, eax
    b"\x85\xc0",  # test eax, eax
    b"\x48\x8d\x4c\x24\x20",  # lea rcx, [rsp+20h]
    b"\x48\x89\x44\x24\x20",  # mov [rsp+20h], rax
    b"\x8b\x44\x24\x30",  # mov eax, [rsp+30h]
    b"\x45\x33\xc0",  # xor r8d, r8d
    b"\x48\x8b\x49\x08",  # mov rcx, [rcx+8]
    b"\x0f\xb7\xc0",  # movzx eax, ax
)
FRAME_SIZES = (0x28, 0x38, 0x48, 0x58, 0x68, 0x78)


@dataclass(frozen=True)
class Routine:
    """A routine ready to place: its code, and its stack allocation when it has a prologue
    (``None``: a leaf with no RUNTIME_FUNCTION)."""

    code: Code
    frame: int | None


def ordinary_routine(rng: random.Random, callees: tuple[str, ...] = ()) -> Routine:
    """``sub rsp,N``, a few moves and calls, ``add rsp,N; ret``: the prologue-4,
    UWOP_ALLOC_SMALL shape of real-binaries.md.  One in ten is a leaf (no frame)."""
    if rng.random() < 0.1:
        body = b"".join(rng.choice(_BODY) for _ in range(rng.randint(1, 3)))
        return Routine((body + RET,), None)
    frame = rng.choice(FRAME_SIZES)
    code: list[Piece] = [sub_rsp(frame)]
    for _ in range(rng.randint(2, 9)):
        if callees and rng.random() < 0.2:
            code += call(rng.choice(callees))
        else:
            code.append(rng.choice(_BODY))
    code += [add_rsp(frame), RET]
    return Routine(tuple(code), frame)


@dataclass(frozen=True)
class HandlerRoutine:
    routine: Routine
    after_return_call: int | None  # offset just after `call [__imp_NtCallbackReturn]`
    # callee -> offset just after the handler's call to it (framed handlers only)
    site_returns: dict[str, int] | None = None


def callback_handler(
    rng: random.Random,
    callback_return_slot: str,
    callees: tuple[str, ...],
    sites: tuple = (),
):
    """A user32 callback-table routine (an `__fn*`): works on the input, then hands its result
    to NtCallbackReturn through the import address table (real-binaries.md).  A few are leaf
    routines without a RUNTIME_FUNCTION that tail-jump there (8 of 143 entries in 19041 do not
    begin at one)."""
    if rng.random() < 0.06:
        code: Code = (
            b"\x33\xc9"  # xor ecx, ecx
            b"\x33\xd2"  # xor edx, edx
            b"\x45\x33\xc0",  # xor r8d, r8d
            *tail_jump_indirect(callback_return_slot),
        )
        return HandlerRoutine(Routine(code, None), None)
    frame = rng.choice(FRAME_SIZES[1:])
    body: list[Piece] = [sub_rsp(frame)]
    for _ in range(rng.randint(2, 6)):
        if callees and rng.random() < 0.3:
            body += call(rng.choice(callees))
        else:
            body.append(rng.choice(_BODY))
    # ``sites``: (callee, call code) the handler makes, a switch on the message: the stack
    # layouts choose one of them (stack_functions.handler_sites).
    site_returns = {}
    for callee, site in sites:
        body.append(b"\x48\x8b\xcb")  # mov rcx, rbx
        body += site
        site_returns[callee] = code_size(tuple(body))
    body += [
        b"\x48\x89\x44\x24\x20"  # mov [rsp+20h], rax
        b"\x48\x8d\x4c\x24\x20"  # lea rcx, [rsp+20h]   OutputBuffer
        b"\xba\x18\x00\x00\x00"  # mov edx, 18h         OutputLength
        b"\x45\x33\xc0",  # xor r8d, r8d                Status
        *call_indirect(callback_return_slot),
    ]
    after = code_size(tuple(body))
    body += [add_rsp(frame), RET]
    return HandlerRoutine(Routine(tuple(body), frame), after, site_returns)


# -- routines with chained unwind information ------------------------------------------------
CHAINED_HANDLER_FRAME = 0x38
CHAINED_PRIMARY_SIZE = 0x20  # where the secondary prologue (`push rbx`) starts
RBX = 3


@dataclass(frozen=True)
class ChainedHandler:
    """A callback handler in two RUNTIME_FUNCTIONs, as MSVC emits a routine that saves a
    non-volatile register only on a later path: the primary entry covers the prologue and the
    first work, the secondary one starts at its own `push rbx` and chains to the primary."""

    primary: Code
    secondary: Code
    after_return_call: int  # offset from the routine's start, after `call [NtCallbackReturn]`


def chained_callback_handler(callback_return_slot: str) -> ChainedHandler:
    frame = CHAINED_HANDLER_FRAME
    primary: Code = (
        sub_rsp(frame),
        b"\x48\x8d\x4c\x24\x20"  # lea rcx, [rsp+20h]
        b"\x48\x89\x44\x24\x20"  # mov [rsp+20h], rax
        b"\x8b\x44\x24\x30"  # mov eax, [rsp+30h]
        b"\x48\x8b\xc1"  # mov rax, rcx
        b"\x48\x8b\xda"  # mov rbx, rdx
        b"\x45\x33\xc0"  # xor r8d, r8d
        b"\x48\x89\x44\x24\x20",  # mov [rsp+20h], rax
    )
    assert code_size(primary) == CHAINED_PRIMARY_SIZE
    head: Code = (
        b"\x53"  # push rbx: the secondary prologue
        b"\x48\x89\x44\x24\x28"  # mov [rsp+28h], rax
        b"\x48\x8d\x4c\x24\x28"  # lea rcx, [rsp+28h]   OutputBuffer
        b"\xba\x18\x00\x00\x00"  # mov edx, 18h         OutputLength
        b"\x45\x33\xc0",  # xor r8d, r8d                Status
        *call_indirect(callback_return_slot),
    )
    secondary: Code = (*head, b"\x5b", add_rsp(frame), RET)  # pop rbx; add rsp; ret
    return ChainedHandler(primary, secondary, CHAINED_PRIMARY_SIZE + code_size(head))


@dataclass(frozen=True)
class SplitRoutine:
    """A routine whose rarely taken path the compiler moved away (a separated fragment): the
    hot part has the frame; the cold part, placed elsewhere, runs inside that frame, so its
    chained UNWIND_INFO has no codes of its own."""

    hot: Code
    frame: int
    cold: Code


def split_routine(rng: random.Random, cold_label: str) -> SplitRoutine:
    frame = rng.choice(FRAME_SIZES)
    body = b"".join(rng.choice(_BODY) for _ in range(rng.randint(2, 5)))
    hot: Code = (
        sub_rsp(frame),
        body + b"\x85\xc0" + b"\x0f\x85",  # test eax, eax; jne rel32 <cold fragment>
        Rel32(cold_label),
        add_rsp(frame),
        RET,
    )
    cold: Code = (
        b"\xb8\x01\x00\x00\xc0"  # mov eax, 0C0000001h (STATUS_UNSUCCESSFUL)
        + b"".join(rng.choice(_BODY) for _ in range(rng.randint(2, 5))),
        add_rsp(frame),
        RET,
    )
    return SplitRoutine(hot, frame, cold)
