"""windows.kcbwait: threads resting at ZwCallbackReturn and their kernel-to-user callback stacks.

For every thread the plugin reports whether its user-mode trap frame stops inside ntdll's
NtCallbackReturn/ZwCallbackReturn stub (``at-return``) and whether it is inside one or more
kernel-to-user callbacks (``in-callback``), and lists each callback level: the kernel's own
record (_KSTACK_CONTROL chain, trap frames, KCALLOUT_FRAME) names where each level's
UCALLOUT_FRAME is, and the frame read there says whether the user side agrees.  When the
kernel stack is swapped out, the user stack is scanned instead.  Output columns and texts
follow docs/output-contract.md; the Windows model follows ../shared/docs/callback-machinery.md.
x64 kernels only.

Damaged, smeared and hostile images: every read goes through bounded, exception-safe helpers
(kcbwait_analysis.memory), every loop over image data has a named cap, and what cannot be read
or cannot be true becomes a note on the thread's row rather than a lost row or a traceback
(README, "Damaged images").
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from volatility3.framework import constants, interfaces, renderers
from volatility3.framework.configuration import requirements
from volatility3.framework.renderers import format_hints
from volatility3.plugins.windows import threads
from volatility3.plugins.windows.kcbwait_analysis import (
    cells,
    findings,
    memory,
    plugin_requirements,
    process_info,
    read_stats,
    results,
    text,
    thread_analysis,
    thread_list,
    wording,
)

vollog = logging.getLogger(__name__)

# Threads analysed per run over all processes: a real system has a few thousand; the cap keeps
# a hostile image of 0x4000 fake processes x 0x10000 fake threads from running for days.
MAX_TOTAL_THREADS = 0x100000

COLUMNS = [
    ("PID", int),
    ("TID", int),
    ("Process", str),
    ("Wow64", bool),
    ("Level", int),
    ("Reason", str),
    ("State", str),
    ("WaitReason", str),
    ("NestingLevel", int),
    ("Rip", format_hints.Hex),
    ("Symbol", str),
    ("Rsp", format_hints.Hex),
    ("Frame", format_hints.Hex),
    ("ApiNumber", int),
    ("Handler", format_hints.Hex),
    ("HandlerSymbol", str),
    ("Callback", str),
    ("Table", str),
    ("Buffer", format_hints.Hex),
    ("Length", int),
    ("KernelSide", str),
    ("Notes", str),
]


def identity_cells(result: results.ThreadResult) -> tuple:
    """PID, TID, Process and Wow64: the same on a thread's row and its callback rows."""
    process = result.process
    unreadable = result.unreadable | process.unreadable
    return (
        cells.cell(process.pid, results.Field.PID, unreadable),
        cells.cell(result.tid, results.Field.TID, unreadable),
        cells.cell(text.display(process.name), results.Field.PROCESS, unreadable),
        cells.cell(process.wow64, results.Field.WOW64, unreadable),
    )


