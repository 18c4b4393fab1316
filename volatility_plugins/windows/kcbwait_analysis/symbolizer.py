"""Turns user-mode addresses into ``module!name+0xNN`` names (docs/output-contract.md, "Symbols").

Names are the module's PDB symbols when Volatility has its PDB's table, else its exports; an
offset is given only inside the name's own function (``runtime_functions``), so an address in an
unexported routine is ``module+0xRVA``, never the previous export's name.

Modules come from the process's own 64-bit PEB loader list (InLoadOrderModuleList); the module
name is the loader entry's BaseDllName exactly as stored (UTF-16, unpaired surrogates kept; the
renderers escape what a terminal must not see, see text.py).  For a WoW64 process only the 64-bit
PEB is walked: the analysis covers the 64-bit side, where system calls and callbacks happen.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Sequence

from volatility3.framework import constants, exceptions, interfaces
from volatility3.plugins.windows.kcbwait_analysis import (
    memory,
    pe_exports,
    read_stats,
    runtime_functions,
    text,
)

# docs/output-contract.md: a leaf routine without unwind data (a system-call stub in some
# builds) is taken to span at most this far from its name.
LEAF_SPAN = 0x20
# A process has a few hundred modules at most; a longer list is corrupt or cyclic.
MAX_LOADER_ENTRIES = 1024
# MAX_PATH-sized names are plenty; UNICODE_STRING.Length is a byte count.
MAX_NAME_BYTES = 0x1000


@dataclass(frozen=True)
class LoadedModule:
    """One InLoadOrderModuleList entry: [base, base + size) named ``name`` (BaseDllName)."""

    base: int
    size: int
    name: str
    path: str

    def contains(self, address: int) -> bool:
        return self.base <= address < self.base + self.size

    @property
    def cache_key(self) -> tuple[int, str]:
        """Images are shared between processes by (base, path); parse each once."""
        return self.base, self.path.lower()


@dataclass(frozen=True)
class ModuleSymbols:
    """What naming addresses in one module copy needs: its names (PDB symbols or exports,
    absolute addresses), its RUNTIME_FUNCTIONs and a reader of its unwind data by RVA."""

    names: pe_exports.ModuleExports | None
    functions: runtime_functions.RuntimeFunctions
    read: runtime_functions.UnwindReader
    from_pdb: bool = False


SymbolsProvider = Callable[[LoadedModule], ModuleSymbols]


def find_module(modules: Sequence[LoadedModule], address: int) -> LoadedModule | None:
    """The first module (in loader order) whose range contains ``address``."""
    for module in modules:
        if module.contains(address):
            return module
    return None


def format_symbol(module: LoadedModule, symbols: ModuleSymbols, address: int) -> str:
    """``module!name`` at a name, ``module!name+0xNN`` inside that name's function, else
    ``module+0xRVA``."""
    names = symbols.names
    nearest = names.nearest_at_or_below(address) if names is not None else None
    if nearest is not None and nearest[0] >= module.base:
        name_address, name = nearest
        distance = address - name_address
        if distance == 0:
            return f"{module.name}!{name}"
        same = runtime_functions.same_function(
            symbols.functions, name_address - module.base, address - module.base, symbols.read
        )
        if same is None:
            following = names.next_above(name_address)
            end = name_address + LEAF_SPAN
            same = address < (end if following is None else min(end, following))
        if same:
            return f"{module.name}!{name}+{distance:#x}"
    return f"{module.name}+{address - module.base:#x}"


class Symbolizer:
    """Symbolizes addresses against one process's module list.

    Symbols are requested lazily from ``symbols_provider`` (which caches per image), so only
    modules that actually contain a reported address are parsed.
    """

    def __init__(self, modules: Sequence[LoadedModule], symbols_provider: SymbolsProvider):
        self.modules = list(modules)
        self._symbols_provider = symbols_provider

    def symbolize(self, address: int | None) -> str | None:
        """The contract's symbol for ``address``; None when no module contains it."""
        if address is None:
            return None
        module = find_module(self.modules, address)
        if module is None:
            return None
        return format_symbol(module, self._symbols_provider(module), address)


def _unicode_string(
    context: interfaces.context.ContextInterface,
    entry_field,
    stats: read_stats.ReadStats | None = None,
) -> str | None:
    """Reads a UNICODE_STRING exactly (every UTF-16 unit of Length bytes), refusing absurd
    lengths; None when empty or unreadable."""
    length = int(entry_field.Length)
    if length > MAX_NAME_BYTES or length == 0:
        return None
    data = memory.read_bytes(
        context, entry_field.vol.layer_name, int(entry_field.Buffer), length, stats
    )
    if data is None:
        return None
    return text.utf16(data)


def process_modules(
    context: interfaces.context.ContextInterface,
    kernel_table_name: str,
    peb: interfaces.objects.ObjectInterface,
    limit: int = MAX_LOADER_ENTRIES,
    stats: read_stats.ReadStats | None = None,
) -> tuple[list[LoadedModule], bool]:
    """Walks the 64-bit PEB's InLoadOrderModuleList, at most ``limit`` entries.

    Returns (modules, complete); ``complete`` is False when the list could not be read to its
    end (entries read before the failure are still returned).
    """
    modules: list[LoadedModule] = []
    entry_type = f"{kernel_table_name}{constants.BANG}_LDR_DATA_TABLE_ENTRY"
    try:
        ldr = peb.Ldr.dereference()
        entries = ldr.InLoadOrderModuleList.to_list(entry_type, "InLoadOrderLinks")
        for entry in itertools.islice(entries, max(0, limit)):
            try:
                base = int(entry.DllBase)
                size = int(entry.SizeOfImage)
                name = _unicode_string(context, entry.BaseDllName, stats)
                path = _unicode_string(context, entry.FullDllName, stats) or name
            except exceptions.InvalidAddressException:
                continue
            if not base or not name:
                continue
            modules.append(LoadedModule(base, size, name, path or name))
    except exceptions.InvalidAddressException:
        return modules, False
    return modules, True
