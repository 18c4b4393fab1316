"""Ground truth: what windows.kcbwait must report, from what the builder laid out.

Symbols follow docs/output-contract.md ("Symbols"), computed by process_symbols.py from the
builder's own records (names, RUNTIME_FUNCTIONs, what each process can read), never by reading
the image back.
"""

from __future__ import annotations

from typing import Any

from imagebuilder.process_symbols import ProcessSymbols
from imagebuilder.user_modules import ModuleImage

STUB_CAP = 0x20  # contract: the callback-return stub spans at most 0x20 bytes


def symbolize(address: int | None, modules: ProcessSymbols) -> str | None:
    return modules.symbolize(address)


def callback_return_range(ntdll: ModuleImage) -> tuple[int, int]:
    names = [n for n in ("NtCallbackReturn", "ZwCallbackReturn") if n in ntdll.exports]
    start = ntdll.exports[names[0]]
    following = [r for r in ntdll.exports.values() if r > start]
    end = min([start + STUB_CAP, *following])
    return ntdll.base + start, ntdll.base + end


def reason(at_return: bool, in_callback: bool) -> str:
    if at_return and in_callback:
        return "at-return+in-callback"
    if at_return:
        return "at-return"
    if in_callback:
        return "in-callback"
    return "none"


def thread_record(
    *,
    pid: int,
    tid: int,
    process: str,
    wow64: bool,
    state: str,
    wait_reason: str,
    nesting: int,
    rip: int | None,
    rsp: int | None,
    modules: ProcessSymbols,
    stub: tuple[int, int],
    frames: list[dict[str, Any]],
    notes: str,
) -> dict[str, Any]:
    at_return = rip is not None and stub[0] <= rip < stub[1]
    in_callback = nesting > 0 or bool(frames)
    return {
        "pid": pid,
        "tid": tid,
        "process": process,
        "wow64": wow64,
        "reason": reason(at_return, in_callback),
        "state": state,
        "wait_reason": wait_reason,
        "nesting_level": nesting,
        "rip": rip,
        "symbol": symbolize(rip, modules),
        "rsp": rsp,
        "kernel_side": (
            "agrees" if all(f["kernel_side"] == "agrees" for f in frames) else "mismatch"
        )
        if frames
        else None,
        "notes": notes,
        "frames": frames,
    }


def frame_record(
    *,
    level: int,
    rip: int,
    rsp: int,
    frame: int,
    api: int,
    handler: int,
    buffer: int,
    length: int,
    modules: ProcessSymbols,
) -> dict[str, Any]:
    return {
        "level": level,
        "rip": rip,
        "symbol": symbolize(rip, modules),
        "rsp": rsp,
        "frame": frame,
        "api_number": api,
        "handler": handler,
        "handler_symbol": symbolize(handler, modules),
        "callback": modules.callback(api),
        "buffer": buffer,
        "length": length,
        "kernel_side": "agrees",
        "notes": "",
    }
