"""Per-image facts about callback tables: each process's KernelCallbackTable and its owner
image, the process's VADs, where an address points, KPROCESS.InstrumentationCallback and the
PDB name of user32's original table entry (docs/output-contract.md, "Table", "Callback" and
"windows.kcbtable").  Each is read once per process and only when a check needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from volatility3.framework import exceptions, interfaces
from volatility3.plugins.windows import vadinfo
from volatility3.plugins.windows.kcbwait_analysis import (
    callback_table,
    kernel_facts,
    memory,
    read_stats,
    symbolizer,
)

if TYPE_CHECKING:
    from volatility3.plugins.windows.kcbwait_analysis.process_info import ProcessInfo

# user32's PDB names the callback table it installs in the PEB.
APFN_DISPATCH = "apfnDispatch"


class ProcessTables:
    """The callback-table checks of one image, cached per process."""

    def __init__(
        self,
        context: interfaces.context.ContextInterface,
        facts: kernel_facts.KernelFacts,
        module_symbols: Callable[[symbolizer.LoadedModule, str | None], symbolizer.ModuleSymbols],
        stats: read_stats.ReadStats | None = None,
    ) -> None:
        self._context = context
        self.facts = facts
        self._module_symbols = module_symbols
        self.stats = stats
        self._tables: dict[tuple[int, int], callback_table.ProcessTable | None] = {}
        self._vads: dict[int, list[callback_table.Region]] = {}
        self._protect_values: list[int] | None = None
        self._protect_values_read = False
        self._instrumentation: dict[int, int | None] = {}
        self._instrumentation_findings: dict[int, tuple[int, callback_table.Where] | None] = {}

    def _protections(self) -> list[int] | None:
        """MmProtectToValue, read once per image (Volatility's vadinfo helper)."""
        if not self._protect_values_read:
            self._protect_values_read = True
            try:
                self._protect_values = list(
                    vadinfo.VadInfo.protect_values(
                        self._context, self.facts.kernel_layer, self.facts.table_name
                    )
                )
            except (exceptions.InvalidAddressException, ValueError, exceptions.SymbolError):
                self._protect_values = None
        return self._protect_values

    def vads(self, info: ProcessInfo) -> list[callback_table.Region]:
        """The process's VADs, walked once and only when a check needs them."""
        if info.offset not in self._vads:
            regions: list[callback_table.Region] = []
            if info.proc is not None:
                regions = callback_table.process_vads(
                    info.proc, self._protections(), vadinfo.winnt_protections
                )
            self._vads[info.offset] = regions
        return self._vads[info.offset]

    def process_table(
        self, info: ProcessInfo, bits: int = 64
    ) -> callback_table.ProcessTable | None:
        """The process's 64-bit table (owner user32, or wow64win in a WoW64 process) or, with
        ``bits=32``, a WoW64 process's 32-bit table (owner: the SysWOW64 user32 image VAD);
        None when the process has no such table to check."""
        key = (info.offset, bits)
        if key not in self._tables:
            self._tables[key] = self._read_table(info, bits)
        return self._tables[key]

    def _read_table(self, info: ProcessInfo, bits: int) -> callback_table.ProcessTable | None:
        if info.layer_name is None:
            return None
        vads = lambda: self.vads(info)  # noqa: E731 (deferred: only hijacks need the VADs)
        if bits == 64:
            owner_name = (
                callback_table.OWNER_WOW64 if info.summary.wow64 else callback_table.OWNER_64
            )
            module = next((m for m in info.modules if m.name.lower() == owner_name), None)
            region = (
                callback_table.Region(module.name, module.base, module.size)
                if module is not None
                else None
            )
            modules = tuple(callback_table.Region(m.name, m.base, m.size) for m in info.modules)
            table = info.kernel_callback_table if info.peb_readable else None
        else:
            if not info.summary.wow64 or info.proc is None:
                return None
            table = self._peb32_callback_table(info)
            images = [r for r in self.vads(info) if r.path and not r.private]
            region = callback_table.wow64_user32(images)
            modules = tuple(images)
        owner = (
            callback_table.read_owner(self._context, info.layer_name, region, self.stats)
            if region is not None
            else None
        )
        found = callback_table.ProcessTable(bits, table, owner, modules, vads)
        if not found.present and owner is None:
            return None
        return found

    def _peb32_callback_table(self, info: ProcessInfo) -> int | None:
        """``_PEB32.KernelCallbackTable`` of a WoW64 process (EPROCESS.WoW64Process->Peb)."""
        try:
            wow64 = info.proc.get_wow_64_process()
            peb32 = self._context.object(
                self.facts.type_name("_PEB32"), layer_name=info.layer_name, offset=int(wow64.Peb)
            )
            return int(peb32.KernelCallbackTable)
        except (exceptions.InvalidAddressException, AttributeError, exceptions.SymbolError):
            return None

    def where(self, info: ProcessInfo, address: int) -> callback_table.Where:
        """Where ``address`` points in ``info``'s 64-bit address space (its loader modules,
        else private memory as its VADs say)."""
        modules = tuple(callback_table.Region(m.name, m.base, m.size) for m in info.modules)
        return callback_table.where(address, modules, lambda: self.vads(info))

    def instrumentation_callback(self, info: ProcessInfo) -> int | None:
        """``KPROCESS.InstrumentationCallback`` when the table has it and it is set (read once
        per process: every thread of the process carries the note)."""
        if info.offset not in self._instrumentation:
            value = None
            try:
                pcb = info.proc.Pcb
                if pcb.has_member("InstrumentationCallback"):
                    value = int(pcb.InstrumentationCallback) or None
            except (exceptions.InvalidAddressException, AttributeError):
                value = None
            self._instrumentation[info.offset] = value
        return self._instrumentation[info.offset]

    def instrumentation_finding(self, info: ProcessInfo) -> tuple[int, callback_table.Where] | None:
        """(InstrumentationCallback, where it points) for the thread note, or None; once per
        process, as every thread of the process carries the note."""
        if info.offset not in self._instrumentation_findings:
            address = self.instrumentation_callback(info)
            self._instrumentation_findings[info.offset] = (
                None if address is None else (address, self.where(info, address))
            )
        return self._instrumentation_findings[info.offset]

    def callback_name(self, info: ProcessInfo, api_number: int) -> str | None:
        """The PDB name of the original table's entry ``api_number`` (user32's
        ``apfnDispatch``), or None (docs/output-contract.md, "Callback")."""
        if info.layer_name is None or api_number >= callback_table.MAX_ENTRIES:
            return None
        user32 = next((m for m in info.modules if m.name.lower() == callback_table.OWNER_64), None)
        if user32 is None:
            return None
        symbols = self._module_symbols(user32, info.layer_name)
        if not symbols.from_pdb or symbols.names is None:
            return None
        table = symbols.names.address_of(APFN_DISPATCH)
        if table is None:
            return None
        entry = memory.read_u64(self._context, info.layer_name, table + 8 * api_number, self.stats)
        if entry is None:
            return None
        nearest = symbols.names.nearest_at_or_below(entry)
        if nearest is None or nearest[0] != entry:
            return None
        return nearest[1]
