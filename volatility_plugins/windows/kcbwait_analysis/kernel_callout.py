"""The kernel side of nested callbacks: the chain of _KSTACK_CONTROL stack segments.

Each KeUserModeCallback runs on a fresh kernel stack whose top holds a _KSTACK_CONTROL; it records
in ``Previous`` the stack that was current before (StackBase, StackLimit, InitialStack) and in
``Previous.KernelStack`` the KCALLOUT_FRAME (a _KEXCEPTION_FRAME) that KiCallUserMode saved there,
whose ``TrapFrame`` field names the trap frame current when the callout started.
``KTHREAD.InitialStack`` points at the newest _KSTACK_CONTROL.  Segments with ``StackExpansion``
set are kernel stack expansions, not callouts.  The trap frame of each segment sits at its
``InitialStack - sizeof(_KTRAP_FRAME)`` (callback-machinery.md; PspGetBaseTrapFrame walks the same
chain).  The walk is bounded; structure sizes and offsets come from the symbol table.
"""

from __future__ import annotations

from dataclasses import dataclass

from volatility3.framework import exceptions, interfaces
from volatility3.plugins.windows.kcbwait_analysis import findings, trap_frame

# 31 nested callouts plus the base stack, plus room for a few expansion segments.
MAX_SEGMENTS = 32


@dataclass(frozen=True)
class StackSegment:
    """One _KSTACK_CONTROL in the chain."""

    initial_stack: int
    stack_expansion: bool
    previous_initial_stack: int
    previous_kernel_stack: int
    stack_base: int = 0
    previous_stack_base: int = 0


@dataclass(frozen=True)
class SegmentChain:
    """Callout segments innermost first, the base (original) stack last.

    ``complete`` is False when a segment could not be read, a link led to a segment that is
    not the one its ``Previous`` describes, or the bound was hit before a segment with
    ``Previous.InitialStack == 0`` (the thread's original stack) was reached.
    """

    segments: tuple[StackSegment, ...]
    complete: bool


def read_segment(kernel: interfaces.context.ModuleInterface, address: int) -> StackSegment | None:
    """Reads the _KSTACK_CONTROL at ``address`` (absolute kernel address)."""
    try:
        control = kernel.object(object_type="_KSTACK_CONTROL", offset=address, absolute=True)
        expansion = bool(control.StackExpansion) if control.has_member("StackExpansion") else False
        return StackSegment(
            initial_stack=address,
            stack_expansion=expansion,
            previous_initial_stack=int(control.Previous.InitialStack),
            previous_kernel_stack=int(control.Previous.KernelStack),
            stack_base=int(control.StackBase),
            previous_stack_base=int(control.Previous.StackBase),
        )
    except exceptions.InvalidAddressException:
        return None


def walk_segments(kernel: interfaces.context.ModuleInterface, initial_stack: int) -> SegmentChain:
    """Walks the stack segments from ``KTHREAD.InitialStack`` to the original stack.

    Expansion segments are dropped: a callout's Previous may lead through them, but they carry
    neither a trap frame nor a KCALLOUT_FRAME of their own.  KeUserModeCallback copied the
    previous segment's StackBase into ``Previous.StackBase``; a link whose target does not
    carry that StackBase leads somewhere else (stale or smeared) and breaks the chain there.
    """
    segments: list[StackSegment] = []
    seen: set[int] = set()
    address = initial_stack
    expected_base = None
    for _ in range(MAX_SEGMENTS):
        if not address or address in seen:
            return SegmentChain(tuple(segments), False)
        seen.add(address)
        segment = read_segment(kernel, address)
        if segment is None:
            return SegmentChain(tuple(segments), False)
        if expected_base is not None and segment.stack_base != expected_base:
            return SegmentChain(tuple(segments), False)
        expected_base = segment.previous_stack_base
        if not segment.stack_expansion:
            segments.append(segment)
        if segment.previous_initial_stack == 0:
            return SegmentChain(tuple(segments), True)
        address = segment.previous_initial_stack
    return SegmentChain(tuple(segments), False)


