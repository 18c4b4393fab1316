"""Functions whose prologues and unwind data agree, for the user stacks the builder lays out.

Each ``StackFunction`` is real x64 code as MSVC emits it: a prologue (pushes of non-volatile
registers, a fixed or large allocation, a frame pointer, saves into the frame), one call site
per callee it may call, and the epilogue; its unwind codes describe exactly that prologue.  The
builder records, per function, where its pushes, saves and free locals lie relative to the
body's Rsp (the Rsp at its call sites), so thread_layout.py can write a frame that unwinds by
those codes, and the truth knows every value it wrote.

Stack discipline (the x64 calling convention): Rsp is 16-aligned at a call, so a function's
return slot is 8 mod 16 and its frame (pushes + allocation) is 8 mod 16.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from imagebuilder.unwind_info import (
    alloc_large,
    alloc_small,
    epilog,
    push_nonvol,
    save_nonvol,
    save_xmm128,
    set_fpreg,
)
from imagebuilder.x64_code import RET, Code, Rel32, code_size

RBX, RBP, RSI, RDI, R12, R14 = 3, 5, 6, 7, 12, 14
XMM6 = 6
_PUSH = {RBX: b"\x53", RBP: b"\x55", RSI: b"\x56", RDI: b"\x57", R12: b"\x41\x54", R14: b"\x41\x56"}
_POP = {RBX: b"\x5b", RBP: b"\x5d", RSI: b"\x5e", RDI: b"\x5f", R12: b"\x41\x5c", R14: b"\x41\x5e"}
CALL_RAX = b"\xff\xd0"  # call rax
CALL_RDX = b"\xff\xd2"  # call rdx


@dataclass(frozen=True)
class StackFunction:
    name: str
    code: Code  # the (primary) routine
    codes: tuple  # its unwind codes, in applying order
    prologue: int
    frame: int  # bytes from the body's Rsp up to the return slot
    calls: dict[str, int]  # callee -> offset (from the function's start) after the call
    pushes: dict[int, int] = field(default_factory=dict)  # register -> offset from body Rsp
    saves: dict[int, int] = field(default_factory=dict)  # SAVE_NONVOL: register -> offset
    free: tuple[tuple[int, int], ...] = ()  # locals nothing reads back: [start, end) offsets
    fp: int | None = None  # rbp = body Rsp + fp (a frame-pointer function)
    sets_rbp: bool = False  # the body loads rbp with a value of its own (pushed first)
    version: int = 1
    frame_register: int = 0
    frame_offset: int = 0  # bytes (16 x FrameOffset)
    secondary: Code | None = None  # chained part placed right after the primary
    secondary_codes: tuple = ()
    secondary_prologue: int = 0


def _sub_rsp(size: int) -> bytes:
    if size < 0x80:
        return b"\x48\x83\xec" + bytes([size])
    return b"\x48\x81\xec" + struct.pack("<I", size)


def _add_rsp(size: int) -> bytes:
    if size < 0x80:
        return b"\x48\x83\xc4" + bytes([size])
    return b"\x48\x81\xc4" + struct.pack("<I", size)


def _call_site(call: Code) -> Code:
    return call


def _assemble_calls(pieces: list, calls: dict[str, int]) -> Code:
    """``pieces``: bytes, or (callee, call Code) tuples marking a call site."""
    out: list = []
    for piece in pieces:
        if isinstance(piece, tuple) and isinstance(piece[0], str):
            callee, call = piece
            out.extend(call)
            calls[callee] = code_size(tuple(out))
        else:
            out.append(piece)
    return tuple(out)


def pushes_then_alloc(
    name: str,
    registers: tuple[int, ...],
    allocation: int,
    sites: list,
    *,
    sets_rbp: bool = False,
    body: bytes = b"\x48\x8b\xc1",  # mov rax, rcx
) -> StackFunction:
    """push r1; push r2; ...; sub rsp, N: UWOP_PUSH_NONVOL per register and UWOP_ALLOC_SMALL or
    UWOP_ALLOC_LARGE (OpInfo 0 below 512K, 1 from 512K on)."""
    prologue = b"".join(_PUSH[r] for r in registers) + _sub_rsp(allocation)
    codes: list = []
    offset = 0
    push_offsets = []
    for r in registers:
        offset += len(_PUSH[r])
        push_offsets.append((offset, r))
    alloc_at = len(prologue)
    codes.append(
        alloc_small(alloc_at, allocation)
        if allocation <= 0x80
        else alloc_large(alloc_at, allocation)
    )
    codes += [push_nonvol(o, r) for o, r in reversed(push_offsets)]
    frame = allocation + 8 * len(registers)
    assert frame % 16 == 8, name
    pushes = {r: allocation + 8 * (len(registers) - 1 - i) for i, r in enumerate(registers)}
    setter = b"\x48\x8b\xe9" if sets_rbp else b""  # mov rbp, rcx
    calls: dict[str, int] = {}
    tail = _add_rsp(allocation) + b"".join(_POP[r] for r in reversed(registers)) + RET
    code = _assemble_calls([prologue + setter + body, *sites, tail], calls)
    return StackFunction(
        name,
        code,
        tuple(codes),
        len(prologue),
        frame,
        calls,
        pushes=pushes,
        free=((0, allocation),),
        sets_rbp=sets_rbp,
    )


def frame_pointer_function(name: str, allocation: int, fp: int, sites: list) -> StackFunction:
    """push rbp; sub rsp, N; lea rbp, [rsp+fp]: UWOP_PUSH_NONVOL rbp, UWOP_ALLOC_SMALL N,
    UWOP_SET_FPREG with FrameRegister rbp and FrameOffset fp / 16 (non-zero)."""
    assert fp % 16 == 0 and 0 < fp <= allocation and (allocation + 8) % 16 == 8
    prologue = _PUSH[RBP] + _sub_rsp(allocation) + b"\x48\x8d\x6c\x24" + bytes([fp])
    codes = (
        set_fpreg(len(prologue)),
        alloc_small(1 + 4, allocation),
        push_nonvol(1, RBP),
    )
    calls: dict[str, int] = {}
    # lea rsp, [rbp + allocation - fp]; pop rbp; ret
    tail = b"\x48\x8d\x65" + bytes([allocation - fp]) + _POP[RBP] + RET
    code = _assemble_calls([prologue + b"\x48\x89\x4d\x00", *sites, tail], calls)  # mov [rbp],rcx
    return StackFunction(
        name,
        code,
        codes,
        len(prologue),
        allocation + 8,
        calls,
        pushes={RBP: allocation},
        free=((0, fp), (fp + 8, allocation)),  # [rbp] holds rcx: a local written, not junk
        fp=fp,
        frame_register=RBP,
        frame_offset=fp,
    )


def saving_function(name: str, allocation: int, sites: list) -> StackFunction:
    """sub rsp, N; mov [rsp+N-8], rbx; movaps [rsp+0x30], xmm6: UWOP_ALLOC_SMALL,
    UWOP_SAVE_NONVOL rbx and UWOP_SAVE_XMM128 xmm6 (codes in applying order: saves first)."""
    save_at, xmm_at = allocation - 8, 0x30
    prologue = (
        _sub_rsp(allocation)
        + b"\x48\x89\x5c\x24"
        + bytes([save_at])  # mov [rsp+save_at], rbx
        + b"\x0f\x29\x74\x24"
        + bytes([xmm_at])  # movaps [rsp+30h], xmm6
    )
    codes = (
        save_xmm128(len(prologue), XMM6, xmm_at),
        save_nonvol(4 + 5, RBX, save_at),
        alloc_small(4, allocation),
    )
    calls: dict[str, int] = {}
    tail = (
        b"\x0f\x28\x74\x24"
        + bytes([xmm_at])
        + b"\x48\x8b\x5c\x24"
        + bytes([save_at])
        + _add_rsp(allocation)
        + RET
    )
    code = _assemble_calls([prologue + b"\x48\x8b\xc1", *sites, tail], calls)
    return StackFunction(
        name,
        code,
        codes,
        len(prologue),
        allocation,
        calls,
        saves={RBX: save_at},
        free=((0, xmm_at), (xmm_at + 16, save_at)),
    )


def chained_function(name: str, allocation: int, sites: list) -> StackFunction:
    """A function in two RUNTIME_FUNCTIONs: the primary (sub rsp, N and some work) and a
    secondary right after it whose own prologue is `push rbx` and which chains to the primary;
    the call site lies in the secondary part.  At the call: [Rsp] = rbx, then the N bytes."""
    primary = _sub_rsp(allocation) + b"\x48\x8b\xc1\x48\x8b\xda\x45\x33\xc0\x48\x8b\x49\x08"
    calls: dict[str, int] = {}
    second = _assemble_calls(
        [_PUSH[RBX] + b"\x48\x8b\xc1", *sites, _POP[RBX] + _add_rsp(allocation) + RET], calls
    )
    calls = {callee: len(primary) + offset for callee, offset in calls.items()}
    assert (allocation + 8) % 16 == 8
    return StackFunction(
        name,
        (primary,),
        (alloc_small(4, allocation),),
        4,
        allocation + 8,
        calls,
        pushes={RBX: 0},
        free=((8, allocation + 8),),
        secondary=second,
        secondary_codes=(push_nonvol(1, RBX),),
        secondary_prologue=1,
    )


def version2_function(name: str, sites: list) -> StackFunction:
    """push r14; sub rsp, 20h with a version 2 UNWIND_INFO: a UWOP_EPILOG record (two slots)
    for its epilogue `add rsp, 20h; pop r14; ret` at the function's end, then the prologue's
    codes."""
    allocation = 0x20
    prologue = _PUSH[R14] + _sub_rsp(allocation)
    tail = _add_rsp(allocation) + _POP[R14] + RET
    codes = (
        epilog(len(tail), len(tail)),
        alloc_small(len(prologue), allocation),
        push_nonvol(2, R14),
    )
    calls: dict[str, int] = {}
    code = _assemble_calls([prologue + b"\x4c\x8b\xf1", *sites, tail], calls)  # mov r14, rcx
    return StackFunction(
        name,
        code,
        codes,
        len(prologue),
        allocation + 8,
        calls,
        pushes={R14: allocation},
        free=((0, allocation),),
        version=2,
    )


def rel_call(label: str) -> Code:
    return (b"\xe8", Rel32(label))


def iat_call(slot: str) -> Code:
    return (b"\xff\x15", Rel32(slot))


def literal_iat_call(displacement: int = 0x2FF8) -> Code:
    """call qword ptr [rip+disp32] with a fixed displacement (plain modules)."""
    return (b"\xff\x15" + struct.pack("<i", displacement),)


# -- the functions of each module ------------------------------------------------------------
# user32: the dispatch routines a callback handler calls (each a different unwind shape), the
# routine that makes a system call; the handler calls every dispatch routine (a switch), the
# layout picks the call site for the routine it puts on the stack.
WINPROC = "WndProc"  # the application's window procedure (the .exe)
SYSTEM_CALL = "UserSystemCall"
DISPATCH_PUSH = "UserCallWinProcCheckWow"
DISPATCH_SAVE = "DispatchClientMessage"
DISPATCH_CHAINED = "UserCallWinProcChained"
DISPATCH_V2 = "UserCallWinProcV2"
DISPATCH_ROOMY = "UserCallWinProcLarge"
DISPATCH_DEEP = "UserCallWinProcDeep"
DISPATCH_HUGE = "UserCallWinProcHuge"
ROOMY_ALLOCATION = 0x1200  # UWOP_ALLOC_LARGE, OpInfo 0: room for stale frames, separate pages
DEEP_ALLOCATION = 0x50008  # UWOP_ALLOC_LARGE, OpInfo 0 (below 512K): deep handler stacks
HUGE_ALLOCATION = 0xC0008  # UWOP_ALLOC_LARGE, OpInfo 1 (512K and above; up to DEEP_MAX)
ORDINARY_DISPATCH = (DISPATCH_PUSH, DISPATCH_SAVE, DISPATCH_CHAINED, DISPATCH_V2)
ALL_DISPATCH = (*ORDINARY_DISPATCH, DISPATCH_ROOMY, DISPATCH_DEEP, DISPATCH_HUGE)


def user32_functions(syscall_slot: str) -> list[StackFunction]:
    """``syscall_slot``: the import slot the system-call routine calls through."""
    winproc = [(WINPROC, (CALL_RAX,))]
    return [
        pushes_then_alloc(DISPATCH_PUSH, (RBX, RSI, RDI), 0x40, winproc),
        saving_function(DISPATCH_SAVE, 0x58, winproc),
        chained_function(DISPATCH_CHAINED, 0x30, winproc),
        version2_function(DISPATCH_V2, winproc),
        pushes_then_alloc(DISPATCH_ROOMY, (RBX,), ROOMY_ALLOCATION, winproc),
        pushes_then_alloc(DISPATCH_DEEP, (), DEEP_ALLOCATION, winproc),
        pushes_then_alloc(DISPATCH_HUGE, (), HUGE_ALLOCATION, winproc),
        # push rbp; push rbx; sub rsp, 28h; mov rbp, rcx: rbp is pushed, then reused.
        pushes_then_alloc(
            SYSTEM_CALL, (RBP, RBX), 0x28, [("syscall", iat_call(syscall_slot))], sets_rbp=True
        ),
    ]


# The application (.exe): WinMain and WndProc, both frame-pointer functions.
WINMAIN = "WinMain"


def exe_functions() -> list[StackFunction]:
    return [
        frame_pointer_function(WINMAIN, 0x60, 0x20, [(SYSTEM_CALL, literal_iat_call())]),
        frame_pointer_function(WINPROC, 0x40, 0x30, [(SYSTEM_CALL, literal_iat_call())]),
    ]


# kernel32: the thread's start thunk and a wait routine.
THREAD_THUNK = "BaseThreadInitThunk"
KERNEL32_WAIT = "WaitForSingleObjectEx"


def kernel32_functions() -> list[StackFunction]:
    return [
        pushes_then_alloc(THREAD_THUNK, (RBX,), 0x20, [(WINMAIN, (CALL_RDX,))]),
        pushes_then_alloc(KERNEL32_WAIT, (RDI,), 0x30, [("syscall", literal_iat_call())]),
    ]


# ntdll: the thread's first routine; its return slot holds 0.
THREAD_START = "RtlUserThreadStart"


def ntdll_functions(slot: str) -> list[StackFunction]:
    return [pushes_then_alloc(THREAD_START, (), 0x78, [(THREAD_THUNK, iat_call(slot))])]


def handler_sites() -> list:
    """The call sites a framed callback handler gets: one per dispatch routine."""
    return [(name, rel_call(name)) for name in ALL_DISPATCH]
