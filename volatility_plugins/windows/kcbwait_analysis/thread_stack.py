"""Connects one analysed thread to the stack walk: its process's memory, modules and levels.

The walk itself (``stack_walk``) and the unwinder (``x64_unwind``) see only readers and plain
values; this module builds them from the thread's process (its own layer, loader list and the
image catalog's unwind data) and from what the kcbwait analysis already established (T(K),
each kernel level's UCALLOUT_FRAME and T(k-1)).
"""

from __future__ import annotations

import struct
from typing import Sequence

from volatility3.framework import interfaces
from volatility3.plugins.windows.kcbwait_analysis import (
    callback_levels,
    memory,
    ntdll_exports,
    process_info,
    read_stats,
    stack_walk,
    symbolizer,
    trap_frame,
    user_callout,
    x64_unwind,
)

# Pages one thread's stack walk may read: return slots and saved registers of up to
# MAX_FRAMES frames, a scan page now and then, and the code bytes before scanned candidates.
MAX_STACK_PAGES = 256
MAX_CODE_PAGES = 64


def no_stack(why: stack_walk.Note) -> stack_walk.StackFrame:
    """The only row of a thread whose stack has no usable start."""
    return stack_walk.StackFrame(None, None, None, None, None, None, (stack_walk.FrameNote(why),))


def level_entries(levels: Sequence[callback_levels.Level]) -> tuple[stack_walk.LevelEntry, ...]:
    """The kernel's levels as the walk needs them (outermost first)."""
    entries = []
    for level in levels:
        if level.number is None:
            continue
        caller = level.caller
        entries.append(
            stack_walk.LevelEntry(
                number=level.number,
                frame=level.frame_address,
                rip=level.rip,
                rsp=level.frame.rsp if level.frame is not None else None,
                caller_rip=caller.rip if caller is not None else None,
                caller_rbp=caller.rbp if caller is not None else None,
            )
        )
    return tuple(entries)


def walk(
    context: interfaces.context.ContextInterface,
    catalog: process_info.ImageCatalog,
    info: process_info.ProcessInfo,
    ntdll: ntdll_exports.NtdllFacts,
    sym: symbolizer.Symbolizer,
    start: trap_frame.TrapFrame,
    levels: Sequence[callback_levels.Level],
    bounds: user_callout.StackBounds | None,
    stats: read_stats.ReadStats | None = None,
) -> tuple[stack_walk.StackFrame, ...]:
    """The call stack of a thread whose current trap frame is ``start``."""
    layer_name = info.layer_name

    def reader(max_pages: int) -> memory.PagedReader | None:
        if layer_name is None:
            return None
        return memory.PagedReader(memory.layer_page_source(context, layer_name, stats), max_pages)

    stack_reader = reader(MAX_STACK_PAGES)
    code_reader = reader(MAX_CODE_PAGES)

    def read_qword(address: int) -> int | None:
        if stack_reader is None:
            return None
        data = stack_reader.read(address, 8)
        return struct.unpack("<Q", data)[0] if data is not None else None

    def read_code(address: int, length: int) -> bytes | None:
        return code_reader.read(address, length) if code_reader is not None else None

    code = stack_walk.ProcessCode(
        modules=info.modules,
        unwind_source=lambda module: catalog.unwind_source(module, layer_name),
        read_qword=read_qword,
        read_code=read_code,
        in_dispatcher=lambda address: ntdll_exports.is_dispatcher_return(ntdll, address) is True,
        symbolize=sym.symbolize,
    )
    return stack_walk.walk_stack(
        code,
        x64_unwind.Registers.at(start.rip, start.rsp, start.rbp),
        level_entries(levels),
        bounds.high if bounds is not None else None,
    )
