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
    trap_rbps: tuple[int, ...] = ()  # T(j).Rbp, j = 0..K: rbp at that system call
    # Per level j = 0..K: the return slots of the level's call chain, outermost first (the
    # slot holding the outermost function's own return address first).
    return_slots: tuple[tuple[int, ...], ...] = ()
    # Per level j = 0..K: [start, end) ranges of function locals nothing reads back.
    free: tuple[tuple[tuple[int, int], ...], ...] = ()
    # A thread resting in NtCallbackReturn called by the dispatcher with no kernel level: the
    # UCALLOUT_FRAME-shaped block its dispatcher frame stands on (0: none).
    resting_frame: int = 0
    resting_rsp: int = 0  # its MachineFrame.Rsp


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


@dataclass(frozen=True)
class FrameShape:
    """How a function's frame looks at a call site, from the unwind ops the builder gave it."""

    size: int  # bytes from the body's Rsp up to its return slot
    pushes: dict[int, int]  # register -> offset of its pushed value
    saves: dict[int, int]  # register -> offset of its SAVE_NONVOL slot
    fp: int | None  # rbp = body Rsp + fp
    sets_rbp: bool  # the body loads rbp with a value of its own
    allocations: tuple[tuple[int, int], ...]  # [start, end) offsets of its allocations


def frame_shape(ops: tuple, sets_rbp: bool = False) -> FrameShape:
    offset, pushes, saves, fp, allocations = 0, {}, {}, None, []
    for op in ops:
        if op[0] == "push":
            pushes[op[1]] = offset
            offset += 8
        elif op[0] == "alloc":
            allocations.append((offset, offset + op[1]))
            offset += op[1]
        elif op[0] == "setfp":
            fp = op[2]
        elif op[0] == "save":
            saves[op[1]] = op[2]
        else:
            raise AssertionError(op)
    return FrameShape(offset, pushes, saves, fp, sets_rbp, tuple(allocations))


@dataclass(frozen=True)
class Chain:
    """One level's call chain: the return address of each function, outermost first (the
    address the function at that position returns into its caller is the previous entry's;
    the outermost's own return is the level's top value), and the shape of each function."""

    returns: tuple[int, ...] = ()
    shapes: tuple[FrameShape, ...] = ()


_HOLLOW_EDGE = 0x400  # handler locals written at each end of a hollow gap
RBP = 5
_REGISTERS = (3, 5, 6, 7, 12, 13, 14, 15)


def _fresh_registers(rng: random.Random, avoid: tuple[int, int]) -> dict[int, int]:
    return {r: _junk(rng, avoid) for r in _REGISTERS}


def _lay_chain(
    space: AddressSpace,
    rng: random.Random,
    slot: int,
    top_value: int,
    chain: Chain,
    registers: dict[int, int],
    avoid: tuple[int, int],
    hollow: bool,
    holes: list[tuple[int, int]],
) -> tuple[int, list[int], list[tuple[int, int]]]:
    """Writes ``top_value`` at ``slot`` and each function's frame below it: junk locals,
    pushed and saved registers (the caller's values), the return address into it.  Returns
    the innermost slot (the system-call stub's Rsp), every return slot, the free locals."""
    space.write(slot, struct.pack("<Q", top_value))
    slots, free = [slot], []
    for value, shape in zip(chain.returns, chain.shapes, strict=True):
        body = slot - shape.size
        if hollow and shape.size > 4 * _HOLLOW_EDGE:
            _write_junk(space, rng, body, _HOLLOW_EDGE, avoid)
            _write_junk(space, rng, slot - _HOLLOW_EDGE, _HOLLOW_EDGE, avoid)
            holes.append((body + _HOLLOW_EDGE, slot - _HOLLOW_EDGE))
        else:
            _write_junk(space, rng, body, shape.size, avoid)
        used = set()
        for reg, offset in [*shape.pushes.items(), *shape.saves.items()]:
            space.write(body + offset, struct.pack("<Q", registers[reg]))
            used.add(offset)
        for start, end in shape.allocations:
            cuts = sorted(o for o in used if start <= o < end)
            edge = start
            for cut in [*cuts, end]:
                if cut > edge:
                    free.append((body + edge, body + cut))
                edge = cut + 8
        # The body changes the registers it saved; a frame-pointer function sets rbp.
        for reg in [*shape.pushes, *shape.saves]:
            registers[reg] = _junk(rng, avoid)
        if shape.fp is not None:
            registers[RBP] = body + shape.fp
        slot = body - 8
        space.write(slot, struct.pack("<Q", value))
        slots.append(slot)
    return slot, slots, free


