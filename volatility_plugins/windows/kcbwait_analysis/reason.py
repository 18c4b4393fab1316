"""The Reason and Notes texts of docs/output-contract.md, and which threads a mode lists.

Notes say what the analysis could not establish: ``unreadable: X`` when memory could not be read
(paged out, never captured, truncated image), ``invalid: X`` when it was read but cannot be
true (inverted stack bounds, a null or out-of-range table index, a corrupt export directory).
"""

from collections.abc import Iterable

AT_RETURN = "at-return"
IN_CALLBACK = "in-callback"
NONE = "none"
CALLBACK = "callback"

NO_USER_TRAP_FRAME = "no user-mode trap frame"
NOTE_SEPARATOR = "; "

# What an "unreadable: X" note may name, in the order notes are emitted.
UNREADABLE_TRAP_FRAME = "trap frame"
UNREADABLE_TEB = "TEB"
UNREADABLE_USER_STACK = "user stack"
UNREADABLE_CALLBACK_TABLE = "KernelCallbackTable"
UNREADABLE_NTDLL_EXPORTS = "ntdll exports"
UNREADABLE_KERNEL_STACK = "kernel stack"
UNREADABLE_ORDER = (
    UNREADABLE_TRAP_FRAME,
    UNREADABLE_TEB,
    UNREADABLE_USER_STACK,
    UNREADABLE_CALLBACK_TABLE,
    UNREADABLE_NTDLL_EXPORTS,
    UNREADABLE_KERNEL_STACK,
)

# What an "invalid: X" note may name, in the order notes are emitted.
INVALID_STACK_BOUNDS = "TEB stack bounds"
INVALID_RSP = "Rsp outside the TEB stack"
INVALID_CALLBACK_TABLE = "KernelCallbackTable"
INVALID_API_NUMBER = "ApiNumber"
INVALID_NTDLL_EXPORTS = "ntdll exports"
INVALID_ORDER = (
    INVALID_STACK_BOUNDS,
    INVALID_RSP,
    INVALID_CALLBACK_TABLE,
    INVALID_API_NUMBER,
    INVALID_NTDLL_EXPORTS,
)


def is_in_callback(nesting_level: int | None, frames_found: int) -> bool:
    """``in-callback``: CallbackNestingLevel > 0 or at least one callback frame was found."""
    return bool(nesting_level) or frames_found > 0


def thread_reason(at_return: bool, in_callback: bool) -> str:
    """``at-return``, ``in-callback``, ``at-return+in-callback`` or ``none``."""
    if at_return and in_callback:
        return f"{AT_RETURN}+{IN_CALLBACK}"
    if at_return:
        return AT_RETURN
    if in_callback:
        return IN_CALLBACK
    return NONE


def _ordered_notes(prefix: str, items: Iterable[str], order: tuple[str, ...]) -> list[str]:
    wanted = set(items)
    ordered = [item for item in order if item in wanted]
    ordered += sorted(wanted.difference(order))
    return [f"{prefix}: {item}" for item in ordered]


def unreadable_notes(unreadable: Iterable[str]) -> list[str]:
    """``unreadable: X`` notes in contract order, each at most once."""
    return _ordered_notes("unreadable", unreadable, UNREADABLE_ORDER)


def invalid_notes(invalid: Iterable[str]) -> list[str]:
    """``invalid: X`` notes in contract order, each at most once."""
    return _ordered_notes("invalid", invalid, INVALID_ORDER)


def foreign_thread_note(owner_pid: int | None, owner_address: int) -> str:
    """The note of a thread found in one process's thread list whose KTHREAD.Process names
    another process (the owner's PID when that process is listed, else its address)."""
    if owner_pid is not None:
        return f"mismatch: KTHREAD.Process is PID {owner_pid}"
    return f"mismatch: KTHREAD.Process {owner_address:#x} is not a listed process"


def thread_notes(
    user_trap_frame: bool,
    frames_found: int,
    nesting_level: int | None,
    unreadable: Iterable[str],
    invalid: Iterable[str] = (),
    foreign: str | None = None,
) -> str:
    """The thread row's Notes: facts joined with ``; `` in contract order, or ``""``."""
    notes = [foreign] if foreign else []
    if not user_trap_frame:
        notes.append(NO_USER_TRAP_FRAME)
    if nesting_level is not None and frames_found != nesting_level:
        notes.append(
            f"callback frames found: {frames_found}, CallbackNestingLevel: {nesting_level}"
        )
    notes.extend(unreadable_notes(unreadable))
    notes.extend(invalid_notes(invalid))
    return NOTE_SEPARATOR.join(notes)


def callback_notes(unreadable: Iterable[str], invalid: Iterable[str] = ()) -> str:
    """A callback row's Notes: ``unreadable: X`` then ``invalid: X`` facts about that level."""
    return NOTE_SEPARATOR.join(unreadable_notes(unreadable) + invalid_notes(invalid))


def is_listed(reason: str, all_threads: bool, at_return_only: bool) -> bool:
    """Which threads a mode lists (--pid/--tid narrowing is applied separately).

    ``--at-return-only`` takes precedence over ``--all-threads`` when both are given.
    """
    if at_return_only:
        return AT_RETURN in reason
    if all_threads:
        return True
    return reason != NONE
