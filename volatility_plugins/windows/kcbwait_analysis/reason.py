"""The Reason and Notes texts of docs/output-contract.md, and which threads a mode lists."""

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


def unreadable_notes(unreadable: Iterable[str]) -> list:
    """``unreadable: X`` notes in contract order, each at most once."""
    wanted = set(unreadable)
    ordered = [item for item in UNREADABLE_ORDER if item in wanted]
    ordered += sorted(wanted.difference(UNREADABLE_ORDER))
    return [f"unreadable: {item}" for item in ordered]


def thread_notes(
    user_trap_frame: bool,
    frames_found: int,
    nesting_level: int | None,
    unreadable: Iterable[str],
) -> str:
    """The thread row's Notes: facts joined with ``; `` in contract order, or ``""``."""
    notes = []
    if not user_trap_frame:
        notes.append(NO_USER_TRAP_FRAME)
    if nesting_level is not None and frames_found != nesting_level:
        notes.append(
            f"callback frames found: {frames_found}, CallbackNestingLevel: {nesting_level}"
        )
    notes.extend(unreadable_notes(unreadable))
    return NOTE_SEPARATOR.join(notes)


def callback_notes(unreadable: Iterable[str]) -> str:
    """A callback row's Notes: only ``unreadable: X`` facts about that level."""
    return NOTE_SEPARATOR.join(unreadable_notes(unreadable))


def is_listed(reason: str, all_threads: bool, at_return_only: bool) -> bool:
    """Which threads a mode lists (--pid/--tid narrowing is applied separately).

    ``--at-return-only`` takes precedence over ``--all-threads`` when both are given.
    """
    if at_return_only:
        return AT_RETURN in reason
    if all_threads:
        return True
    return reason != NONE
