"""The 32-bit side of a WoW64 thread's stack: the saved x86 context and its EBP chain.

While a WoW64 thread runs 64-bit code (a system call, a callback's 64-bit half), wow64cpu keeps
its 32-bit register state in the WOW64_CPURESERVED block that the thread's 64-bit
``TEB.TlsSlots[1]`` (WOW64_TLS_CPURESERVED) points at: USHORT Flags, USHORT Machine, then the
x86 CONTEXT (Wine's wow64cpu and ReactOS' headers describe the same layout).  32-bit code has
no table-driven unwind data, so its frames are followed by the frame-pointer chain: each frame
saved the caller's EBP at [EBP] and returned to [EBP + 4].  docs/output-contract.md,
"windows.kcbstack", WoW64 threads.
"""

from __future__ import annotations

import struct
from typing import Callable

from volatility3.plugins.windows.kcbwait_analysis import stack_walk

WOW64_TLS_CPURESERVED = 1
CONTEXT_IN_CPURESERVED = 4  # after USHORT Flags and USHORT Machine
# x86 CONTEXT: ... Ebp +0xB4, Eip +0xB8, SegCs +0xBC, EFlags +0xC0, Esp +0xC4.
CONTEXT_EBP = 0xB4
CONTEXT_EIP = 0xB8
CONTEXT_ESP = 0xC4
MAX_FRAMES32 = 256
ADDRESS_LIMIT32 = 1 << 32

DwordReader = Callable[[int], "int | None"]


def read_context(
    cpu_reserved: int, read: Callable[[int, int], bytes | None]
) -> tuple[int, int, int] | None:
    """(Eip, Esp, Ebp) of the x86 CONTEXT in the WOW64_CPURESERVED block at ``cpu_reserved``."""
    context = cpu_reserved + CONTEXT_IN_CPURESERVED
    raw = read(context + CONTEXT_EBP, CONTEXT_ESP + 4 - CONTEXT_EBP)
    if raw is None:
        return None
    ebp, eip = struct.unpack_from("<II", raw, 0)
    (esp,) = struct.unpack_from("<I", raw, CONTEXT_ESP - CONTEXT_EBP)
    return eip, esp, ebp


def walk_frame_pointers(
    eip: int,
    esp: int,
    ebp: int,
    read: DwordReader,
    first_index: int,
    symbolize: Callable[[int], str | None],
) -> list[stack_walk.StackFrame]:
    """The 32-bit frames from the saved context down the EBP chain (bounded)."""
    rows = [(eip, esp, [])]
    previous = None
    while len(rows) < MAX_FRAMES32:
        if (
            not ebp
            or ebp % 4
            or ebp >= ADDRESS_LIMIT32
            or (previous is not None and ebp <= previous)
        ):
            break
        caller = read(ebp + 4)
        saved = read(ebp)
        if caller is None or saved is None:
            address = ebp + 4 if caller is None else ebp
            rows[-1][2].append(stack_walk.FrameNote(stack_walk.Note.STACK_UNREADABLE, address))
            break
        if caller == 0:
            break
        rows.append((caller, ebp + 8, []))
        previous, ebp = ebp, saved
    return [
        stack_walk.StackFrame(
            first_index + index,
            None,
            rip,
            symbolize(rip),
            rsp,
            stack_walk.How.FRAME_POINTER,
            tuple(notes),
        )
        for index, (rip, rsp, notes) in enumerate(rows)
    ]