@dataclass(frozen=True)
class KernelLevel:
    """What the kernel recorded for callout level ``level`` (1 = outermost).

    ``caller_trap_frame`` is T(level-1), the trap frame the callout was started from: the base
    trap frame for level 1, the one on level-1's callout stack otherwise.  ``trap_frame`` is its
    contents (None if unreadable); ``kcallout_trap_frame`` is the TrapFrame field of the
    KCALLOUT_FRAME named by this level's ``_KSTACK_CONTROL.Previous.KernelStack`` (None if
    unreadable).
    """

    level: int
    segment: int
    caller_trap_frame: int
    trap_frame: trap_frame.TrapFrame | None
    kcallout_frame: int
    kcallout_trap_frame: int | None


def read_kcallout_trap_frame(
    kernel: interfaces.context.ModuleInterface, address: int
) -> int | None:
    """``TrapFrame`` of the KCALLOUT_FRAME (_KEXCEPTION_FRAME; typed ULONG64) at ``address``."""
    if not address:
        return None
    try:
        frame = kernel.object(object_type="_KEXCEPTION_FRAME", offset=address, absolute=True)
        return int(frame.TrapFrame)
    except exceptions.InvalidAddressException:
        return None


def kernel_levels(
    kernel: interfaces.context.ModuleInterface, chain: SegmentChain
) -> list[KernelLevel]:
    """Per-level kernel facts, outermost (level 1) first; empty unless the chain is complete."""
    if not chain.complete:
        return []
    size = trap_frame.trap_frame_size(kernel)
    outermost_first = list(reversed(chain.segments))  # base, level 1, ..., level N
    levels: list[KernelLevel] = []
    for index in range(1, len(outermost_first)):
        segment = outermost_first[index]
        caller = outermost_first[index - 1].initial_stack - size
        levels.append(
            KernelLevel(
                level=index,
                segment=segment.initial_stack,
                caller_trap_frame=caller,
                trap_frame=trap_frame.read_trap_frame(kernel, caller),
                kcallout_frame=segment.previous_kernel_stack,
                kcallout_trap_frame=read_kcallout_trap_frame(kernel, segment.previous_kernel_stack),
            )
        )
    return levels


@dataclass(frozen=True)
class KernelStack:
    """What the kernel stacks of one thread say.

    ``current_trap_frame`` is the address of T(K), the trap frame of the newest segment
    (``InitialStack - sizeof(_KTRAP_FRAME)``, the rule PspGetBaseTrapFrame follows); None when
    the stack is not resident.  ``levels`` (outermost first) only when the chain is readable.
    """

    status: findings.KernelStackStatus
    current_trap_frame: int | None = None
    levels: tuple[KernelLevel, ...] = ()


def read_kernel_stack(
    kernel: interfaces.context.ModuleInterface,
    initial_stack: int | None,
    resident: bool | None,
) -> KernelStack:
    """Walks the thread's kernel stack segments unless the kernel says they are swapped out.

    ``resident`` is KTHREAD.KernelStackResident (None when the table has no such bit).  A
    swapped-out stack is not read at all: its physical pages may already belong to someone
    else, so what they hold now is not this thread's.
    """
    if resident is False or not initial_stack:
        return KernelStack(findings.KernelStackStatus.NOT_RESIDENT)
    chain = walk_segments(kernel, initial_stack)
    if not chain.segments:
        return KernelStack(findings.KernelStackStatus.NOT_RESIDENT)
    current = chain.segments[0].initial_stack - trap_frame.trap_frame_size(kernel)
    if not chain.complete:
        return KernelStack(findings.KernelStackStatus.BROKEN, current)
    return KernelStack(
        findings.KernelStackStatus.READABLE, current, tuple(kernel_levels(kernel, chain))
    )
