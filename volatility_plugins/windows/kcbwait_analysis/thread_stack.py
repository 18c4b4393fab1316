"""Connects one analysed thread to the stack walk: its process's memory, modules and levels.

The walk itself (``stack_walk``) and the unwinder (``x64_unwind``) see only readers and plain
values; this module builds them from the thread's process (its own layer, loader list and the
image catalog's unwind data) and from what the kcbwait analysis already established (T(K),
each kernel level's UCALLOUT_FRAME and T(k-1)).
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Sequence

from volatility3.framework import constants, exceptions, interfaces
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
    wow64_stack,
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
    teb: int | None,
    stats: read_stats.ReadStats | None = None,
) -> tuple[stack_walk.StackFrame, ...]:
    """The call stack of a thread whose current trap frame is ``start``; for a WoW64
    process, its 32-bit frames follow the 64-bit ones."""
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
    frames = stack_walk.walk_stack(
        code,
        x64_unwind.Registers.at(start.rip, start.rsp, start.rbp),
        level_entries(levels),
        bounds.high if bounds is not None else None,
    )
    if not info.summary.wow64:
        return frames
    saved = None
    cpu_reserved = _cpu_reserved(context, catalog.facts.table_name, layer_name, teb)
    if cpu_reserved is not None and stack_reader is not None:
        saved = wow64_stack.read_context(cpu_reserved, stack_reader.read)
    if saved is None:
        note = stack_walk.FrameNote(stack_walk.Note.WOW64_CONTEXT_UNREADABLE)
        last = frames[-1]
        return (*frames[:-1], dataclasses.replace(last, notes=(*last.notes, note)))

    def read_dword(address: int) -> int | None:
        data = stack_reader.read(address, 4) if stack_reader is not None else None
        return struct.unpack("<I", data)[0] if data is not None else None

    vads = catalog.tables.vads(info)

    def symbolize32(address: int) -> str | None:
        for region in vads:
            if region.name and not region.private and region.contains(address):
                return f"{region.name}+{address - region.base:#x}"
        return None

    eip, esp, ebp = saved
    return frames + tuple(
        wow64_stack.walk_frame_pointers(eip, esp, ebp, read_dword, len(frames), symbolize32)
    )


def _cpu_reserved(
    context: interfaces.context.ContextInterface,
    table_name: str,
    layer_name: str | None,
    teb: int | None,
) -> int | None:
    """TEB.TlsSlots[WOW64_TLS_CPURESERVED] of a WoW64 thread's 64-bit TEB."""
    if not teb or layer_name is None:
        return None
    try:
        slots = context.object(
            f"{table_name}{constants.BANG}_TEB", layer_name=layer_name, offset=teb
        ).TlsSlots
        value = int(slots[wow64_stack.WOW64_TLS_CPURESERVED])
    except (exceptions.InvalidAddressException, AttributeError, IndexError):
        return None
    return value or None
