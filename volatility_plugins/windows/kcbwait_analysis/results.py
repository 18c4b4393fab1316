"""Plain result records of the analysis; the plugin only turns these into TreeGrid rows.

``None`` marks an absent value; a ``Field`` in ``unreadable`` was absent because memory could
not be read (rendered as UnreadableValue rather than NotApplicableValue).  Verdicts and notes
are the values of ``findings.py``; ``wording.py`` gives them the contract's words.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from volatility3.plugins.windows.kcbwait_analysis import (
    callback_levels,
    callback_table,
    findings,
    stack_walk,
)


class Field(enum.Enum):
    """A value of a result that memory may have kept from being read."""

    PID = enum.auto()
    PROCESS = enum.auto()
    WOW64 = enum.auto()
    TID = enum.auto()
    STATE = enum.auto()
    WAIT_REASON = enum.auto()
    NESTING_LEVEL = enum.auto()
    FRAME_RSP = enum.auto()
    API_NUMBER = enum.auto()
    HANDLER = enum.auto()
    HANDLER_SYMBOL = enum.auto()
    BUFFER = enum.auto()
    LENGTH = enum.auto()


# What a level loses when its UCALLOUT_FRAME cannot be read.
FRAME_FIELDS = frozenset(
    {
        Field.FRAME_RSP,
        Field.API_NUMBER,
        Field.HANDLER,
        Field.HANDLER_SYMBOL,
        Field.BUFFER,
        Field.LENGTH,
    }
)


@dataclass(frozen=True)
class CallbackResult:
    """One callback row: a level the kernel (or, without it, the user-stack scan) names."""

    level: callback_levels.Level
    symbol: str | None
    handler: int | None
    handler_symbol: str | None
    notes: findings.LevelNotes
    unreadable: frozenset[Field] = frozenset()
    """Values absent because memory could not be read."""
    callback: str | None = None
    """The PDB name of user32's original table entry for this ApiNumber."""
    table: callback_table.TableVerdict | None = None
    """This level's table entry: in the owner's code, or hijacked."""

    @property
    def number(self) -> int | None:
        """1 = outermost; None for a fallback frame whose level is uncertain."""
        return self.level.number

    @property
    def kernel_side(self) -> findings.KernelSide:
        return self.level.kernel_side


@dataclass(frozen=True)
class ProcessSummary:
    """The process columns repeated on every row of its threads."""

    pid: int | None
    name: str | None
    wow64: bool | None
    unreadable: frozenset[Field] = frozenset()


@dataclass(frozen=True)
class ThreadResult:
    """One thread row and its callback rows."""

    process: ProcessSummary
    tid: int | None
    reason: findings.Reason
    state: str | None
    wait_reason: str | None
    nesting_level: int | None
    rip: int | None
    symbol: str | None
    rsp: int | None
    kernel_side: findings.KernelSide | None
    notes: findings.ThreadNotes
    kernel_stack: findings.KernelStackStatus = findings.KernelStackStatus.READABLE
    callbacks: tuple[CallbackResult, ...] = ()
    unreadable: frozenset[Field] = field(default_factory=frozenset)
    table: callback_table.TableVerdict | None = None
    """The process's table and the entries this thread's levels use."""
    stack: tuple[stack_walk.StackFrame, ...] | None = None
    """The user-mode call stack (windows.kcbstack), when it was asked for."""
