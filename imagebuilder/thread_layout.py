"""A thread's kernel and user stacks, laid out as ../shared/docs/callback-machinery.md describes.

For a thread inside N callbacks (levels numbered 1 = outermost):
- kernel: N + 1 stack segments, each topped by a _KSTACK_CONTROL whose address is that
  segment's InitialStack; segment k's trap frame T(k) sits at InitialStack - sizeof(_KTRAP_FRAME);
  the KCALLOUT_FRAME (_KEXCEPTION_FRAME) of level k lies on segment k-1 with TrapFrame = T(k-1),
  and segment k's _KSTACK_CONTROL.Previous describes segment k-1 (KernelStack -> that frame).
- user: per level a 0x58-byte UCALLOUT_FRAME at (Rsp(k-1) - (align16(len) + 0x58)) & ~0xF with
  the input right after it, MachineFrame = T(k-1)'s original Rip/Rsp, the return address into
  KiUserCallbackDispatcher just below it; T(k-1).Rsp is rewritten to the frame's address.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass

from imagebuilder.kernel_layout import Kernel
from imagebuilder.memory import PAGE, AddressSpace

UCALLOUT_FRAME_SIZE = 0x58  # x64 UCALLOUT_FRAME (ReactOS ketypes.h)
USER_CS, USER_SS, USER_EFLAGS = 0x33, 0x2B, 0x246
_KCALLOUT_GAP = 0x180  # kernel frames between a trap frame and the callout frame below it


@dataclass(frozen=True)
class FrameFact:
    """What the builder put on the user stack for one callback level."""

    level: int
    frame: int
    api: int
    handler: int
    buffer: int
    length: int
    rip: int  # MachineFrame.Rip: the syscall this callback interrupted
    rsp: int  # MachineFrame.Rsp


@dataclass(frozen=True)
class StackFacts:
    trap_frame: int
    rip: int
    rsp: int
    frames: tuple[FrameFact, ...]
    stack_base: int
    stack_limit: int
    # (label, kernel address, size) of each kernel structure laid out: the fuzz harness aims
    # its mutations at them (regions.RegionMap.targets).
    kernel_structures: tuple[tuple[str, int, int], ...] = ()


def lay_out_user_thread(
    kernel: Kernel,
    space: AddressSpace,
    rng: random.Random,
    *,
    stack_base: int,
    syscall_rips: list[int],
    caller_return: int,
    calls: list[tuple[int, int, int]],
    dispatcher_return: int,
    dispatcher_range: tuple[int, int],
) -> tuple[StackFacts, dict[str, int]]:
    """Write the user stack and the kernel stack segments of one thread.

    ``syscall_rips[j]`` is the Rip of trap frame T(j) (after the ``syscall`` instruction);
    ``calls[k-1]`` = (api, handler, input length) for level k.  Returns the user-side facts
    and the KTHREAD stack fields.
    """
    sym, w = kernel.symbols, kernel.writer
    levels = len(calls)
    # -- user stack ------------------------------------------------------------------------
    rsp = stack_base - 0x200 - 16 * rng.randint(0, 24) - 8  # Rsp is 8 mod 16 inside a stub
    user_rsp = [rsp]
    lowest = rsp
    space.write(rsp, struct.pack("<Q", caller_return))
    frames: list[FrameFact] = []
    for level, (api, handler, length) in enumerate(calls, start=1):
        prev_rsp = user_rsp[-1]
        frame = (prev_rsp - (((length + 15) & ~15) + UCALLOUT_FRAME_SIZE)) & ~0xF
        buffer = frame + UCALLOUT_FRAME_SIZE
        space.write(buffer, rng.randbytes(length))
        space.write(
            frame,
            struct.pack("<QQQQQII", 0, 0, 0, 0, buffer, length, api)
            + struct.pack(
                "<QQQQQ", syscall_rips[level - 1], USER_CS, USER_EFLAGS, prev_rsp, USER_SS
            ),
        )
        space.write(frame - 8, struct.pack("<Q", dispatcher_return))
        # The handler's own frames, then the call into the next system-call stub.
        gap = 0x30 + 16 * rng.randint(1, 40)
        handler_rsp = frame - 8 - gap
        junk = [_junk(rng, dispatcher_range) for _ in range((gap - 8) // 8)]
        space.write(handler_rsp + 8, struct.pack(f"<{len(junk)}Q", *junk))
        space.write(handler_rsp, struct.pack("<Q", handler + 4))
        frames.append(
            FrameFact(level, frame, api, handler, buffer, length, syscall_rips[level - 1], prev_rsp)
        )
        user_rsp.append(handler_rsp)
        lowest = handler_rsp
    stack_limit = (lowest & ~(PAGE - 1)) - PAGE
    space.ensure(stack_limit, stack_base - stack_limit)

    # -- kernel stacks -----------------------------------------------------------------------
    trap_size = sym.size("_KTRAP_FRAME")
    control_size = sym.size("_KSTACK_CONTROL")
    segments = []
    for _ in range(levels + 1):
        base, limit = kernel.kernel_stack()
        initial = base - control_size
        segments.append((base, limit, initial, initial - trap_size))
    callout_frames = []
    for level in range(1, levels + 1):
        below = segments[level - 1][3]
        frame = (below - _KCALLOUT_GAP - sym.size("_KEXCEPTION_FRAME")) & ~0xF
        w.put(
            kernel.space,
            frame,
            "_KEXCEPTION_FRAME",
            {
                "TrapFrame": below,
                "OutputBuffer": 0,
                "OutputLength": 0,
                "Return": kernel.symbol_address("PsActiveProcessHead") & ~0xFFF | 0x1234,
            },
            optional=True,
        )
        callout_frames.append(frame)
    for index, (base, limit, initial, trap) in enumerate(segments):
        previous = {
            "Previous.StackBase": 0,
            "Previous.StackLimit": 0,
            "Previous.KernelStack": 0,
            "Previous.InitialStack": 0,
        }
        if index:
            pbase, plimit, pinitial, _ = segments[index - 1]
            previous = {
                "Previous.StackBase": pbase,
                "Previous.StackLimit": plimit,
                "Previous.KernelStack": callout_frames[index - 1],
                "Previous.InitialStack": pinitial,
            }
        w.put(
            kernel.space,
            initial,
            "_KSTACK_CONTROL",
            {"StackBase": base, "ActualLimit": limit, **previous},
        )
        # T(j): Rsp rewritten to the next level's UCALLOUT_FRAME where one exists.
        rsp_j = frames[index].frame if index < levels else user_rsp[index]
        w.put(
            kernel.space,
            trap,
            "_KTRAP_FRAME",
            {
                "Rip": syscall_rips[index],
                "Rsp": rsp_j,
                "SegCs": USER_CS,
                "SegSs": USER_SS,
                "EFlags": USER_EFLAGS,
                "PreviousMode": 1,
                "Rbp": rsp_j + 0x40,
            },
            optional=True,
        )
    structures = [("stack_control", s[2], control_size) for s in segments]
    structures += [("trap_frame", s[3], trap_size) for s in segments]
    structures += [("callout_frame", f, sym.size("_KEXCEPTION_FRAME")) for f in callout_frames]
    base, limit, initial, trap = segments[-1]
    facts = StackFacts(
        trap,
        syscall_rips[-1],
        user_rsp[-1],
        tuple(frames),
        stack_base,
        stack_limit,
        tuple(structures),
    )
    kthread = {
        "InitialStack": initial,
        "StackBase": base,
        "StackLimit": limit,
        "KernelStack": trap - 0x300,
        "TrapFrame": trap,
        "CallbackNestingLevel": levels,
    }
    return facts, kthread


def lay_out_kernel_thread(kernel: Kernel) -> dict[str, int]:
    """A thread that never entered from user mode: one stack, no trap frame."""
    base, limit = kernel.kernel_stack()
    initial = base - kernel.symbols.size("_KSTACK_CONTROL")
    kernel.writer.put(
        kernel.space, initial, "_KSTACK_CONTROL", {"StackBase": base, "ActualLimit": limit}
    )
    return {
        "InitialStack": initial,
        "StackBase": base,
        "StackLimit": limit,
        "KernelStack": initial - 0x400,
        "TrapFrame": 0,
        "CallbackNestingLevel": 0,
    }


def _junk(rng: random.Random, avoid: tuple[int, int]) -> int:
    while True:
        value = rng.choice((rng.getrandbits(16), rng.getrandbits(32), 0))
        if not avoid[0] <= value < avoid[1]:
            return value
