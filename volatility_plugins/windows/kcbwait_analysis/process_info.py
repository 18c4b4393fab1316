"""Per-process facts and the per-image caches shared by all processes of one memory image.

A DLL is mapped at the same base in every process of a boot (ntdll always is), so an image's
export table and .pdata are parsed once per (base, path).  When this process's copy of a page is
unreadable (paged out), the same image in another process is tried before giving up.
"""

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from volatility3.framework import exceptions, interfaces
from volatility3.framework.objects import utility
from volatility3.plugins.windows.kcbwait_analysis import (
    kernel_facts,
    memory,
    ntdll_exports,
    pe_exports,
    results,
    symbolizer,
)

vollog = logging.getLogger(__name__)

# Bounds on the process list walked to find other copies of an image.
MAX_PROCESSES = 0x4000

ImageKey = tuple[int, str]


@dataclass
class ProcessInfo:
    """What the analysis needs from one EPROCESS and its 64-bit PEB."""

    offset: int
    summary: results.ProcessSummary
    layer_name: str | None
    peb_readable: bool = False
    kernel_callback_table: int | None = None
    modules: list[symbolizer.LoadedModule] = field(default_factory=list)

    @property
    def ntdll(self) -> symbolizer.LoadedModule | None:
        """The 64-bit ntdll.dll of this process's loader list."""
        for module in self.modules:
            if module.name.lower() == ntdll_exports.NTDLL_NAME:
                return module
        return None


def _process_summary(proc: interfaces.objects.ObjectInterface) -> results.ProcessSummary:
    unreadable = set()
    try:
        pid: int | None = int(proc.UniqueProcessId)
    except exceptions.InvalidAddressException:
        pid = None
        unreadable.add("PID")
    try:
        name: str | None = utility.array_to_string(proc.ImageFileName)
    except exceptions.InvalidAddressException:
        name = None
        unreadable.add("Process")
    try:
        wow64: bool | None = bool(proc.get_is_wow64())
    except exceptions.InvalidAddressException:
        wow64 = None
        unreadable.add("Wow64")
    return results.ProcessSummary(pid, name, wow64, frozenset(unreadable))


def read_process_info(
    context: interfaces.context.ContextInterface,
    facts: kernel_facts.KernelFacts,
    proc: interfaces.objects.ObjectInterface,
) -> ProcessInfo:
    """Builds ProcessInfo; unreadable parts are left empty, never raised."""
    info = ProcessInfo(proc.vol.offset, _process_summary(proc), None)
    try:
        info.layer_name = proc.add_process_layer()
        peb = proc.get_peb()
    except exceptions.InvalidAddressException:
        return info
    info.peb_readable = True
    try:
        info.kernel_callback_table = int(peb.KernelCallbackTable) or None
    except exceptions.InvalidAddressException:
        info.kernel_callback_table = None
    info.modules, _complete = symbolizer.process_modules(context, facts.table_name, peb)
    return info


class ImageCatalog:
    """Per-image caches: export tables, ntdll facts and process infos, keyed so that each image
    is parsed once per run."""

    def __init__(
        self,
        context: interfaces.context.ContextInterface,
        facts: kernel_facts.KernelFacts,
        all_processes: Callable[[], Iterable[interfaces.objects.ObjectInterface]],
    ) -> None:
        self._context = context
        self.facts = facts
        self._all_processes = all_processes
        self._infos: dict[int, ProcessInfo] = {}
        self._exports: dict[ImageKey, pe_exports.ModuleExports | None] = {}
        self._ntdll: dict[ImageKey, ntdll_exports.NtdllFacts] = {}
        self._copies: dict[ImageKey, list[str]] | None = None
        self._image_ntdll: tuple[str | None, symbolizer.LoadedModule | None] | None = None

    def process_info(self, proc: interfaces.objects.ObjectInterface) -> ProcessInfo:
        """ProcessInfo for ``proc``, built once per EPROCESS."""
        offset = proc.vol.offset
        if offset not in self._infos:
            self._infos[offset] = read_process_info(self._context, self.facts, proc)
        return self._infos[offset]

    def _copies_index(self) -> dict[ImageKey, list[str]]:
        """(base, path) -> process layers mapping that image, over every listed process."""
        if self._copies is None:
            self._copies = {}
            processes = memory.bounded(self._all_processes(), MAX_PROCESSES)
            for proc in processes:
                info = self.process_info(proc)
                if info.layer_name is None:
                    continue
                for module in info.modules:
                    self._copies.setdefault(module.cache_key, []).append(info.layer_name)
        return self._copies

    def _layers_for(self, module: symbolizer.LoadedModule, preferred: str | None):
        """The preferred layer first, then every other process's copy of the same image."""
        if preferred is not None:
            yield preferred
        for layer_name in self._copies_index().get(module.cache_key, []):
            if layer_name != preferred:
                yield layer_name

    def exports(
        self, module: symbolizer.LoadedModule, preferred_layer: str | None
    ) -> pe_exports.ModuleExports | None:
        """Export table of ``module`` (parsed once per (base, path)), or None if no process's
        copy of its export directory is readable."""
        key = module.cache_key
        if key not in self._exports:
            parsed = None
            for layer_name in self._layers_for(module, preferred_layer):
                parsed = pe_exports.read_module_exports(self._context, layer_name, module.base)
                if parsed is not None:
                    break
            self._exports[key] = parsed
        return self._exports[key]

    def _pdata(self, module: symbolizer.LoadedModule, preferred: str | None) -> bytes | None:
        for layer_name in self._layers_for(module, preferred):
            pdata = ntdll_exports.read_exception_directory(self._context, layer_name, module.base)
            if pdata is not None:
                return pdata
        return None

    def ntdll_facts(
        self, module: symbolizer.LoadedModule | None, layer_name: str | None
    ) -> ntdll_exports.NtdllFacts:
        """Facts for the ntdll image ``module`` (once per (base, path)).

        With no module, the boot's ntdll as found in the first process that lists one is used,
        and failing that only the kernel's dispatcher address is known.
        """
        if module is None:
            layer_name, module = self._boot_ntdll()
        if module is None:
            return ntdll_exports.build_facts(None, 0, None, None, self.facts.dispatcher)
        key = module.cache_key
        if key not in self._ntdll:
            exports = self.exports(module, layer_name)
            pdata = self._pdata(module, layer_name)
            facts = ntdll_exports.build_facts(
                module.base, module.size, exports, pdata, self.facts.dispatcher
            )
            vollog.debug(
                f"ntdll {module.path} at {module.base:#x}: exports "
                f"{'read' if exports is not None else 'unreadable'}, .pdata "
                f"{'read' if pdata is not None else 'absent'}, KiUserCallbackDispatcher "
                f"{facts.dispatcher and hex(facts.dispatcher)} range "
                f"{facts.dispatcher_range and tuple(map(hex, facts.dispatcher_range))}"
            )
            self._ntdll[key] = facts
        return self._ntdll[key]

    def _boot_ntdll(self) -> tuple[str | None, symbolizer.LoadedModule | None]:
        if self._image_ntdll is None:
            self._image_ntdll = (None, None)
            for proc in memory.bounded(self._all_processes(), MAX_PROCESSES):
                info = self.process_info(proc)
                if info.ntdll is not None:
                    self._image_ntdll = (info.layer_name, info.ntdll)
                    break
        return self._image_ntdll

    def symbolizer(self, info: ProcessInfo) -> symbolizer.Symbolizer:
        """A Symbolizer over ``info``'s modules backed by this catalog's export cache."""
        return symbolizer.Symbolizer(
            info.modules, lambda module: self.exports(module, info.layer_name)
        )
