"""Analyses one thread: its user-mode trap frame, its callback frames on both sides, its reason.

Order of work (docs/output-contract.md, callback-machinery.md):
1. KTHREAD.TrapFrame -> user Rip/Rsp if it is a user-mode frame; ``at-return`` when that Rip is
   in ntdll's NtCallbackReturn/ZwCallbackReturn stub.
2. From that Rsp, the UCALLOUT_FRAMEs on the user stack (bounded by the TEB's stack limits) and,
   per frame, ``PEB.KernelCallbackTable[ApiNumber]``.
3. If frames were found, the _KSTACK_CONTROL chain from KTHREAD.InitialStack, and per level the
   KernelSide verdict.
Unreadable memory never aborts the thread: it becomes ``unreadable: X`` notes and null cells;
values that were read but cannot be true become ``invalid: X`` notes.

A thread is analysed in the address space of the process its own ``KTHREAD.Process`` names: a
thread found in another process's thread list (a forged or cross-linked entry) keeps its row
under the list's process, with a ``mismatch: KTHREAD.Process ...`` note, but its TEB, user stack
and modules are those of its owner, so a foreign entry never reads another process's memory as
its own.
"""

from volatility3.framework import constants, exceptions, interfaces
from volatility3.plugins.windows.kcbwait_analysis import (
    callback_stack,
    kernel_callout,
    memory,
    ntdll_exports,
    pe_exports,
    process_info,
    reason,
    results,
    trap_frame,
    user_callout,
)

# Pointer size of x64: KernelCallbackTable is an array of 8-byte function pointers.
POINTER_SIZE = 8
# user32's callback table has ~0x80-0xA0 entries on Windows 10/11; an ApiNumber at or beyond
# this cap is corrupt, and reading "table[ApiNumber]" would read unrelated memory.
MAX_CALLBACK_TABLE_ENTRIES = 0x400


class ThreadFields:
    """The KTHREAD/ETHREAD fields the analysis reads, each read on its own so that one
    unreadable field costs only that field."""

    def __init__(self, thread: interfaces.objects.ObjectInterface, nesting_member: str | None):
        self.unreadable: set[str] = set()
        tcb = memory.try_read(lambda: thread.Tcb)
        self.tid = self._int(lambda: thread.Cid.UniqueThread, "TID")
        self.state = self._int(lambda: tcb.State, "State") if tcb is not None else None
        self.wait_reason = (
            self._int(lambda: tcb.WaitReason, "WaitReason") if tcb is not None else None
        )
        self.nesting_level = None
        if tcb is not None and nesting_member is not None:
            self.nesting_level = self._int(lambda: tcb.member(nesting_member), "NestingLevel")
        self.process = None
        if tcb is not None and tcb.has_member("Process"):
            self.process = self._int(lambda: tcb.Process, None)
        self.trap_frame = self._int(lambda: tcb.TrapFrame, None) if tcb is not None else None
        self.initial_stack = self._int(lambda: tcb.InitialStack, None) if tcb is not None else None
        self.teb = self._int(lambda: tcb.Teb, None) if tcb is not None else None
        if tcb is None:
            self.unreadable.update(("State", "WaitReason", "NestingLevel"))

    def _int(self, getter, column: str | None) -> int | None:
        value = memory.try_read(lambda: int(getter()))
        if value is None and column is not None:
            self.unreadable.add(column)
        return value


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


