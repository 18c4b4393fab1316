"""Per-process facts and the per-image caches shared by all processes of one memory image.

A DLL is mapped at the same base in every process of a boot (ntdll always is), and its pages are
shared, so an image's export table and .pdata are parsed once per *copy*: per (base, path) and
the physical pages this process's page tables map its headers, export directory and exception
directory to.  Processes that map the same physical pages share one parse; a process whose
tables map a page elsewhere (a private copy, a smeared or hostile page-table entry) gets its own,
so damage in one process can never change what another process's threads report.  When this
process's copy of a page is unreadable (paged out), the same image in up to MAX_COPIES_TRIED
other processes is tried before giving up (docs/output-contract.md: the one way another
process's memory is used).  Every cache is bounded, so a hostile image with huge process or
module lists costs bounded memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Tuple

from volatility3.framework import exceptions, interfaces
from volatility3.plugins.windows import pslist
from volatility3.plugins.windows.kcbwait_analysis import (
    kernel_facts,
    memory,
    ntdll_exports,
    pdb_names,
    pe_exports,
    process_tables,
    read_stats,
    results,
    runtime_functions,
    stack_walk,
    symbolizer,
    text,
)

vollog = logging.getLogger(__name__)

# Bounds on the process list walked to find other copies of an image.
MAX_PROCESSES = 0x4000
# Loader entries kept over all processes of an image (a busy real system has ~50,000).
MAX_TOTAL_MODULES = 0x40000
# Other processes' copies of an image tried when one copy's pages are unreadable.
MAX_COPIES_TRIED = 16
# Export tables kept in the cache (each at most pe_exports.MAX_EXPORTS entries); the oldest is
# dropped beyond this, and re-parsed if asked for again.
MAX_CACHED_IMAGES = 0x1000
# EPROCESS.ImageFileName is UCHAR[15].
IMAGE_FILE_NAME_LENGTH = 15

ImageKey = Tuple[int, str]
Fingerprint = tuple
"""(base, path, physical pages of headers, export and exception directories in one layer)."""


@dataclass
class ProcessInfo:
    """What the analysis needs from one EPROCESS and its 64-bit PEB."""

    offset: int
    summary: results.ProcessSummary
    layer_name: str | None
    peb_readable: bool = False
    kernel_callback_table: int | None = None
    """PEB.KernelCallbackTable; None when the PEB or the field could not be read."""
    modules: list[symbolizer.LoadedModule] = field(default_factory=list)
    proc: interfaces.objects.ObjectInterface | None = None
    """The EPROCESS itself, for the VAD tree and the WoW64 and instrumentation fields."""

    @property
    def ntdll(self) -> symbolizer.LoadedModule | None:
        """The 64-bit ntdll.dll of this process's loader list."""
        for module in self.modules:
            if module.name.lower() == ntdll_exports.NTDLL_NAME:
                return module
        return None


def _image_file_name(
    context: interfaces.context.ContextInterface,
    proc: interfaces.objects.ObjectInterface,
    stats: read_stats.ReadStats | None = None,
) -> str | None:
    """EPROCESS.ImageFileName exactly: its bytes up to the first NUL, as Latin-1."""
    field_object = proc.ImageFileName
    data = memory.read_bytes(
        context,
        field_object.vol.layer_name,
        field_object.vol.offset,
        IMAGE_FILE_NAME_LENGTH,
        stats,
    )
    return None if data is None else text.latin1(data)


def _process_summary(
    context: interfaces.context.ContextInterface,
    proc: interfaces.objects.ObjectInterface,
    stats: read_stats.ReadStats | None = None,
) -> results.ProcessSummary:
    unreadable = set()
    try:
        pid: int | None = int(proc.UniqueProcessId)
    except exceptions.InvalidAddressException:
        pid = None
        unreadable.add(results.Field.PID)
    name = _image_file_name(context, proc, stats)
    if name is None:
        unreadable.add(results.Field.PROCESS)
    try:
        wow64: bool | None = bool(proc.get_is_wow64())
    except exceptions.InvalidAddressException:
        wow64 = None
        unreadable.add(results.Field.WOW64)
    return results.ProcessSummary(pid, name, wow64, frozenset(unreadable))