def lay_out_user_thread(
    kernel: Kernel,
    space: AddressSpace,
    rng: random.Random,
    *,
    stack_base: int,
    syscall_rips: list[int],
    chains: list[Chain],
    calls: list[tuple[int, int, int]],
    dispatcher_return: int,
    dispatcher_range: tuple[int, int],
    plan: StackPlan | None = None,
    resting: tuple[int, int, Chain] | None = None,
) -> tuple[StackFacts, dict[str, int]]:
    """Write the user stack and the kernel stack segments of one thread.

    ``syscall_rips[j]`` is the Rip of trap frame T(j) (after the ``syscall`` instruction);
    ``chains[j]`` the functions level j runs through down to that system call (level 0 from
    RtlUserThreadStart, whose return slot holds 0; level k from the handler, whose return
    address is ``dispatcher_return``); ``calls[k-1]`` = (api, handler, input length) for level
    k.  ``resting``: (dispatcher's NtCallbackReturn return address, Rip of the system call the
    callback interrupted, the chain down to it) for a thread resting in NtCallbackReturn
    called by the dispatcher without a kernel level.  Returns the user-side facts and the
    KTHREAD stack fields.
    """
    sym, w = kernel.symbols, kernel.writer
    plan = plan or StackPlan()
    levels = len(calls)
    # -- user stack ------------------------------------------------------------------------
    top = stack_base - 0x200 - 16 * rng.randint(0, 24) - 8  # a return slot is 8 mod 16
    holes: list[tuple[int, int]] = []  # never written: left without a mapping
    registers = _fresh_registers(rng, dispatcher_range)
    rsp, slots, free = _lay_chain(
        space, rng, top, 0, chains[0], registers, dispatcher_range, False, holes
    )
    free.append((top + 8, stack_base))
    resting_frame = resting_rsp = 0
    if resting is not None:
        resting_rsp = rsp
        callback_return, outer_rip, _chain = resting
        resting_frame = (rsp - (0x10 + UCALLOUT_FRAME_SIZE)) & ~0xF
        buffer = resting_frame + UCALLOUT_FRAME_SIZE
        space.write(buffer, rng.randbytes(0x10))
        space.write(
            resting_frame - 8,
            struct.pack("<QQQQQQII", callback_return, 0, 0, 0, 0, buffer, 0x10, 2)
            + struct.pack("<QQQQQ", outer_rip, USER_CS, USER_EFLAGS, rsp, USER_SS),
        )
        rsp = resting_frame - 8
    user_rsp = [rsp]
    rbps = [registers[RBP]]
    all_slots, all_free = [tuple(slots)], [tuple(free)]
    lowest = rsp
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
        # The handler's frames (its own, then the routines it calls) down to its system call.
        registers = _fresh_registers(rng, dispatcher_range)
        handler_rsp, slots, free = _lay_chain(
            space,
            rng,
            frame - 8,
            dispatcher_return,
            chains[level],
            registers,
            dispatcher_range,
            level in plan.hollow,
            holes,
        )
        gap = frame - 8 - handler_rsp
        if gap < plan.min_gaps.get(level, 0):
            raise ValueError(
                f"level {level}'s handler {handler:#x} has no frames the builder lays out"
                f" (a leaf or foreign routine), so its locals cannot hold the"
                f" {plan.min_gaps[level]:#x} bytes a condition needs"
            )
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
        rbps.append(registers[RBP])
        all_slots.append(tuple(slots))
        all_free.append(tuple(free))
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
                "Rbp": rbps[index],
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
        trap_rbps=tuple(rbps),
        return_slots=tuple(all_slots),
        free=tuple(all_free),
        resting_frame=resting_frame,
        resting_rsp=resting_rsp,
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
