"""What the analysis concludes about a thread and its callback levels, as values.

Reasons, KernelSide verdicts and notes are enums and small dataclasses here; the words of
docs/output-contract.md are given to them only where rows are rendered (``wording.py``), so
another plugin or a batch consumer can use the verdicts without parsing text.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Union


class Unreadable(enum.Enum):
    """What memory could not be read; declaration order is the contract's note order."""

    TRAP_FRAME = 1
    TEB = 2
    USER_STACK = 3
    CALLBACK_TABLE = 4
    NTDLL_EXPORTS = 5
    KERNEL_STACK = 6


class Invalid(enum.Enum):
    """What was read but cannot be true; declaration order is the contract's note order."""

    STACK_BOUNDS = 1
    RSP_OUTSIDE_STACK = 2
    CALLBACK_TABLE = 3
    API_NUMBER = 4
    NTDLL_EXPORTS = 5


class KernelStackStatus(enum.Enum):
    """Whether the thread's kernel stack segments could be walked.

    ``NOT_RESIDENT``: KTHREAD.KernelStackResident is 0 (the memory manager swapped the stack
    out; its physical pages may already hold other data) or the _KSTACK_CONTROL at
    KTHREAD.InitialStack is unreadable.  ``BROKEN``: the first segment was read but the chain
    does not reach the thread's original stack.
    """

    READABLE = "readable"
    NOT_RESIDENT = "not resident"
    BROKEN = "broken"


class Verdict(enum.Enum):
    """KernelSide: both sides agree, they disagree on what both could read, or one side
    could not be read (never reported as a disagreement)."""

    AGREES = "agrees"
    MISMATCH = "mismatch"
    UNREADABLE = "unreadable"


class UnreadableSide(enum.Enum):
    """Which side made a level's KernelSide unreadable."""

    USER_STACK = 1
    KERNEL_STACK = 2
    KERNEL_STACK_NOT_RESIDENT = 3


@dataclass(frozen=True)
class FrameOutsideStack:
    """The kernel's Frame(k) = T(k-1).Rsp lies outside the TEB's stack bounds."""

    frame: int


@dataclass(frozen=True)
class NotAFrame:
    """The bytes at Frame(k) fail the structure every UCALLOUT_FRAME has."""

    frame: int


@dataclass(frozen=True)
class RipDiffers:
    """KeUserModeCallback copied T(k-1).Rip into MachineFrame.Rip; these differ."""

    trap_frame_rip: int
    machine_frame_rip: int


@dataclass(frozen=True)
class KcalloutTrapFrameDiffers:
    """KiCallUserMode saved the current trap frame's address in the KCALLOUT_FRAME."""

    kcallout_trap_frame: int
    trap_frame: int


Difference = Union[FrameOutsideStack, NotAFrame, RipDiffers, KcalloutTrapFrameDiffers]


@dataclass(frozen=True)
class KernelSide:
    """The verdict on one level (or, summarised, on a thread)."""

    verdict: Verdict
    differences: tuple[Difference, ...] = ()
    unreadable: UnreadableSide | None = None

    @classmethod
    def agrees(cls) -> KernelSide:
        return cls(Verdict.AGREES)

    @classmethod
    def mismatch(cls, differences: tuple[Difference, ...] = ()) -> KernelSide:
        return cls(Verdict.MISMATCH, differences)

    @classmethod
    def unreadable_by(cls, side: UnreadableSide) -> KernelSide:
        return cls(Verdict.UNREADABLE, (), side)


def stack_unreadable_side(status: KernelStackStatus) -> UnreadableSide:
    """The unreadable side of a thread whose kernel stack could not be walked."""
    if status is KernelStackStatus.NOT_RESIDENT:
        return UnreadableSide.KERNEL_STACK_NOT_RESIDENT
    return UnreadableSide.KERNEL_STACK


def thread_kernel_side(
    levels: tuple[KernelSide, ...], in_callback: bool, status: KernelStackStatus
) -> KernelSide | None:
    """The thread row's KernelSide (docs/output-contract.md, "KernelSide: three values")."""
    if not levels:
        if in_callback and status is not KernelStackStatus.READABLE:
            return KernelSide.unreadable_by(stack_unreadable_side(status))
        return None
    if any(side.verdict is Verdict.MISMATCH for side in levels):
        return KernelSide.mismatch()
    for side in levels:
        if side.verdict is Verdict.UNREADABLE:
            return side
    return KernelSide.agrees()


@dataclass(frozen=True)
class Reason:
    """Why a thread is listed: its trap frame rests in NtCallbackReturn/ZwCallbackReturn
    (``at_return``) and/or it is inside kernel-to-user callbacks (``in_callback``)."""

    at_return: bool = False
    in_callback: bool = False

    @property
    def none(self) -> bool:
        return not (self.at_return or self.in_callback)


class ListingMode(enum.Enum):
    """Which threads a run lists (--pid/--tid narrow each of them)."""

    DEFAULT = "default"
    AT_RETURN_ONLY = "at-return-only"
    ALL_THREADS = "all-threads"

    @classmethod
    def from_options(cls, all_threads: bool, at_return_only: bool) -> ListingMode:
        """--at-return-only takes precedence over --all-threads when both are given."""
        if at_return_only:
            return cls.AT_RETURN_ONLY
        if all_threads:
            return cls.ALL_THREADS
        return cls.DEFAULT

    def lists(self, reason: Reason) -> bool:
        if self is ListingMode.AT_RETURN_ONLY:
            return reason.at_return
        if self is ListingMode.ALL_THREADS:
            return True
        return not reason.none


@dataclass(frozen=True)
class ForeignThread:
    """The thread sits in one process's list but KTHREAD.Process names another: the owner's
    PID when that process is listed, else only its EPROCESS address."""

    owner_pid: int | None
    owner_address: int


@dataclass(frozen=True)
class CountDiffers:
    """A count the analysis found differs from KTHREAD.CallbackNestingLevel."""

    found: int
    nesting_level: int


@dataclass(frozen=True)
class LevelNotes:
    """Facts about one callback level."""

    return_address: int | None = None
    """The qword below the frame when it is not a return into KiUserCallbackDispatcher."""
    unreadable: frozenset[Unreadable] = frozenset()
    invalid: frozenset[Invalid] = frozenset()


@dataclass(frozen=True)
class ThreadNotes:
    """Facts about one thread, each rendered as one note of the contract."""

    foreign: ForeignThread | None = None
    instrumentation_callback: tuple[int, object] | None = None
    """(KPROCESS.InstrumentationCallback, where it points: a callback_table.Where)."""
    kernel_stack_not_resident: bool = False
    no_user_trap_frame: bool = False
    trap_frame_differs: int | None = None
    """KTHREAD.TrapFrame when it is not T(K), the current segment's trap frame."""
    kernel_levels: CountDiffers | None = None
    frames_found: CountDiffers | None = None
    return_addresses: tuple[int, ...] = ()
    unreadable: frozenset[Unreadable] = frozenset()
    invalid: frozenset[Invalid] = frozenset()
