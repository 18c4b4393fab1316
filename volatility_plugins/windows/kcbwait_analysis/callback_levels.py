"""A thread's callback levels: from the kernel's chain first, the user stack only as the check.

KeUserModeCallback rewrote ``Rsp`` of the trap frame T(k-1) that was current when callout k
started to the address of that level's UCALLOUT_FRAME, copied T(k-1)'s Rip into the frame's
MachineFrame, and KiCallUserMode saved T(k-1)'s address in the KCALLOUT_FRAME it left on the
kernel stack (callback-machinery.md, steps 2-3).  So the kernel says exactly where each level's
frame is, and a level is read at that address and checked there: a stale frame elsewhere on the
stack (a callback that has returned leaves its frame in live stack memory) is never a level,
and a frame whose page is paged out keeps its level number.  Only when the kernel stack cannot
be read do the levels come from the user-stack scan (``user_callout.scan_callout_frames``), and
then they are numbered only when their count is the kernel's own CallbackNestingLevel.
docs/output-contract.md, "How callback levels are found", states every rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from volatility3.plugins.windows.kcbwait_analysis import (
    findings,
    kernel_callout,
    trap_frame,
    user_callout,
)


@dataclass(frozen=True)
class Level:
    """One callback level as the analysis established it.

    ``frame_address`` is where the level's UCALLOUT_FRAME is (None when not even the kernel
    could say); ``frame`` its decoded bytes (None when unreadable); ``rip`` the system call it
    interrupted (MachineFrame.Rip, or the kernel's T(k-1).Rip when the frame is unreadable).
    ``is_frame`` counts the level in "callback frames found".
    """

    number: int | None
    frame_address: int | None
    frame: user_callout.UcalloutFrame | None
    rip: int | None
    kernel_side: findings.KernelSide
    is_frame: bool
    return_outside_dispatcher: int | None = None
    unreadable: frozenset[findings.Unreadable] = frozenset()
    caller: trap_frame.TrapFrame | None = None
    """T(k-1), the trap frame this level's callout started from (kernel levels only)."""


def _return_outside(
    frame: user_callout.UcalloutFrame, is_return: user_callout.ReturnCheck
) -> int | None:
    """The qword below the frame when it is known not to return into the dispatcher.

    A hook on KiUserCallbackDispatcher (an EDR's or a rootkit's) moves this return address, so
    it is a note and never a condition for the level.
    """
    if frame.return_address is None or is_return(frame.return_address) is not False:
        return None
    return frame.return_address


def level_from_kernel(
    kernel_level: kernel_callout.KernelLevel,
    frame: user_callout.UcalloutFrame | None,
    bounds: user_callout.StackBounds | None,
    is_return: user_callout.ReturnCheck,
) -> Level:
    """Level k from T(k-1), checked against the frame read at T(k-1).Rsp (``frame``)."""
    caller = kernel_level.trap_frame
    if caller is None:
        return Level(
            number=kernel_level.level,
            frame_address=None,
            frame=None,
            rip=None,
            kernel_side=findings.KernelSide.unreadable_by(findings.UnreadableSide.KERNEL_STACK),
            is_frame=False,
            unreadable=frozenset({findings.Unreadable.KERNEL_STACK}),
        )
    address = caller.rsp
    differences: list[findings.Difference] = []
    unreadable = set()
    if bounds is not None and not bounds.contains_range(
        address, address + user_callout.UCALLOUT_FRAME_SIZE
    ):
        differences.append(findings.FrameOutsideStack(address))
    is_frame = False
    if frame is None:
        unreadable.add(findings.Unreadable.USER_STACK)
    else:
        is_frame = user_callout.is_ucallout_frame(frame, bounds.high if bounds else None)
        if not is_frame:
            differences.append(findings.NotAFrame(address))
        if frame.rip != caller.rip:
            differences.append(findings.RipDiffers(caller.rip, frame.rip))
    if kernel_level.kcallout_trap_frame is None:
        unreadable.add(findings.Unreadable.KERNEL_STACK)
    elif kernel_level.kcallout_trap_frame != kernel_level.caller_trap_frame:
        differences.append(
            findings.KcalloutTrapFrameDiffers(
                kernel_level.kcallout_trap_frame, kernel_level.caller_trap_frame
            )
        )
    if differences:
        side = findings.KernelSide.mismatch(tuple(differences))
    elif frame is None:
        side = findings.KernelSide.unreadable_by(findings.UnreadableSide.USER_STACK)
    elif kernel_level.kcallout_trap_frame is None:
        side = findings.KernelSide.unreadable_by(findings.UnreadableSide.KERNEL_STACK)
    else:
        side = findings.KernelSide.agrees()
    return Level(
        number=kernel_level.level,
        frame_address=address,
        frame=frame,
        rip=frame.rip if frame is not None else caller.rip,
        kernel_side=side,
        is_frame=is_frame,
        return_outside_dispatcher=_return_outside(frame, is_return) if frame else None,
        unreadable=frozenset(unreadable),
        caller=caller,
    )


def levels_from_scan(
    frames: Sequence[user_callout.UcalloutFrame],
    nesting_level: int | None,
    status: findings.KernelStackStatus,
) -> tuple[Level, ...]:
    """Levels from the fallback scan (outermost first).

    Numbered 1..N only when the scan found exactly CallbackNestingLevel frames: otherwise a
    stale frame may be among them, and without the kernel's chain which one cannot be told.
    """
    numbered = nesting_level is not None and len(frames) == nesting_level
    side = findings.KernelSide.unreadable_by(findings.stack_unreadable_side(status))
    return tuple(
        Level(
            number=index if numbered else None,
            frame_address=frame.address,
            frame=frame,
            rip=frame.rip,
            kernel_side=side,
            is_frame=True,
        )
        for index, frame in enumerate(frames, start=1)
    )
