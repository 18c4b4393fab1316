"""windows.kcbtable: is each process's kernel callback table hijacked?

One row per process and callback table (the 64-bit ``PEB.KernelCallbackTable``; in a WoW64
process also the 32-bit PEB's), with the table's owner image and section, how many entries
were checked, how many point outside the owner's code, the process's instrumentation callback,
and a verdict; one child row per hijacked entry.  Unlike windows.kcbwait it needs no thread to
be inside a callback at the moment of acquisition, which is the usual case.  Rules and texts:
docs/output-contract.md, "Table" and "windows.kcbtable".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

from volatility3.framework import constants, interfaces, renderers
from volatility3.framework.renderers import format_hints
from volatility3.plugins.windows.kcbwait_analysis import (
    callback_table,
    cells,
    memory,
    plugin_requirements,
    process_info,
    read_stats,
    results,
    text,
    wording,
)

vollog = logging.getLogger(__name__)

COLUMNS = [
    ("PID", int),
    ("Process", str),
    ("Wow64", bool),
    ("Bits", int),
    ("Table", format_hints.Hex),
    ("Owner", str),
    ("Section", str),
    ("Entries", int),
    ("Outside", int),
    ("InstrumentationCallback", format_hints.Hex),
    ("InstrumentationTarget", str),
    ("Verdict", str),
    ("Index", int),
    ("Target", format_hints.Hex),
    ("TargetSymbol", str),
]


@dataclass(frozen=True)
class EntryOutside:
    """A checked entry that does not point into the owner's code."""

    index: int
    target: int
    where: callback_table.Where


@dataclass(frozen=True)
class TableResult:
    """One kcbtable row: a process's table of one bitness."""

    process: results.ProcessSummary
    bits: int
    table: int | None
    owner: str | None
    section: str | None
    entries: int
    outside: tuple[EntryOutside, ...]
    instrumentation_callback: int | None
    instrumentation_target: callback_table.Where | None
    verdict: callback_table.TableVerdict | None


class KcbTable(interfaces.plugins.PluginInterface):
    """Checks every process's kernel callback table (and instrumentation callback) (x64)."""

    _required_framework_version = (2, 26, 0)
    _version = (1, 0, 0)

    @classmethod
    def get_requirements(cls) -> list[interfaces.configuration.RequirementInterface]:
        return plugin_requirements.common_requirements()

    @classmethod
    def analyse_tables(
        cls,
        context: interfaces.context.ContextInterface,
        kernel_module_name: str,
        pids: list[int] | None = None,
        progress_callback: constants.ProgressCallback = None,
        stats: read_stats.ReadStats | None = None,
    ) -> Iterator[TableResult]:
        """One TableResult per process and table (pslist order; the 64-bit table first)."""
        catalog = process_info.ImageCatalog.for_kernel(context, kernel_module_name, stats)
        processes = process_info.listed_processes(context, kernel_module_name, pids)
        for index, proc in enumerate(processes):
            info = catalog.process_info(proc)
            if progress_callback is not None:
                progress_callback(
                    100.0 * index / len(processes),
                    f"Checking the callback tables of PID {info.summary.pid}",
                )
            instrumentation = catalog.tables.instrumentation_callback(info)
            for bits in (64, 32):
                table = catalog.tables.process_table(info, bits)
                if table is None and not (bits == 64 and instrumentation is not None):
                    continue
                yield cls._table_result(context, info, catalog, table, bits, instrumentation)

    @staticmethod
    def _table_result(
        context: interfaces.context.ContextInterface,
        info: process_info.ProcessInfo,
        catalog: process_info.ImageCatalog,
        table: callback_table.ProcessTable | None,
        bits: int,
        instrumentation: int | None,
    ) -> TableResult:
        width = bits // 8
        pointer = table.table if table is not None else None
        owner = table.owner if table is not None else None
        outside: list[EntryOutside] = []
        checked: list[int] = []
        verdicts = []
        if table is not None and pointer:
            verdicts.append(table.verdict())

            def read(address: int, length: int) -> bytes | None:
                return memory.read_bytes(context, info.layer_name, address, length, catalog.stats)

            checked = callback_table.read_entries(read, pointer, width, owner)
            for index, value in enumerate(checked):
                entry = table.entry(index, value)
                verdicts.append(entry)
                if entry.hijacks:
                    outside.append(EntryOutside(index, value, table.where(value)))
        elif table is not None and pointer is None:
            verdicts.append(table.verdict())
        section = owner.section_of(pointer) if owner is not None and pointer else None
        return TableResult(
            process=info.summary,
            bits=bits,
            table=pointer or None,
            owner=owner.region.name if owner is not None else None,
            section=section.name if section is not None else None,
            entries=len(checked),
            outside=tuple(outside),
            instrumentation_callback=instrumentation if bits == 64 else None,
            instrumentation_target=(
                catalog.tables.where(info, instrumentation)
                if bits == 64 and instrumentation is not None
                else None
            ),
            # No table (pointer 0): nothing to judge, only the instrumentation callback.
            verdict=callback_table.combine(verdicts) if verdicts else None,
        )

    def _generator(self):
        for result in self.analyse_tables(
            self.context,
            self.config["kernel"],
            pids=self.config.get("pid", None),
            progress_callback=self._progress_callback,
        ):
            process = result.process
            common = (
                cells.cell(process.pid),
                cells.cell(text.display(process.name)),
                cells.cell(process.wow64),
                result.bits,
                cells.cell(result.table, hex_value=True),
                cells.cell(text.display(result.owner)),
                cells.cell(text.display(result.section)),
                result.entries,
                len(result.outside),
                cells.cell(result.instrumentation_callback, hex_value=True),
                cells.cell(
                    text.display(wording.where(result.instrumentation_target))
                    if result.instrumentation_target is not None
                    else None
                ),
                cells.cell(text.display(wording.table_verdict(result.verdict))),
            )
            yield 0, (*common, renderers.NotApplicableValue(), renderers.NotApplicableValue(),
                      renderers.NotApplicableValue())  # fmt: skip
            for entry in result.outside:
                yield (
                    1,
                    (
                        *common,
                        entry.index,
                        format_hints.Hex(entry.target),
                        text.display(wording.where(entry.where)),
                    ),
                )

    def run(self) -> renderers.TreeGrid:
        return plugin_requirements.x64_tree_grid(
            self.context, self.config["kernel"], "windows.kcbtable", COLUMNS, self._generator
        )