def read_process_info(
    context: interfaces.context.ContextInterface,
    facts: kernel_facts.KernelFacts,
    proc: interfaces.objects.ObjectInterface,
    module_budget: int = symbolizer.MAX_LOADER_ENTRIES,
    stats: read_stats.ReadStats | None = None,
) -> ProcessInfo:
    """Builds ProcessInfo; unreadable parts are left empty, never raised."""
    info = ProcessInfo(proc.vol.offset, _process_summary(context, proc, stats), None, proc=proc)
    try:
        info.layer_name = proc.add_process_layer()
        peb = proc.get_peb()
    except exceptions.InvalidAddressException:
        return info
    info.peb_readable = True
    try:
        info.kernel_callback_table = int(peb.KernelCallbackTable)
    except exceptions.InvalidAddressException:
        info.kernel_callback_table = None
    info.modules, _complete = symbolizer.process_modules(
        context, facts.table_name, peb, module_budget, stats
    )
    return info


def listed_processes(
    context: interfaces.context.ContextInterface,
    kernel_module_name: str,
    pids: list[int] | None = None,
) -> list[interfaces.objects.ObjectInterface]:
    """The processes pslist walks (narrowed to ``pids``), at most MAX_PROCESSES."""
    return list(
        memory.bounded(
            pslist.PsList.list_processes(
                context, kernel_module_name, filter_func=pslist.PsList.create_pid_filter(pids)
            ),
            MAX_PROCESSES,
        )
    )


