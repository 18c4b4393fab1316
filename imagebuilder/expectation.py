"""What windows.kcbwait must report for a thread, from what the builder laid out, damaged and
conditioned.

``ThreadExpectation`` holds the builder's own facts about one user thread after damage and
conditions: the kernel side as written (is the stack resident, T(K), every level's T(k-1) and
KCALLOUT_FRAME), the TEB bounds, and every UCALLOUT_FRAME-shaped block the builder put on the
user stack (the levels' frames, stale frames, junk where a forged Rsp points).  ``thread_record``
turns them into the truth record by the rules of docs/output-contract.md ("How callback levels
are found (kernel first)", "Notes", "KernelSide: three values").  Nothing here reads the image
back: every value is one the builder chose when it wrote the bytes; whether a page can be read
is asked of the builder's own page tables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from imagebuilder import truth
from imagebuilder.process_symbols import ProcessSymbols

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
NOT_RESIDENT = "kernel stack not resident"
UCALLOUT_FRAME_SIZE = 0x58  # x64 UCALLOUT_FRAME (ReactOS ketypes.h)
# docs/output-contract.md: TEB bounds more than 1 GiB apart, or outside user space, are invalid.
MAX_STACK_SPAN = 1 << 30
USER_SPACE_END = 0x0000_8000_0000_0000
# The fallback scan covers at most 2 MiB and follows at most 32 frames.
SCAN_LIMIT = 0x200 * 0x1000
MAX_FALLBACK_FRAMES = 32

HandlerLookup = Callable[[int], tuple[int | None, str | None, str | None]]
"""ApiNumber -> (handler, unreadable item, invalid item) for a thread's process."""
Readable = Callable[[int, int], bool]
"""(address, size) -> every byte mapped in the thread's process."""


@dataclass(frozen=True)
class UserFrame:
    """The 0x58 bytes at ``address`` read as a UCALLOUT_FRAME, and the qword below them, as
    the builder wrote them (a real level's frame, a stale one, or junk)."""

    address: int
    api: int
    buffer: int
    length: int
    rip: int  # MachineFrame.Rip
    rsp: int  # MachineFrame.Rsp
    return_address: int  # the qword at address - 8


@dataclass
class KernelLevel:
    """Callout level k as the kernel stack records it."""

    level: int
    trap_frame: int  # address of T(k-1)
    trap_rip: int  # T(k-1).Rip
    frame: int  # T(k-1).Rsp: where the level's UCALLOUT_FRAME is
    callout_trap_frame: int  # KCALLOUT_FRAME(k).TrapFrame


@dataclass
class ThreadExpectation:
    """One user thread's facts after damage and conditions."""

    pid: int
    tid: int
    process: str
    wow64: bool
    state: str
    wait_reason: str
    nesting: int  # KTHREAD.CallbackNestingLevel as written
    trap_frame: int  # address of T(K)
    kthread_trap_frame: int  # KTHREAD.TrapFrame as written
    rip: int  # T(K).Rip
    rsp: int  # T(K).Rsp
    stack_limit: int  # TEB NtTib.StackLimit as written
    stack_base: int  # TEB NtTib.StackBase as written
    levels: list[KernelLevel]
    readable: Readable
    teb_readable: Callable[[], bool]
    # Every UCALLOUT_FRAME-shaped block written on the user stack, by address.
    user_frames: dict[int, UserFrame] = field(default_factory=dict)
    resident: bool = True  # KTHREAD.KernelStackResident and the stack pages present
    user_mode: bool = True  # T(K).SegCs has RPL 3
    foreign: str | None = None
    instrumentation: str | None = None  # the process's instrumentation-callback note

    def frame_at(self, address: int) -> UserFrame | None:
        """What the plugin reads at ``address`` (None: unreadable)."""
        if not self.readable(address, UCALLOUT_FRAME_SIZE):
            return None
        found = self.user_frames.get(address)
        # The builder never leaves a readable frame whose return slot is unreadable (the
        # contract does not say what that would show), nor bytes it cannot decode.
        assert found is not None, f"thread {self.tid}: no known frame at {address:#x}"
        assert self.readable(address - 8, 8), f"thread {self.tid}: return slot unreadable"
        return found


@dataclass(frozen=True)
class ImageFacts:
    """Per-image facts every thread record needs."""

    stub: tuple[int, int] | None  # callback-return stub range, None if exports unusable
    ntdll_problem: str | None  # None, "unreadable" or "invalid"
    # KiUserCallbackDispatcher's RUNTIME_FUNCTION range and the kernel's
    # KiUserCallbackDispatcherReturn (0 when the kernel has none).
    dispatcher: tuple[int, int] = (0, 0)
    dispatcher_return: int = 0
    kernel_names_dispatcher: bool = True

    def in_dispatcher(self, address: int) -> bool:
        return self.dispatcher[0] <= address < self.dispatcher[1] or (
            self.dispatcher_return != 0 and address == self.dispatcher_return
        )


