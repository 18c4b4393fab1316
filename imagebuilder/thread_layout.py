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
from dataclasses import dataclass, field

from imagebuilder.kernel_layout import Kernel
from imagebuilder.memory import PAGE, AddressSpace
from imagebuilder.process_layout import USER_STACK_RESERVE

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
    return_address: int = 0  # the qword just below the frame (where the handler returns)


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
    # T(j), j = 0..K: the _KTRAP_FRAME at each segment's InitialStack - sizeof(_KTRAP_FRAME).
    trap_frames: tuple[int, ...] = ()
    # The KCALLOUT_FRAME (_KEXCEPTION_FRAME) of each level k = 1..K, on segment k-1.
    callout_frames: tuple[int, ...] = ()
    # (StackBase, StackLimit) of each kernel stack segment, the original stack first.
    segments: tuple[tuple[int, int], ...] = ()
    # T(j)'s original user Rsp, j = 0..K: user_rsps[k] (k >= 1) is where level k's handler
    # called its system call (the bottom of its locals); user_rsps[K] is the current Rsp.
    user_rsps: tuple[int, ...] = ()
    syscall_rips: tuple[int, ...] = ()  # T(j).Rip, j = 0..K


@dataclass(frozen=True)
class StackPlan:
    """What a thread's conditions (imagebuilder/conditions.py) need from the stack layout."""

    # level -> at least this many bytes between the level's return slot and the Rsp of the
    # system call its handler makes (the handler's locals).
    min_gaps: dict[int, int] = field(default_factory=dict)
    # Levels whose handler locals are written only near both ends: a deep stack's middle
    # pages are left unmapped, as pages nobody wrote, so the image stays small.
    hollow: frozenset[int] = frozenset()
    # Bytes of freed stack below the current Rsp that stay inside the TEB bounds.
    below_rsp: int = 0


_HOLLOW_EDGE = 0x400  # handler locals written at each end of a hollow gap


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
    plan: StackPlan | None = None,
) -> tuple[StackFacts, dict[str, int]]:
    """Write the user stack and the kernel stack segments of one thread.

    ``syscall_rips[j]`` is the Rip of trap frame T(j) (after the ``syscall`` instruction);
    ``calls[k-1]`` = (api, handler, input length) for level k; ``dispatcher_return`` is where
    handlers return (into KiUserCallbackDispatcher, or into a hook of it).  Returns the
    user-side facts and the KTHREAD stack fields.
    """
    sym, w = kernel.symbols, kernel.writer
    plan = plan or StackPlan()
    levels = len(calls)
    # -- user stack ------------------------------------------------------------------------
    rsp = stack_base - 0x200 - 16 * rng.randint(0, 24) - 8  # Rsp is 8 mod 16 inside a stub
    user_rsp = [rsp]
    lowest = rsp
    holes: list[tuple[int, int]] = []  # never written: left without a mapping
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
        gap = max(0x30 + 16 * rng.randint(1, 40), (plan.min_gaps.get(level, 0) + 15) & ~15)
        handler_rsp = frame - 8 - gap
        if level in plan.hollow and gap > 4 * _HOLLOW_EDGE:
            _write_junk(space, rng, handler_rsp + 8, _HOLLOW_EDGE, dispatcher_range)
            _write_junk(space, rng, frame - 8 - _HOLLOW_EDGE, _HOLLOW_EDGE, dispatcher_range)
            holes.append((handler_rsp + 8 + _HOLLOW_EDGE, frame - 8 - _HOLLOW_EDGE))
        else:
            _write_junk(space, rng, handler_rsp + 8, gap - 8, dispatcher_range)
        space.write(handler_rsp, struct.pack("<Q", handler + 4))
        frames.append(
            FrameFact(
                level,
                frame,
                api,
                handler,
                buffer,
                length,
                syscall_rips[level - 1],
                prev_rsp,
                dispatcher_return,
            )
        )
        user_rsp.append(handler_rsp)
        lowest = handler_rsp
    stack_limit = ((lowest - plan.below_rsp) & ~(PAGE - 1)) - PAGE
    if stack_base - stack_limit > USER_STACK_RESERVE:
        raise ValueError(
            f"a user stack of {stack_base - stack_limit:#x} bytes exceeds the"
            f" {USER_STACK_RESERVE:#x} bytes reserved per thread"
        )
    _ensure_except(space, stack_limit, stack_base, holes)

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
        trap_frames=tuple(s[3] for s in segments),
        callout_frames=tuple(callout_frames),
        segments=tuple((s[0], s[1]) for s in segments),
        user_rsps=tuple(user_rsp),
        syscall_rips=tuple(syscall_rips),
    )
    kthread = {
        "InitialStack": initial,
        "StackBase": base,
        "StackLimit": limit,
        "KernelStack": trap - 0x300,
        "TrapFrame": trap,
        "CallbackNestingLevel": levels,
        "KernelStackResident": 1,
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
        "KernelStackResident": 1,
    }


def _write_junk(
    space: AddressSpace, rng: random.Random, start: int, size: int, avoid: tuple[int, int]
) -> None:
    """Stale locals: small numbers and zeros, never a return address into ``avoid``."""
    junk = [_junk(rng, avoid) for _ in range(size // 8)]
    space.write(start, struct.pack(f"<{len(junk)}Q", *junk))


def _ensure_except(space: AddressSpace, start: int, end: int, holes: list[tuple[int, int]]) -> None:
    """Map [start, end) except the pages lying wholly inside a hole."""
    for page in range(start & ~(PAGE - 1), end, PAGE):
        if not any(lo <= page and page + PAGE <= hi for lo, hi in holes):
            space.ensure(page, PAGE)


def _junk(rng: random.Random, avoid: tuple[int, int]) -> int:
    while True:
        value = rng.choice((rng.getrandbits(16), rng.getrandbits(32), 0))
        if not avoid[0] <= value < avoid[1]:
            return value
