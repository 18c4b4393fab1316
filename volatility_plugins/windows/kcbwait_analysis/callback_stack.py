"""Pairs the user-side UCALLOUT_FRAMEs with the kernel-side callout levels.

docs/output-contract.md, "KernelSide per level k": the callout of level k was started from trap
frame T(k-1); the two sides agree when ``T(k-1).Rsp == Frame(k)`` (KeUserModeCallback rewrote the
trap frame's Rsp to the frame), ``T(k-1).Rip == MachineFrame(k).Rip`` (it copied the trap frame's
Rip into the frame) and level k's KCALLOUT_FRAME.TrapFrame == the address of T(k-1)
(callback-machinery.md, steps 2-3).  Both sides number levels from the outermost (1).
"""

from collections.abc import Sequence

from volatility3.plugins.windows.kcbwait_analysis import kernel_callout, user_callout

AGREES = "agrees"
MISMATCH = "mismatch"
# T(k-1) and the KCALLOUT_FRAME both live on kernel stacks, so any kernel-side read failure is
# reported with the contract's "kernel stack" wording ("trap frame" names KTHREAD.TrapFrame).
UNREADABLE_KERNEL_STACK = "unreadable: kernel stack"
NO_KERNEL_LEVEL = "mismatch: no kernel callout stack for this level"


def compare_level(
    frame: user_callout.UcalloutFrame, level: kernel_callout.KernelLevel | None
) -> str:
    """The KernelSide text for one level: ``agrees``, ``mismatch: ...`` or ``unreadable: ...``.

    ``level`` is None when the kernel's (fully read) segment chain has no callout at this level.
    """
    if level is None:
        return NO_KERNEL_LEVEL
    differences = []
    caller = level.trap_frame
    if caller is None:
        return UNREADABLE_KERNEL_STACK
    if caller.rsp != frame.address:
        differences.append(f"trap frame Rsp {caller.rsp:#x} != Frame {frame.address:#x}")
    if caller.rip != frame.rip:
        differences.append(f"trap frame Rip {caller.rip:#x} != MachineFrame.Rip {frame.rip:#x}")
    if level.kcallout_trap_frame is None:
        if not differences:
            return UNREADABLE_KERNEL_STACK
    elif level.kcallout_trap_frame != level.caller_trap_frame:
        differences.append(
            f"KCALLOUT_FRAME.TrapFrame {level.kcallout_trap_frame:#x}"
            f" != trap frame {level.caller_trap_frame:#x}"
        )
    if differences:
        return f"{MISMATCH}: " + ", ".join(differences)
    return AGREES


def first_level(frames_found: int, chain: kernel_callout.SegmentChain | None) -> int:
    """The level number of the outermost frame found (see the module docstring)."""
    if chain is not None and chain.complete and frames_found <= chain.callout_count:
        return chain.callout_count - frames_found + 1
    return 1


def compare_levels(
    frames: Sequence[user_callout.UcalloutFrame],
    chain: kernel_callout.SegmentChain | None,
    levels: Sequence[kernel_callout.KernelLevel],
    first: int = 1,
) -> list[str]:
    """KernelSide texts for ``frames`` (outermost first, numbered from ``first``) against the
    kernel ``levels`` (outermost first, numbered from 1).

    An incomplete or missing segment chain leaves every level ``unreadable: kernel stack``:
    without the original stack the outermost-first numbering of the kernel side is unknown.
    """
    if chain is None or not chain.complete:
        return [UNREADABLE_KERNEL_STACK for _ in frames]
    verdicts = []
    for index, frame in enumerate(frames):
        position = first - 1 + index
        level = levels[position] if position < len(levels) else None
        verdicts.append(compare_level(frame, level))
    return verdicts


def thread_kernel_side(verdicts: Sequence[str]) -> str | None:
    """Thread row KernelSide: None without callback frames, ``agrees`` when every level agrees,
    else ``mismatch``."""
    if not verdicts:
        return None
    if all(verdict == AGREES for verdict in verdicts):
        return AGREES
    return MISMATCH