def ordered(prefix: str, items: list[str], order: tuple[str, ...]) -> list[str]:
    wanted = set(items)
    return [f"{prefix}: {item}" for item in order if item in wanted]


@dataclass
class _Facts:
    """Notes collected while the record is built."""

    unreadable: list[str] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)
    returns: list[str] = field(default_factory=list)


def usable_bounds(exp: ThreadExpectation) -> tuple[int, int] | None:
    limit, base = exp.stack_limit, exp.stack_base
    if limit >= base or base > USER_SPACE_END or base - limit > MAX_STACK_SPAN:
        return None
    return limit, base


def _is_ucallout_frame(user: UserFrame, bounds: tuple[int, int] | None) -> bool:
    """Check 2 of the contract."""
    if user.address % 16 or user.address + UCALLOUT_FRAME_SIZE + user.length > user.rsp:
        return False
    return bounds is None or user.rsp <= bounds[1]


def _frame_cells(
    user: UserFrame, modules: ProcessSymbols, handler: HandlerLookup, facts: _Facts
) -> tuple[dict[str, Any], list[str]]:
    """The user-side cells of a decoded frame and the level's handler notes."""
    value, unreadable, invalid = handler(user.api)
    notes = ordered("unreadable", [unreadable] if unreadable else [], UNREADABLE_ORDER)
    notes += ordered("invalid", [invalid] if invalid else [], INVALID_ORDER)
    if unreadable:
        facts.unreadable.append(unreadable)
    if invalid:
        facts.invalid.append(invalid)
    cells = {
        "rip": user.rip,
        "symbol": truth.symbolize(user.rip, modules),
        "rsp": user.rsp,
        "frame": user.address,
        "api_number": user.api,
        "handler": value,
        "handler_symbol": truth.symbolize(value, modules),
        **callback_cells(modules, user.api),
        "buffer": user.buffer,
        "length": user.length,
    }
    return cells, notes


def callback_cells(modules: ProcessSymbols, api: int | None) -> dict[str, Any]:
    """Contract "Callback": the original table entry's PDB name (null when the frame was not
    read)."""
    return {"callback": modules.callback(api)}


def _kernel_level(
    exp: ThreadExpectation,
    lv: KernelLevel,
    bounds: tuple[int, int] | None,
    image: ImageFacts,
    modules: ProcessSymbols,
    handler: HandlerLookup,
    facts: _Facts,
) -> tuple[dict[str, Any], bool]:
    """Level k's callback row (status ``readable``) and whether its frame was found."""
    user = exp.frame_at(lv.frame)
    checks: list[str] = []
    if bounds and not (bounds[0] <= lv.frame and lv.frame + UCALLOUT_FRAME_SIZE <= bounds[1]):
        checks.append(f"Frame {lv.frame:#x} outside the TEB stack")
    found = False
    notes: list[str] = []
    if user is not None:
        found = _is_ucallout_frame(user, bounds)
        if not found:
            checks.append(f"Frame {lv.frame:#x} is not a UCALLOUT_FRAME")
        if lv.trap_rip != user.rip:
            checks.append(f"trap frame Rip {lv.trap_rip:#x} != MachineFrame.Rip {user.rip:#x}")
        if not image.in_dispatcher(user.return_address):
            text = f"return address {user.return_address:#x} not in KiUserCallbackDispatcher"
            notes.append(text)
            facts.returns.append(text)
        cells, handler_notes = _frame_cells(user, modules, handler, facts)
        notes += handler_notes
    else:
        cells = {
            "rip": lv.trap_rip,
            "symbol": truth.symbolize(lv.trap_rip, modules),
            "rsp": None,
            "frame": lv.frame,
            "api_number": None,
            "handler": None,
            "handler_symbol": None,
            **callback_cells(modules, None),
            "buffer": None,
            "length": None,
        }
        notes.append("unreadable: user stack")
        facts.unreadable.append("user stack")
    if lv.callout_trap_frame != lv.trap_frame:
        checks.append(
            f"KCALLOUT_FRAME.TrapFrame {lv.callout_trap_frame:#x} != trap frame {lv.trap_frame:#x}"
        )
    if checks:
        side = "mismatch: " + ", ".join(checks)
    elif user is None:
        side = "unreadable: user stack"
    else:
        side = "agrees"
    return {"level": lv.level, **cells, "kernel_side": side, "notes": "; ".join(notes)}, found


def fallback_frames(
    exp: ThreadExpectation, bounds: tuple[int, int], start: int, image: ImageFacts
) -> list[UserFrame]:
    """The frames the plugin's fallback scan follows, innermost first (contract: "Fallback")."""
    limit, base = bounds
    end = min(base, start + SCAN_LIMIT)
    candidates = sorted(
        (
            f
            for f in exp.user_frames.values()
            if f.address % 16 == 0
            and start <= f.address - 8 < end
            and limit <= f.address - 8
            and f.address + UCALLOUT_FRAME_SIZE <= base
            and image.in_dispatcher(f.return_address)
            and _is_ucallout_frame(f, bounds)
            and exp.readable(f.address - 8, UCALLOUT_FRAME_SIZE + 8)
        ),
        key=lambda f: f.address,
    )
    chain: list[UserFrame] = []
    cursor = start
    while len(chain) < MAX_FALLBACK_FRAMES:
        following = [f for f in candidates if f.address - 8 >= cursor]
        if not following:
            break
        chain.append(following[0])
        cursor = following[0].rsp
    return chain


