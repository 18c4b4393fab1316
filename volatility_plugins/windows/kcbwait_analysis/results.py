"""Plain result records of the analysis; the plugin only turns these into TreeGrid rows.

``None`` marks an absent value; a field named in ``unreadable`` was absent because memory could
not be read (rendered as UnreadableValue rather than NotApplicableValue).
"""

from dataclasses import dataclass, field

from volatility3.plugins.windows.kcbwait_analysis import user_callout


@dataclass(frozen=True)
class CallbackResult:
    """One callback row: a UCALLOUT_FRAME found on the user stack (level 1 = outermost)."""

    level: int
    frame: user_callout.UcalloutFrame
    symbol: str | None
    handler: int | None
    handler_symbol: str | None
    kernel_side: str
    notes: str
    unreadable: frozenset[str] = frozenset()

    @property
    def rip(self) -> int:
        """MachineFrame.Rip: the system call this callback interrupted."""
        return self.frame.rip

    @property
    def rsp(self) -> int:
        return self.frame.rsp


@dataclass(frozen=True)
class ProcessSummary:
    """The process columns repeated on every row of its threads."""

    pid: int | None
    name: str | None
    wow64: bool | None
    unreadable: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ThreadResult:
    """One thread row and its callback rows."""

    process: ProcessSummary
    tid: int | None
    reason: str
    state: str | None
    wait_reason: str | None
    nesting_level: int | None
    rip: int | None
    symbol: str | None
    rsp: int | None
    kernel_side: str | None
    notes: str
    callbacks: tuple[CallbackResult, ...] = ()
    unreadable: frozenset[str] = field(default_factory=frozenset)
