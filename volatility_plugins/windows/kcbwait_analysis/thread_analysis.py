"""Analyses one thread: its kernel stacks, its user-mode trap frame, its callback levels.

Order of work (docs/output-contract.md, "How callback levels are found (kernel first)"):
1. The _KSTACK_CONTROL chain from KTHREAD.InitialStack, unless KTHREAD.KernelStackResident says
   the kernel stack is swapped out.
2. The current trap frame T(K) at the newest segment's ``InitialStack - sizeof(_KTRAP_FRAME)``
   -> user Rip/Rsp when it is a user-mode frame; ``at-return`` when that Rip is in ntdll's
   NtCallbackReturn/ZwCallbackReturn stub.  KTHREAD.TrapFrame is only compared with it.
3. One level per callout in the chain, read at the address the kernel names and checked
   there; or, when the chain cannot be read, the user-stack scan as the fallback.
Unreadable memory never aborts the thread: it becomes ``Unreadable`` findings and null cells;
values that were read but cannot be true become ``Invalid`` findings.

A thread is analysed in the address space of the process its own ``KTHREAD.Process`` names: a
thread found in another process's thread list (a forged or cross-linked entry) keeps its row
under the list's process, with a foreign-thread note, but its TEB, user stack and modules are
those of its owner, so a foreign entry never reads another process's memory as its own.
"""

from __future__ import annotations

import dataclasses

from volatility3.framework import constants, exceptions, interfaces
from volatility3.plugins.windows.kcbwait_analysis import (
    callback_levels,
    callback_table,
    findings,
    kernel_callout,
    memory,
    ntdll_exports,
    pe_exports,
    process_info,
    read_stats,
    results,
    stack_walk,
    thread_fields,
    thread_stack,
    trap_frame,
    user_callout,
)

# Pointer size of x64: KernelCallbackTable is an array of 8-byte function pointers.
POINTER_SIZE = 8
# user32's callback table has ~0x80-0xA0 entries on Windows 10/11; an ApiNumber at or beyond
# this cap is corrupt, and reading "table[ApiNumber]" would read unrelated memory.
MAX_CALLBACK_TABLE_ENTRIES = 0x400
# Pages one thread's level reads may fetch: each level needs the page or two its frame spans.
MAX_LEVEL_PAGES = 2 * user_callout.MAX_LEVELS


def read_teb_limits(
    context: interfaces.context.ContextInterface,
    table_name: str,
    layer_name: str,
    teb: int | None,
) -> tuple[int, int] | None:
    """(NtTib.StackLimit, NtTib.StackBase) of the 64-bit TEB, or None if unreadable."""
    if not teb:
        return None
    try:
        tib = context.object(
            f"{table_name}{constants.BANG}_TEB", layer_name=layer_name, offset=teb
        ).NtTib
        return int(tib.StackLimit), int(tib.StackBase)
    except exceptions.InvalidAddressException:
        return None


class _Findings:
    """The unreadable/invalid facts one thread's analysis collects on its way."""

    def __init__(self) -> None:
        self.unreadable: set[findings.Unreadable] = set()
        self.invalid: set[findings.Invalid] = set()