class KcbWait(interfaces.plugins.PluginInterface):
    """Lists threads waiting at ZwCallbackReturn or inside kernel-to-user callbacks (x64)."""

    _required_framework_version = (2, 26, 0)
    _version = (3, 1, 0)

    @classmethod
    def get_requirements(cls) -> list[interfaces.configuration.RequirementInterface]:
        return [
            *plugin_requirements.common_requirements(),
            requirements.VersionRequirement(
                name="threads", component=threads.Threads, version=(3, 0, 0)
            ),
            *plugin_requirements.thread_selection_requirements(),
        ]

    @classmethod
    def analyse_threads(
        cls,
        context: interfaces.context.ContextInterface,
        kernel_module_name: str,
        pids: list[int] | None = None,
        tids: list[int] | None = None,
        progress_callback: constants.ProgressCallback = None,
        stats: read_stats.ReadStats | None = None,
        stack_mode: findings.ListingMode | None = None,
    ) -> Iterator[results.ThreadResult]:
        """Analyses every thread (pslist order, then ThreadListHead order), optionally narrowed
        to ``pids``/``tids``; yields one ThreadResult per thread whatever its reason.

        With ``stack_mode``, the threads that mode lists also carry their user-mode call
        stack (``ThreadResult.stack``, windows.kcbstack); the others are not walked.

        ``progress_callback`` (Volatility's ``(percent, description)``) hears of each process.
        Work counters (bytes read, export directories parsed) go to ``stats`` (a fresh
        ReadStats when not given) and are logged at debug level when the run ends.
        """
        stats = stats if stats is not None else read_stats.ReadStats()
        catalog = process_info.ImageCatalog.for_kernel(context, kernel_module_name, stats)
        analyzer = thread_analysis.ThreadAnalyzer(context, kernel_module_name, catalog, stats)
        lister = thread_list.ThreadLister(context, kernel_module_name, stats)
        tid_filter = set(tids or [])
        # Listing the processes first (bounded) gives the progress callback a total.
        processes = process_info.listed_processes(context, kernel_module_name, pids)
        budget = MAX_TOTAL_THREADS
        try:
            for index, proc in enumerate(processes):
                info = catalog.process_info(proc)
                if progress_callback is not None:
                    progress_callback(
                        100.0 * index / len(processes),
                        f"Analysing threads of PID {info.summary.pid}",
                    )
                listing = lister.list(proc.vol.offset)
                for problem in listing.problems:
                    vollog.warning(
                        f"PID {info.summary.pid} (EPROCESS {proc.vol.offset:#x}): thread list "
                        f"damaged: {problem}; threads found by the other walks are still listed"
                    )
                for thread in lister.threads(listing):
                    if budget <= 0:
                        vollog.warning(
                            f"stopped after {MAX_TOTAL_THREADS} threads (corrupt lists?)"
                        )
                        return
                    budget -= 1
                    if tid_filter:
                        tid = memory.try_read(lambda t=thread: int(t.Cid.UniqueThread))
                        if tid not in tid_filter:
                            continue
                    stats.threads += 1
                    yield analyzer.analyse(info, thread, stack_mode)
        finally:
            vollog.debug(f"windows.kcbwait work: {stats.summary()}")

    @staticmethod
    def _thread_row(result: results.ThreadResult) -> tuple:
        unreadable = result.unreadable | result.process.unreadable
        return (
            *identity_cells(result),
            0,
            wording.reason(result.reason),
            cells.cell(result.state, results.Field.STATE, unreadable),
            cells.cell(result.wait_reason, results.Field.WAIT_REASON, unreadable),
            cells.cell(result.nesting_level, results.Field.NESTING_LEVEL, unreadable),
            cells.cell(result.rip, hex_value=True),
            cells.cell(text.display(result.symbol)),
            cells.cell(result.rsp, hex_value=True),
            renderers.NotApplicableValue(),
            renderers.NotApplicableValue(),
            renderers.NotApplicableValue(),
            renderers.NotApplicableValue(),
            renderers.NotApplicableValue(),
            cells.cell(text.display(wording.table_verdict(result.table))),
            renderers.NotApplicableValue(),
            renderers.NotApplicableValue(),
            cells.cell(wording.kernel_side(result.kernel_side, thread_row=True)),
            # Notes and Table name modules: strings from the image, escaped like names.
            text.display(wording.thread_notes(result.notes)),
        )

    @staticmethod
    def _callback_row(result: results.ThreadResult, callback: results.CallbackResult) -> tuple:
        level = callback.level
        frame = level.frame
        columns = callback.unreadable
        return (
            *identity_cells(result),
            cells.cell(level.number),
            wording.CALLBACK,
            renderers.NotApplicableValue(),
            renderers.NotApplicableValue(),
            renderers.NotApplicableValue(),
            cells.cell(level.rip, hex_value=True),
            cells.cell(text.display(callback.symbol)),
            cells.cell(
                None if frame is None else frame.rsp,
                results.Field.FRAME_RSP,
                columns,
                hex_value=True,
            ),
            cells.cell(level.frame_address, hex_value=True),
            cells.cell(
                None if frame is None else frame.api_number, results.Field.API_NUMBER, columns
            ),
            cells.cell(callback.handler, results.Field.HANDLER, columns, hex_value=True),
            cells.cell(
                text.display(callback.handler_symbol), results.Field.HANDLER_SYMBOL, columns
            ),
            cells.cell(callback.callback),
            cells.cell(text.display(wording.table_verdict(callback.table))),
            cells.cell(
                None if frame is None else frame.buffer,
                results.Field.BUFFER,
                columns,
                hex_value=True,
            ),
            cells.cell(None if frame is None else frame.length, results.Field.LENGTH, columns),
            wording.kernel_side(level.kernel_side),
            text.display(wording.level_notes(callback.notes)),
        )

    def _generator(self):
        mode = plugin_requirements.listing_mode(self.config)
        for result in self.analyse_threads(
            self.context,
            self.config["kernel"],
            pids=self.config.get("pid", None),
            tids=self.config.get("tid", None),
            progress_callback=self._progress_callback,
        ):
            if not mode.lists(result.reason):
                continue
            yield 0, self._thread_row(result)
            for callback in result.callbacks:
                yield 1, self._callback_row(result, callback)

    def run(self) -> renderers.TreeGrid:
        return plugin_requirements.x64_tree_grid(
            self.context, self.config["kernel"], "windows.kcbwait", COLUMNS, self._generator
        )