class ImageCatalog:
    """Per-image caches: export tables, ntdll facts and process infos, keyed so that each image
    is parsed once per run."""

    def __init__(
        self,
        context: interfaces.context.ContextInterface,
        facts: kernel_facts.KernelFacts,
        all_processes: Callable[[], Iterable[interfaces.objects.ObjectInterface]],
        stats: read_stats.ReadStats | None = None,
    ) -> None:
        self._context = context
        self.stats = stats
        self.facts = facts
        self._all_processes = all_processes
        self._infos: dict[int, ProcessInfo] = {}
        self._modules_left = MAX_TOTAL_MODULES
        self._exports: dict[Fingerprint, pe_exports.ExportsRead] = {}
        self._fingerprints: dict[tuple[str | None, ImageKey], Fingerprint] = {}
        self._ntdll: dict[tuple[Fingerprint, int], ntdll_exports.NtdllFacts] = {}
        self._copies: dict[ImageKey, list[str]] | None = None
        self._by_address: dict[int, ProcessInfo] | None = None
        self._symbols: dict[Fingerprint, symbolizer.ModuleSymbols] = {}
        self._unwind_sources: dict[tuple[str | None, Fingerprint], stack_walk.UnwindSource] = {}
        self._unwind_functions: dict[
            Fingerprint, tuple[runtime_functions.RuntimeFunctions, runtime_functions.DirectoryState]
        ] = {}
        self._headers: dict[bytes, tuple[pe_exports.ImageHeaders | None, str | None]] = {}
        self.pdb_names = pdb_names.PdbNames(context)
        self._image_ntdll: tuple[str | None, symbolizer.LoadedModule | None] | None = None
        self.tables = process_tables.ProcessTables(context, facts, self.module_symbols, stats)
        """Callback tables, VADs and instrumentation callbacks of this image's processes."""

    @classmethod
    def for_kernel(
        cls,
        context: interfaces.context.ContextInterface,
        kernel_module_name: str,
        stats: read_stats.ReadStats | None = None,
    ) -> ImageCatalog:
        """The catalog of the image whose kernel module is ``kernel_module_name``."""
        return cls(
            context,
            kernel_facts.KernelFacts.resolve(context, kernel_module_name),
            lambda: pslist.PsList.list_processes(context, kernel_module_name),
            stats,
        )

    def process_info(self, proc: interfaces.objects.ObjectInterface) -> ProcessInfo:
        """ProcessInfo for ``proc``, built once per EPROCESS."""
        offset = proc.vol.offset
        if offset not in self._infos:
            budget = min(symbolizer.MAX_LOADER_ENTRIES, self._modules_left)
            info = read_process_info(self._context, self.facts, proc, budget, self.stats)
            self._modules_left -= len(info.modules)
            self._infos[offset] = info
        return self._infos[offset]

    def _listed(self) -> Iterable[ProcessInfo]:
        for proc in memory.bounded(self._all_processes(), MAX_PROCESSES):
            yield self.process_info(proc)

    def process_at(self, address: int, mask: int) -> ProcessInfo | None:
        """The listed process whose EPROCESS is at ``address`` (compared under ``mask``, the
        kernel layer's address mask), or None."""
        if self._by_address is None:
            self._by_address = {}
            for info in self._listed():
                self._by_address.setdefault(info.offset & mask, info)
        return self._by_address.get(address & mask)

    def _copies_index(self) -> dict[ImageKey, list[str]]:
        """(base, path) -> process layers mapping that image, over every listed process."""
        if self._copies is None:
            self._copies = {}
            for info in self._listed():
                if info.layer_name is None:
                    continue
                for module in info.modules:
                    self._copies.setdefault(module.cache_key, []).append(info.layer_name)
        return self._copies

    def _layers_for(self, module: symbolizer.LoadedModule, preferred: str | None):
        """The preferred layer first, then up to MAX_COPIES_TRIED other processes' copies of
        the same image."""
        if preferred is not None:
            yield preferred
        others = [n for n in self._copies_index().get(module.cache_key, []) if n != preferred]
        yield from others[:MAX_COPIES_TRIED]

    def fingerprint(self, module: symbolizer.LoadedModule, layer_name: str | None) -> Fingerprint:
        """Which physical copy of ``module`` the process layer ``layer_name`` sees (once per
        layer and image): the pages its headers and directories translate to."""
        key = (layer_name, module.cache_key)
        if key not in self._fingerprints:
            pages: list[tuple[int, int, str]] = []
            if layer_name is not None:
                spans = [(module.base, pe_exports.HEADER_SIZE)]
                headers, _problem = self.headers(layer_name, module.base)
                if headers is not None:
                    for directory, cap in (
                        (headers.export, pe_exports.MAX_EXPORT_DIRECTORY),
                        (headers.exception, ntdll_exports.MAX_EXCEPTION_DIRECTORY),
                    ):
                        if pe_exports.directory_in_image(headers, directory, cap):
                            spans.append((module.base + directory.rva, directory.size))
                    # The CodeView record says which PDB names the module: a copy whose record
                    # cannot be read must not borrow another copy's PDB names.
                    if pe_exports.directory_in_image(
                        headers, headers.debug, pdb_names.MAX_DEBUG_DIRECTORY
                    ):
                        spans.append((module.base + headers.debug.rva, headers.debug.size))
                    location = pdb_names.codeview_location(
                        self._context, layer_name, module.base, headers, self.stats
                    )
                    if location is not None:
                        spans.append((module.base + location[0], location[1]))
                layer = self._context.layers[layer_name]
                for start, size in spans:
                    try:
                        mapped = layer.mapping(start, size, ignore_errors=True)
                        pages.extend((m[2], m[3], m[4]) for m in mapped)
                    except exceptions.InvalidAddressException:
                        pages.append((start, -1, "unmapped"))
            if len(self._fingerprints) >= MAX_CACHED_IMAGES * 4:
                del self._fingerprints[next(iter(self._fingerprints))]
            self._fingerprints[key] = (*module.cache_key, tuple(pages))
        return self._fingerprints[key]

    def exports_read(
        self, module: symbolizer.LoadedModule, preferred_layer: str | None
    ) -> pe_exports.ExportsRead:
        """Export table of ``module`` as the process layer ``preferred_layer`` maps it (parsed
        once per physical copy); if that copy is unreadable, from the first other process's
        copy that parses; else INVALID if any copy was read but corrupt, else UNREADABLE."""
        key = self.fingerprint(module, preferred_layer)
        if key not in self._exports:
            result = pe_exports.ExportsRead(None, pe_exports.UNREADABLE)
            for layer_name in self._layers_for(module, preferred_layer):
                attempt = pe_exports.read_module_exports(
                    self._context, layer_name, module.base, self.stats
                )
                if attempt.exports is not None:
                    result = attempt
                    break
                if attempt.problem == pe_exports.INVALID:
                    result = attempt
                    if layer_name == preferred_layer:
                        break  # this process's own copy was read: it is what it maps
            if len(self._exports) >= MAX_CACHED_IMAGES:
                del self._exports[next(iter(self._exports))]
            self._exports[key] = result
        return self._exports[key]

    def exports(
        self, module: symbolizer.LoadedModule, preferred_layer: str | None
    ) -> pe_exports.ModuleExports | None:
        """Export table of ``module``, or None if no copy is readable and valid."""
        return self.exports_read(module, preferred_layer).exports

    def _pdata(self, module: symbolizer.LoadedModule, preferred: str | None) -> bytes | None:
        for layer_name in self._layers_for(module, preferred):
            pdata = ntdll_exports.read_exception_directory(
                self._context, layer_name, module.base, self.stats
            )
            if pdata is not None:
                return pdata
        return None

    def ntdll_facts(
        self, module: symbolizer.LoadedModule | None, layer_name: str | None
    ) -> ntdll_exports.NtdllFacts:
        """Facts for the ntdll image ``module`` (once per physical copy and size: the size
        bounds the kernel's dispatcher check, so a process whose loader entry lies about it
        cannot change another process's facts).

        With no module, the boot's ntdll as found in the first process that lists one is used,
        and failing that only the kernel's dispatcher address is known.
        """
        if module is None:
            layer_name, module = self._boot_ntdll()
        if module is None:
            return ntdll_exports.build_facts(
                None,
                0,
                None,
                None,
                self.facts.dispatcher,
                kernel_dispatcher_return=self.facts.dispatcher_return,
            )
        key = (self.fingerprint(module, layer_name), module.size)
        if key not in self._ntdll:
            read = self.exports_read(module, layer_name)
            pdata = self._pdata(module, layer_name)
            facts = ntdll_exports.build_facts(
                module.base,
                module.size,
                read.exports,
                pdata,
                self.facts.dispatcher,
                read.problem,
                self.facts.dispatcher_return,
            )
            vollog.debug(
                f"ntdll {module.path!r} at {module.base:#x}: exports "
                f"{read.problem or 'read'}, .pdata "
                f"{'read' if pdata is not None else 'absent'}, KiUserCallbackDispatcher "
                f"{facts.dispatcher and hex(facts.dispatcher)} range "
                f"{facts.dispatcher_range and tuple(map(hex, facts.dispatcher_range))}"
            )
            if len(self._ntdll) >= MAX_CACHED_IMAGES:
                del self._ntdll[next(iter(self._ntdll))]
            self._ntdll[key] = facts
        return self._ntdll[key]

    def _boot_ntdll(self) -> tuple[str | None, symbolizer.LoadedModule | None]:
        if self._image_ntdll is None:
            self._image_ntdll = (None, None)
            for info in self._listed():
                if info.ntdll is not None:
                    self._image_ntdll = (info.layer_name, info.ntdll)
                    break
        return self._image_ntdll

    def module_symbols(
        self, module: symbolizer.LoadedModule, layer_name: str | None
    ) -> symbolizer.ModuleSymbols:
        """Names and functions of ``module`` as ``layer_name`` maps it (once per copy): PDB
        symbols when Volatility has the module's PDB table, else exports."""
        key = self.fingerprint(module, layer_name)
        if key not in self._symbols:
            names = self.exports(module, layer_name)
            from_pdb = False
            if layer_name is not None:
                codeview = self._codeview(module, layer_name)
                pdb = self.pdb_names.names(codeview) if codeview is not None else None
                if pdb:
                    names = pe_exports.ModuleExports.from_pairs(
                        module.base, ((n, module.base + rva) for n, rva in pdb)
                    )
                    from_pdb = True
            functions = runtime_functions.RuntimeFunctions.parse(self._pdata(module, layer_name))
            if len(self._symbols) >= MAX_CACHED_IMAGES:
                del self._symbols[next(iter(self._symbols))]
            self._symbols[key] = symbolizer.ModuleSymbols(
                names, functions, self._unwind_reader(module, layer_name), from_pdb
            )
        return self._symbols[key]

    def headers(
        self, layer_name: str, base: int
    ) -> tuple[pe_exports.ImageHeaders | None, str | None]:
        """The PE headers at ``base`` (parsed once per distinct header page: every process
        maps the same DLL headers)."""
        raw = memory.read_bytes(self._context, layer_name, base, pe_exports.HEADER_SIZE, self.stats)
        if raw is None:
            return None, pe_exports.UNREADABLE
        if raw not in self._headers:
            if len(self._headers) >= MAX_CACHED_IMAGES:
                del self._headers[next(iter(self._headers))]
            self._headers[raw] = pe_exports.headers_from_bytes(raw)
        return self._headers[raw]

    def unwind_source(
        self, module: symbolizer.LoadedModule, layer_name: str | None
    ) -> stack_walk.UnwindSource:
        """``module``'s RUNTIME_FUNCTIONs for unwinding: the process's own mapping of the
        exception directory, else the first complete copy in another process (same base and
        path), parsed once per physical copy; UNWIND_INFO is read from the own mapping."""
        fingerprint = self.fingerprint(module, layer_name)
        key = (layer_name, fingerprint)
        if key not in self._unwind_sources:
            if fingerprint not in self._unwind_functions:
                if len(self._unwind_functions) >= MAX_CACHED_IMAGES:
                    del self._unwind_functions[next(iter(self._unwind_functions))]
                self._unwind_functions[fingerprint] = self._read_unwind_functions(
                    module, layer_name
                )
            functions, state = self._unwind_functions[fingerprint]
            if len(self._unwind_sources) >= MAX_CACHED_IMAGES:
                del self._unwind_sources[next(iter(self._unwind_sources))]
            self._unwind_sources[key] = stack_walk.UnwindSource(
                functions, state, self._unwind_reader(module, layer_name)
            )
        return self._unwind_sources[key]

    def _read_unwind_functions(
        self, module: symbolizer.LoadedModule, layer_name: str | None
    ) -> tuple[runtime_functions.RuntimeFunctions, runtime_functions.DirectoryState]:
        data, state = None, runtime_functions.DirectoryState.INCOMPLETE
        for candidate in self._layers_for(module, layer_name):
            headers, _problem = self.headers(candidate, module.base)
            read = ntdll_exports.unwind_directory_of(
                self._context, candidate, module.base, headers, self.stats
            )
            if data is None or read[1] is runtime_functions.DirectoryState.COMPLETE:
                data, state = read
            if state is runtime_functions.DirectoryState.COMPLETE:
                break
        return runtime_functions.RuntimeFunctions.parse(data), state

    def _codeview(
        self, module: symbolizer.LoadedModule, layer_name: str
    ) -> pdb_names.CodeView | None:
        headers, _problem = self.headers(layer_name, module.base)
        if headers is None:
            return None
        return pdb_names.read_codeview(self._context, layer_name, module.base, headers, self.stats)

    def _unwind_reader(
        self, module: symbolizer.LoadedModule, layer_name: str | None
    ) -> runtime_functions.UnwindReader:
        def read(rva: int, length: int) -> bytes | None:
            if layer_name is None or not 0 <= rva < module.size:
                return None
            return memory.read_bytes(
                self._context, layer_name, module.base + rva, length, self.stats
            )

        return read

    def symbolizer(self, info: ProcessInfo) -> symbolizer.Symbolizer:
        """A Symbolizer over ``info``'s modules backed by this catalog's caches."""
        return symbolizer.Symbolizer(
            info.modules, lambda module: self.module_symbols(module, info.layer_name)
        )