class ThreadAnalyzer:
    """Analyses threads of one image; per-image facts come from an ImageCatalog."""

    def __init__(
        self,
        context: interfaces.context.ContextInterface,
        kernel_module_name: str,
        catalog: process_info.ImageCatalog,
    ) -> None:
        self._context = context
        self._kernel = context.modules[kernel_module_name]
        self._mask = context.layers[self._kernel.layer_name].address_mask
        self._catalog = catalog
        self._facts = catalog.facts

    def _owner(
        self, listed: process_info.ProcessInfo, fields: ThreadFields
    ) -> tuple[process_info.ProcessInfo, str | None]:
        """The process whose memory the thread's user side lives in, and the foreign-thread
        note when that is not the process whose list holds the thread."""
        if fields.process is None or fields.process & self._mask == listed.offset & self._mask:
            return listed, None
        owner = self._catalog.process_at(fields.process, self._mask)
        owner_pid = owner.summary.pid if owner is not None else None
        return owner or listed, reason.foreign_thread_note(owner_pid, fields.process)

    def analyse(
        self, listed: process_info.ProcessInfo, thread: interfaces.objects.ObjectInterface
    ) -> results.ThreadResult:
        """Full analysis of one thread found in the thread list of the process ``listed``."""
        fields = ThreadFields(thread, self._facts.nesting_member)
        info, foreign = self._owner(listed, fields)
        unreadable: set[str] = set()
        invalid: set[str] = set()

        current = None
        if fields.trap_frame:
            current = trap_frame.read_trap_frame(self._kernel, fields.trap_frame)
            if current is None:
                unreadable.add(reason.UNREADABLE_TRAP_FRAME)
        user_frame = current if current is not None and current.user_mode else None

        at_return = False
        frames: tuple[user_callout.UcalloutFrame, ...] = ()
        if user_frame is not None:
            ntdll = self._catalog.ntdll_facts(info.ntdll, info.layer_name)
            if ntdll.exports_problem == pe_exports.UNREADABLE:
                unreadable.add(reason.UNREADABLE_NTDLL_EXPORTS)
            elif ntdll.exports_problem == pe_exports.INVALID:
                invalid.add(reason.INVALID_NTDLL_EXPORTS)
            at_return = ntdll_exports.address_in_ranges(
                user_frame.rip, ntdll.callback_return_ranges
            )
            frames = self._user_frames(info, fields, user_frame, ntdll, unreadable, invalid)

        callbacks = self._callbacks(info, fields, frames, unreadable, invalid)
        in_callback = reason.is_in_callback(fields.nesting_level, len(frames))
        sym = self._catalog.symbolizer(info)
        return results.ThreadResult(
            process=listed.summary,
            tid=fields.tid,
            reason=reason.thread_reason(at_return, in_callback),
            state=self._facts.states.get(fields.state) if fields.state is not None else None,
            wait_reason=(
                self._facts.wait_reasons.get(fields.wait_reason)
                if fields.wait_reason is not None
                else None
            ),
            nesting_level=fields.nesting_level,
            rip=user_frame.rip if user_frame else None,
            symbol=sym.symbolize(user_frame.rip) if user_frame else None,
            rsp=user_frame.rsp if user_frame else None,
            kernel_side=callback_stack.thread_kernel_side([c.kernel_side for c in callbacks]),
            notes=reason.thread_notes(
                user_frame is not None,
                len(frames),
                fields.nesting_level,
                unreadable,
                invalid,
                foreign,
            ),
            callbacks=tuple(callbacks),
            unreadable=frozenset(fields.unreadable),
        )

    def _user_frames(
        self,
        info: process_info.ProcessInfo,
        fields: ThreadFields,
        user_frame: trap_frame.TrapFrame,
        ntdll: ntdll_exports.NtdllFacts,
        unreadable: set[str],
        invalid: set[str],
    ) -> tuple[user_callout.UcalloutFrame, ...]:
        """UCALLOUT_FRAMEs on the user stack above the current trap frame's Rsp."""
        if info.layer_name is None:
            unreadable.update((reason.UNREADABLE_TEB, reason.UNREADABLE_USER_STACK))
            return ()
        limits = read_teb_limits(self._context, self._facts.table_name, info.layer_name, fields.teb)
        if limits is None:
            unreadable.add(reason.UNREADABLE_TEB)
        problem = user_callout.teb_limits_problem(user_frame.rsp, limits)
        if problem is not None:
            invalid.add(problem)
        if ntdll.dispatcher_range is None:
            # Neither the kernel nor ntdll told where KiUserCallbackDispatcher is.
            unreadable.add(reason.UNREADABLE_NTDLL_EXPORTS)
            return ()
        bounds = user_callout.stack_bounds(user_frame.rsp, limits)
        reader = memory.PagedReader(
            memory.layer_page_source(self._context, info.layer_name),
            user_callout.MAX_SCAN_PAGES,
        )
        scan = user_callout.scan_callout_frames(
            reader, user_frame.rsp, bounds, ntdll.dispatcher_range
        )
        if scan.unreadable:
            unreadable.add(reason.UNREADABLE_USER_STACK)
        return scan.frames

    def _handler(
        self, info: process_info.ProcessInfo, api_number: int
    ) -> tuple[int | None, str | None, str | None]:
        """(PEB.KernelCallbackTable[ApiNumber] read in the process layer, what was unreadable,
        what was invalid)."""
        if api_number >= MAX_CALLBACK_TABLE_ENTRIES:
            return None, None, reason.INVALID_API_NUMBER
        table = info.kernel_callback_table
        if info.layer_name is None or table is None:
            return None, reason.UNREADABLE_CALLBACK_TABLE, None
        if table == 0:
            return None, None, reason.INVALID_CALLBACK_TABLE
        value = memory.read_u64(self._context, info.layer_name, table + POINTER_SIZE * api_number)
        if value is None:
            return None, reason.UNREADABLE_CALLBACK_TABLE, None
        return value, None, None

    def _callbacks(
        self,
        info: process_info.ProcessInfo,
        fields: ThreadFields,
        frames: tuple[user_callout.UcalloutFrame, ...],
        unreadable: set[str],
        invalid: set[str],
    ) -> list[results.CallbackResult]:
        """Callback rows for ``frames`` (outermost first), compared with the kernel side."""
        if not frames:
            return []
        chain = None
        levels: list[kernel_callout.KernelLevel] = []
        if fields.initial_stack:
            chain = kernel_callout.walk_segments(self._kernel, fields.initial_stack)
            levels = kernel_callout.kernel_levels(self._kernel, chain)
        first = callback_stack.first_level(len(frames), chain)
        verdicts = callback_stack.compare_levels(frames, chain, levels, first)
        sym = self._catalog.symbolizer(info)
        rows = []
        for index, (frame, verdict) in enumerate(zip(frames, verdicts, strict=True)):
            level_unreadable: set[str] = set()
            level_invalid: set[str] = set()
            handler, handler_unreadable, handler_invalid = self._handler(info, frame.api_number)
            if handler_unreadable:
                level_unreadable.add(handler_unreadable)
            if handler_invalid:
                level_invalid.add(handler_invalid)
            if verdict == callback_stack.UNREADABLE_KERNEL_STACK:
                level_unreadable.add(reason.UNREADABLE_KERNEL_STACK)
            unreadable.update(level_unreadable)
            invalid.update(level_invalid)
            rows.append(
                results.CallbackResult(
                    level=first + index,
                    frame=frame,
                    symbol=sym.symbolize(frame.rip),
                    handler=handler,
                    handler_symbol=sym.symbolize(handler),
                    kernel_side=verdict,
                    notes=reason.callback_notes(level_unreadable, level_invalid),
                    unreadable=frozenset({"Handler"} if handler_unreadable else ()),
                )
            )
        return rows