def _scan_meets_unreadable_page(exp: ThreadExpectation, start: int, base: int) -> bool:
    end = min(base, start + SCAN_LIMIT)
    page = start & ~0xFFF
    while page < end:
        if not exp.readable(max(page, start), 1):
            return True
        page += 0x1000
    return False


def thread_record(
    exp: ThreadExpectation,
    image: ImageFacts,
    modules: ProcessSymbols,
    handler: HandlerLookup,
) -> dict[str, Any]:
    """The truth record of a user thread (docs/output-contract.md)."""
    facts = _Facts()
    user = exp.resident and exp.user_mode  # T(K) known and a user-mode frame
    head: list[str] = [n for n in (exp.foreign, exp.instrumentation) if n]
    if not exp.resident:
        head.append(NOT_RESIDENT)
    elif not exp.user_mode:
        head.append(NO_USER_TRAP_FRAME)
    # KTHREAD.TrapFrame differs: T(K) known and another address.  A null KTHREAD.TrapFrame
    # beside a T(K) that is no user-mode frame is how a thread that never entered from user
    # mode looks (System threads): consistent, so no note (docs/output-contract.md, "Notes").
    if (
        exp.resident
        and exp.kthread_trap_frame != exp.trap_frame
        and (exp.kthread_trap_frame != 0 or exp.user_mode)
    ):
        head.append(f"KTHREAD.TrapFrame differs: {exp.kthread_trap_frame:#x}")
    if user and image.ntdll_problem:
        (facts.unreadable if image.ntdll_problem == "unreadable" else facts.invalid).append(
            "ntdll exports"
        )
    levels = exp.levels if exp.resident else []
    bounds = None
    if levels or not exp.resident:  # the TEB is read only then
        if not exp.teb_readable():
            facts.unreadable.append("TEB")
        else:
            bounds = usable_bounds(exp)
            if bounds is None:
                facts.invalid.append("TEB stack bounds")
            elif user and not bounds[0] <= exp.rsp <= bounds[1]:
                facts.invalid.append("Rsp outside the TEB stack")
    frames: list[dict[str, Any]] = []
    found = 0
    if exp.resident:
        for lv in levels:
            row, ok = _kernel_level(exp, lv, bounds, image, modules, handler, facts)
            frames.append(row)
            found += ok
        if len(levels) != exp.nesting:
            head.append(
                f"kernel callout levels: {len(levels)}, CallbackNestingLevel: {exp.nesting}"
            )
    else:
        if image.ntdll_problem and not image.kernel_names_dispatcher:
            facts.unreadable.append("ntdll exports")
        chain: list[UserFrame] = []
        if bounds is not None:
            chain = fallback_frames(exp, bounds, bounds[0], image)
            if _scan_meets_unreadable_page(exp, bounds[0], bounds[1]):
                facts.unreadable.append("user stack")
        found = len(chain)
        numbered = len(chain) == exp.nesting
        for index, fallback in enumerate(reversed(chain), start=1):
            cells, notes = _frame_cells(fallback, modules, handler, facts)
            frames.append(
                {
                    "level": index if numbered else None,
                    **cells,
                    "kernel_side": f"unreadable: {NOT_RESIDENT}",
                    "notes": "; ".join(notes),
                }
            )
    if found != exp.nesting:
        head.append(f"callback frames found: {found}, CallbackNestingLevel: {exp.nesting}")
    for text in facts.returns:
        if text not in head:
            head.append(text)
    parts = head + ordered("unreadable", facts.unreadable, UNREADABLE_ORDER)
    parts += ordered("invalid", facts.invalid, INVALID_ORDER)
    rip = exp.rip if user else None
    at_return = rip is not None and image.stub is not None and image.stub[0] <= rip < image.stub[1]
    if exp.resident:
        in_callback = exp.nesting > 0 or bool(levels)
    else:
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
        "kernel_side": thread_kernel_side(frames, in_callback, exp.resident),
        "notes": "; ".join(parts),
        "frames": frames,
    }


def thread_kernel_side(
    frames: list[dict[str, Any]], in_callback: bool, resident: bool
) -> str | None:
    """Contract "KernelSide: three values", thread row."""
    sides = [f["kernel_side"] for f in frames]
    if any(s.startswith("mismatch") for s in sides):
        return "mismatch"
    unreadable = [s for s in sides if s.startswith("unreadable")]
    if unreadable:
        return unreadable[0]
    if sides:
        return "agrees"
    if in_callback and not resident:
        return f"unreadable: {NOT_RESIDENT}"
    return None
