"""What windows.kcbwait must report for a thread, from what the builder laid out and damaged.

``ThreadExpectation`` holds the builder's own facts about one thread after damage (which trap
frame the kernel points at, whether the TEB and user stack can be read, which UCALLOUT_FRAMEs
stay structurally sound); ``thread_record`` turns them into the truth record by the rules of
docs/output-contract.md.  Nothing here reads the image back: every value is one the builder
chose when it wrote the bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from imagebuilder import truth
from imagebuilder.thread_layout import FrameFact
from imagebuilder.user_modules import ModuleImage

# docs/output-contract.md, "Notes": the order of "unreadable: X" and "invalid: X" items.
UNREADABLE_ORDER = (
    "trap frame",
    "TEB",
    "user stack",
    "KernelCallbackTable",
    "ntdll exports",
    "kernel stack",
)
INVALID_ORDER = (
    "TEB stack bounds",
    "Rsp outside the TEB stack",
    "KernelCallbackTable",
    "ApiNumber",
    "ntdll exports",
)
NO_USER_TRAP_FRAME = "no user-mode trap frame"

HandlerLookup = Callable[[int], tuple[int | None, str | None, str | None]]
"""ApiNumber -> (handler, unreadable item, invalid item) for a thread's process."""


@dataclass
class ThreadExpectation:
    """One user thread's facts after damage.  ``frames`` are the levels laid out (outermost
    first); the kernel's segment chain always holds exactly that many levels."""

    pid: int
    tid: int
    process: str
    wow64: bool
    state: str
    wait_reason: str
    nesting: int
    rip: int
    rsp: int
    frames: list[FrameFact]
    trap_frame: str = "user"  # "user", "none" (null or kernel-mode) or "unreadable"
    teb: str = "ok"  # "ok", "unreadable" or "invalid" (bounds)
    rsp_outside: bool = False
    stack_paged_out: bool = False
    outer_frame_broken: bool = False
    api_numbers: dict[int, int] = field(default_factory=dict)  # level -> ApiNumber written
    foreign: str | None = None


@dataclass(frozen=True)
class ImageFacts:
    """Per-image facts every thread record needs."""

    stub: tuple[int, int] | None  # callback-return stub range, None if exports unusable
    ntdll_problem: str | None  # None, "unreadable" or "invalid"


def ordered(prefix: str, items: list[str], order: tuple[str, ...]) -> list[str]:
    wanted = set(items)
    return [f"{prefix}: {item}" for item in order if item in wanted]


def notes(
    *,
    foreign: str | None,
    user_trap_frame: bool,
    found: int | None,
    nesting: int,
    unreadable: list[str],
    invalid: list[str],
) -> str:
    parts = [foreign] if foreign else []
    if not user_trap_frame:
        parts.append(NO_USER_TRAP_FRAME)
    if found is not None and found != nesting:
        parts.append(f"callback frames found: {found}, CallbackNestingLevel: {nesting}")
    parts += ordered("unreadable", unreadable, UNREADABLE_ORDER)
    parts += ordered("invalid", invalid, INVALID_ORDER)
    return "; ".join(parts)


def _found_frames(exp: ThreadExpectation) -> list[FrameFact]:
    """The frames the user-stack scan finds (contract: a scan starting in unmapped memory or
    over a paged-out stack finds none; a structurally broken outermost frame is skipped)."""
    if exp.rsp_outside or exp.stack_paged_out:
        return []
    found = list(exp.frames)
    if exp.outer_frame_broken and found:
        found = found[1:]
    return found


def thread_record(
    exp: ThreadExpectation,
    image: ImageFacts,
    modules: list[ModuleImage],
    handler: HandlerLookup,
) -> dict[str, Any]:
    """The truth record of a user thread (docs/output-contract.md)."""
    unreadable: list[str] = []
    invalid: list[str] = []
    user = exp.trap_frame == "user"
    if exp.trap_frame == "unreadable":
        unreadable.append("trap frame")
    frames: list[dict[str, Any]] = []
    found: list[FrameFact] = []
    if user:
        if image.ntdll_problem:
            (unreadable if image.ntdll_problem == "unreadable" else invalid).append("ntdll exports")
        if exp.teb == "unreadable":
            unreadable.append("TEB")
        elif exp.teb == "invalid":
            invalid.append("TEB stack bounds")
        elif exp.rsp_outside:
            invalid.append("Rsp outside the TEB stack")
        if exp.stack_paged_out:
            unreadable.append("user stack")
        found = _found_frames(exp)
        first = len(exp.frames) - len(found) + 1
        for index, fact in enumerate(found):
            api = exp.api_numbers.get(fact.level, fact.api)
            value, level_unreadable, level_invalid = handler(api)
            record = truth.frame_record(
                level=first + index,
                rip=fact.rip,
                rsp=fact.rsp,
                frame=fact.frame,
                api=api,
                handler=value,
                buffer=fact.buffer,
                length=fact.length,
                modules=modules,
            )
            record["notes"] = "; ".join(
                ordered(
                    "unreadable", [level_unreadable] if level_unreadable else [], UNREADABLE_ORDER
                )
                + ordered("invalid", [level_invalid] if level_invalid else [], INVALID_ORDER)
            )
            if level_unreadable:
                unreadable.append(level_unreadable)
            if level_invalid:
                invalid.append(level_invalid)
            frames.append(record)
    rip = exp.rip if user else None
    at_return = rip is not None and image.stub is not None and image.stub[0] <= rip < image.stub[1]
    in_callback = exp.nesting > 0 or bool(frames)
    return {
        "pid": exp.pid,
        "tid": exp.tid,
        "process": exp.process,
        "wow64": exp.wow64,
        "reason": truth.reason(at_return, in_callback),
        "state": exp.state,
        "wait_reason": exp.wait_reason,
        "nesting_level": exp.nesting,
        "rip": rip,
        "symbol": truth.symbolize(rip, modules),
        "rsp": exp.rsp if user else None,
        "kernel_side": ("agrees" if frames else None),
        "notes": notes(
            foreign=exp.foreign,
            user_trap_frame=user,
            found=len(found),
            nesting=exp.nesting,
            unreadable=unreadable,
            invalid=invalid,
        ),
        "frames": frames,
    }
