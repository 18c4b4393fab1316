"""Ground truth: what windows.kcbwait must report, from what the builder laid out.

Symbols follow docs/output-contract.md, computed from the builder's own module list (the
addresses it chose), never by reading the image back.
"""

from __future__ import annotations

from typing import Any

from imagebuilder.user_modules import ModuleImage

NEAR_EXPORT = 0x100  # contract: module!export+off only when off < 0x100
STUB_CAP = 0x20  # contract: the callback-return stub spans at most 0x20 bytes


def symbolize(address: int | None, modules: list[ModuleImage]) -> str | None:
    if address is None:
        return None
    for module in modules:
        if not module.contains(address):
            continue
        rva = address - module.base
        best = module.nearest_export(rva)  # alphabetically first name at the nearest address
        if best is not None and rva - best[0] < NEAR_EXPORT:
            offset = rva - best[0]
            return f"{module.name}!{best[1]}" + (f"+{offset:#x}" if offset else "")
        return f"{module.name}+{rva:#x}"
    return None


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
    modules: list[ModuleImage],
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
    modules: list[ModuleImage],
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
        "buffer": buffer,
        "length": length,
        "kernel_side": "agrees",
        "notes": "",
    }