class ThreadAnalyzer:
    """Analyses threads of one image; per-image facts come from an ImageCatalog."""

    def __init__(
        self,
        context: interfaces.context.ContextInterface,
        kernel_module_name: str,
        catalog: process_info.ImageCatalog,
        stats: read_stats.ReadStats | None = None,
    ) -> None:
        self._context = context
        self._kernel = context.modules[kernel_module_name]
        self._mask = context.layers[self._kernel.layer_name].address_mask
        self._catalog = catalog
        self._facts = catalog.facts
        self._stats = stats
        self._thread_layout = thread_fields.ThreadLayout.resolve(
            self._kernel, self._facts.nesting_member, self._facts.resident_member
        )

    def _owner(
        self, listed: process_info.ProcessInfo, fields: thread_fields.ThreadFields
    ) -> tuple[process_info.ProcessInfo, findings.ForeignThread | None]:
        """The process whose memory the thread's user side lives in, and the foreign-thread
        finding when that is not the process whose list holds the thread."""
        if fields.process is None or fields.process & self._mask == listed.offset & self._mask:
            return listed, None
        owner = self._catalog.process_at(fields.process, self._mask)
        owner_pid = owner.summary.pid if owner is not None else None
        return owner or listed, findings.ForeignThread(owner_pid, fields.process)

    def analyse(
        self,
        listed: process_info.ProcessInfo,
        thread: interfaces.objects.ObjectInterface,
        stack_mode: findings.ListingMode | None = None,
    ) -> results.ThreadResult:
        """Full analysis of one thread found in the thread list of the process ``listed``;
        with ``stack_mode``, the threads that mode lists also get their call stack."""
        facts = self._facts
        fields = thread_fields.ThreadFields(
            thread, facts.nesting_member, facts.resident_member, self._thread_layout, self._context
        )
        info, foreign = self._owner(listed, fields)
        found = _Findings()
        stack = kernel_callout.read_kernel_stack(
            self._kernel, fields.initial_stack, fields.kernel_stack_resident
        )
        user_frame, trap_frame_differs = self._current_trap_frame(stack, fields, found)
        ntdll = self._catalog.ntdll_facts(info.ntdll, info.layer_name)

        at_return = False
        if user_frame is not None:
            if ntdll.exports_problem == pe_exports.UNREADABLE:
                found.unreadable.add(findings.Unreadable.NTDLL_EXPORTS)
            elif ntdll.exports_problem == pe_exports.INVALID:
                found.invalid.add(findings.Invalid.NTDLL_EXPORTS)
            at_return = ntdll_exports.address_in_ranges(
                user_frame.rip, ntdll.callback_return_ranges
            )

        levels = self._levels(info, fields, stack, user_frame, ntdll, found)
        sym = self._catalog.symbolizer(info)
        table = self._catalog.tables.process_table(info)
        if table is not None and table.table == 0:
            table = None  # no table to check (a process that never loaded user32)
        callbacks = tuple(self._callback(info, level, sym, table, found) for level in levels)
        readable = stack.status is findings.KernelStackStatus.READABLE
        nesting = fields.nesting_level
        in_callback = bool(nesting) or bool(stack.levels if readable else levels)
        if stack.status is findings.KernelStackStatus.BROKEN:
            found.unreadable.add(findings.Unreadable.KERNEL_STACK)
        frames_found = sum(1 for level in levels if level.is_frame)
        notes = findings.ThreadNotes(
            foreign=foreign,
            instrumentation_callback=self._catalog.tables.instrumentation_finding(info),
            kernel_stack_not_resident=stack.status is findings.KernelStackStatus.NOT_RESIDENT,
            no_user_trap_frame=(
                stack.status is not findings.KernelStackStatus.NOT_RESIDENT and user_frame is None
            ),
            trap_frame_differs=trap_frame_differs,
            kernel_levels=(
                findings.CountDiffers(len(stack.levels), nesting)
                if readable and nesting is not None and len(stack.levels) != nesting
                else None
            ),
            frames_found=(
                findings.CountDiffers(frames_found, nesting)
                if nesting is not None and frames_found != nesting
                else None
            ),
            return_addresses=_distinct(
                c.notes.return_address for c in callbacks if c.notes.return_address is not None
            ),
            unreadable=frozenset(found.unreadable),
            invalid=frozenset(found.invalid),
        )
        result = results.ThreadResult(
            process=listed.summary,
            tid=fields.tid,
            reason=findings.Reason(at_return, in_callback),
            state=facts.states.get(fields.state) if fields.state is not None else None,
            wait_reason=(
                facts.wait_reasons.get(fields.wait_reason)
                if fields.wait_reason is not None
                else None
            ),
            nesting_level=nesting,
            rip=user_frame.rip if user_frame else None,
            symbol=sym.symbolize(user_frame.rip) if user_frame else None,
            rsp=user_frame.rsp if user_frame else None,
            kernel_side=findings.thread_kernel_side(
                tuple(level.kernel_side for level in levels), in_callback, stack.status
            ),
            notes=notes,
            kernel_stack=stack.status,
            callbacks=callbacks,
            table=(
                callback_table.combine(
                    [table.verdict(), *(c.table for c in callbacks if c.table is not None)]
                )
                if table is not None
                else None
            ),
            unreadable=frozenset(fields.unreadable),
        )
        if stack_mode is None or not stack_mode.lists(result.reason):
            return result
        if user_frame is None:
            if stack.status is findings.KernelStackStatus.NOT_RESIDENT:
                why = stack_walk.Note.KERNEL_STACK_NOT_RESIDENT
            elif findings.Unreadable.TRAP_FRAME in found.unreadable:
                why = stack_walk.Note.TRAP_FRAME_UNREADABLE
            else:
                why = stack_walk.Note.NO_USER_TRAP_FRAME
            frames: tuple[stack_walk.StackFrame, ...] = (thread_stack.no_stack(why),)
        else:
            limits = None
            if info.layer_name is not None:
                limits = read_teb_limits(
                    self._context, facts.table_name, info.layer_name, fields.teb
                )
            frames = thread_stack.walk(
                self._context,
                self._catalog,
                info,
                ntdll,
                sym,
                user_frame,
                levels if readable else (),
                user_callout.usable_bounds(limits),
                fields.teb,
                self._stats,
            )
        return dataclasses.replace(result, stack=frames)

    def _current_trap_frame(
        self,
        stack: kernel_callout.KernelStack,
        fields: thread_fields.ThreadFields,
        found: _Findings,
    ) -> tuple[trap_frame.TrapFrame | None, int | None]:
        """T(K) when it is a user-mode frame, and KTHREAD.TrapFrame when it names another
        address (a Running thread's KTHREAD.TrapFrame may be left over from an earlier
        system call; the per-segment rule is the one the kernel itself follows)."""
        if stack.current_trap_frame is None:
            return None, None
        current = trap_frame.read_trap_frame(self._kernel, stack.current_trap_frame)
        if current is None:
            found.unreadable.add(findings.Unreadable.TRAP_FRAME)
        if current is None or not current.user_mode:
            # A system thread has no user-mode frame, and its KTHREAD.TrapFrame is null.
            return None, None
        differs = None
        if fields.trap_frame is not None and (
            fields.trap_frame & self._mask != current.address & self._mask
        ):
            differs = memory.canonical(fields.trap_frame)
        return current, differs

    def _reader(self, info: process_info.ProcessInfo, max_pages: int) -> memory.PagedReader:
        return memory.PagedReader(
            memory.layer_page_source(self._context, info.layer_name, self._stats), max_pages
        )

    def _stack_bounds(
        self,
        info: process_info.ProcessInfo,
        fields: thread_fields.ThreadFields,
        user_frame: trap_frame.TrapFrame | None,
        found: _Findings,
    ) -> user_callout.StackBounds | None:
        """The TEB's usable stack bounds, recording what is wrong with them."""
        limits = None
        if info.layer_name is not None:
            limits = read_teb_limits(
                self._context, self._facts.table_name, info.layer_name, fields.teb
            )
        unreadable, invalid = user_callout.teb_problems(
            limits, user_frame.rsp if user_frame else None
        )
        if unreadable is not None:
            found.unreadable.add(unreadable)
        if invalid is not None:
            found.invalid.add(invalid)
        return user_callout.usable_bounds(limits)

    def _levels(
        self,
        info: process_info.ProcessInfo,
        fields: thread_fields.ThreadFields,
        stack: kernel_callout.KernelStack,
        user_frame: trap_frame.TrapFrame | None,
        ntdll: ntdll_exports.NtdllFacts,
        found: _Findings,
    ) -> tuple[callback_levels.Level, ...]:
        """The thread's callback levels, outermost first."""

        def is_return(value: int) -> bool | None:
            return ntdll_exports.is_dispatcher_return(ntdll, value)

        if stack.status is findings.KernelStackStatus.READABLE:
            if not stack.levels:
                return ()
            bounds = self._stack_bounds(info, fields, user_frame, found)
            reader = self._reader(info, MAX_LEVEL_PAGES) if info.layer_name else None
            levels: list[callback_levels.Level] = []
            for kernel_level in stack.levels:
                frame = None
                if reader is not None and kernel_level.trap_frame is not None:
                    frame = user_callout.read_frame(reader, kernel_level.trap_frame.rsp)
                levels.append(
                    callback_levels.level_from_kernel(kernel_level, frame, bounds, is_return)
                )
            return tuple(levels)
        # Fallback.  KTHREAD itself is resident even when its kernel stack is not, so its
        # CallbackNestingLevel still says whether there is any callback to look for.
        if fields.nesting_level == 0:
            return ()
        if info.layer_name is None:
            found.unreadable.update((findings.Unreadable.TEB, findings.Unreadable.USER_STACK))
            return ()
        bounds = self._stack_bounds(info, fields, user_frame, found)
        if bounds is None:
            return ()
        if ntdll.dispatcher_range is None and ntdll.dispatcher_return is None:
            found.unreadable.add(findings.Unreadable.NTDLL_EXPORTS)
            return ()
        start = bounds.low
        if user_frame is not None and bounds.low <= user_frame.rsp < bounds.high:
            start = user_frame.rsp
        scan = user_callout.scan_callout_frames(
            self._reader(info, user_callout.MAX_SCAN_PAGES), start, bounds, is_return
        )
        if scan.unreadable:
            found.unreadable.add(findings.Unreadable.USER_STACK)
        return callback_levels.levels_from_scan(scan.frames, fields.nesting_level, stack.status)

    def _handler(
        self, info: process_info.ProcessInfo, api_number: int
    ) -> tuple[int | None, findings.Unreadable | None, findings.Invalid | None]:
        """(PEB.KernelCallbackTable[ApiNumber] read in the process layer, what was unreadable,
        what was invalid)."""
        if api_number >= MAX_CALLBACK_TABLE_ENTRIES:
            return None, None, findings.Invalid.API_NUMBER
        table = info.kernel_callback_table
        if info.layer_name is None or table is None:
            return None, findings.Unreadable.CALLBACK_TABLE, None
        if table == 0:
            return None, None, findings.Invalid.CALLBACK_TABLE
        value = memory.read_u64(
            self._context, info.layer_name, table + POINTER_SIZE * api_number, self._stats
        )
        if value is None:
            return None, findings.Unreadable.CALLBACK_TABLE, None
        return value, None, None

    def _callback(
        self,
        info: process_info.ProcessInfo,
        level: callback_levels.Level,
        sym,
        table: callback_table.ProcessTable | None,
        found: _Findings,
    ) -> results.CallbackResult:
        """The callback row of ``level``; its facts are also recorded for the thread row."""
        unreadable = set(level.unreadable)
        invalid: set[findings.Invalid] = set()
        columns: set[results.Field] = set()
        handler = None
        entry = None
        name = None
        if level.frame is None:
            if level.frame_address is not None:
                columns.update(results.FRAME_FIELDS)
        else:
            handler, handler_unreadable, handler_invalid = self._handler(
                info, level.frame.api_number
            )
            if handler_unreadable is not None:
                unreadable.add(handler_unreadable)
                columns.update((results.Field.HANDLER, results.Field.HANDLER_SYMBOL))
            if handler_invalid is not None:
                invalid.add(handler_invalid)
            api_number = level.frame.api_number
            if table is not None and api_number < MAX_CALLBACK_TABLE_ENTRIES:
                entry = table.entry(api_number, handler)
            name = self._catalog.tables.callback_name(info, api_number)
        found.unreadable.update(unreadable)
        found.invalid.update(invalid)
        return results.CallbackResult(
            level=level,
            symbol=sym.symbolize(level.rip),
            handler=handler,
            handler_symbol=sym.symbolize(handler),
            notes=findings.LevelNotes(
                level.return_outside_dispatcher, frozenset(unreadable), frozenset(invalid)
            ),
            unreadable=frozenset(columns),
            callback=name,
            table=entry,
        )


def _distinct(values) -> tuple[int, ...]:
    out: list[int] = []
    for value in values:
        if value not in out:
            out.append(value)
    return tuple(out)
