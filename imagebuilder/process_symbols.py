"""Symbols of addresses in one process, by docs/output-contract.md ("Symbols").

Names come from a module's PDB when the scenario has the builder write an ISF for it and the
process can read the module's CodeView record, else from its exports (ntdll: the exports the
plugin can still use).  Offsets are function-accurate: ``module!S+0xN`` only when the address
and the name lie in the same function, by the RUNTIME_FUNCTIONs the builder laid out (chained
entries resolved to their primary), or both in no function and close (the leaf rule); else
``module+0xRVA``.  Everything comes from the builder's own records of what it placed.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from imagebuilder.function_table import FunctionTable
from imagebuilder.module_image import ModuleImage

LEAF_SPAN = 0x20  # contract: a leaf routine's offsets run at most 0x20 bytes past its name
MAX_CALLBACK_TABLE_ENTRIES = 0x400  # contract: Callback is null from this ApiNumber on


@dataclass(frozen=True)
class ModuleSymbols:
    """How one module's addresses are named in one process."""

    module: ModuleImage
    names: Mapping[str, int]  # name -> RVA: the PDB's symbols or the usable exports
    functions: FunctionTable | None  # None: the process cannot read the module's .pdata
    pdb: bool  # names come from the module's PDB
    _index: tuple[list[int], list[str]] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        first: dict[int, str] = {}
        for name, rva in self.names.items():
            if rva not in first or name < first[rva]:
                first[rva] = name  # several names at one address: the alphabetically first
        rvas = sorted(first)
        object.__setattr__(self, "_index", (rvas, [first[r] for r in rvas]))

    def name_at(self, rva: int) -> str | None:
        rvas, names = self._index
        index = bisect.bisect_left(rvas, rva)
        return names[index] if index < len(rvas) and rvas[index] == rva else None

    def symbol(self, rva: int) -> str:
        module = self.module.name
        rvas, names = self._index
        index = bisect.bisect_right(rvas, rva) - 1
        if index < 0:
            return f"{module}+{rva:#x}"
        at, name = rvas[index], names[index]
        if rva == at:
            return f"{module}!{name}"
        if self._same_function(rva, at, rvas[index + 1] if index + 1 < len(rvas) else None):
            return f"{module}!{name}+{rva - at:#x}"
        return f"{module}+{rva:#x}"

    def _same_function(self, rva: int, at: int, next_name: int | None) -> bool:
        table = self.functions
        primary = table.primary(rva) if table is not None else None
        name_primary = table.primary(at) if table is not None else None
        if primary is not None or name_primary is not None:
            return primary == name_primary
        limit = at + LEAF_SPAN if next_name is None else min(next_name, at + LEAF_SPAN)
        return rva < limit


@dataclass(frozen=True)
class ProcessSymbols:
    """Every loaded module of a process, and how to read its memory (for Callback)."""

    modules: tuple[ModuleSymbols, ...] = ()
    # (address, size) -> the bytes as the builder left them in this process, None if unmapped
    read: Callable[[int, int], bytes | None] = field(default=lambda _a, _s: None, compare=False)

    def symbolize(self, address: int | None) -> str | None:
        if address is None:
            return None
        for entry in self.modules:
            if entry.module.contains(address):
                return entry.symbol(address - entry.module.base)
        return None

    def callback(self, api: int | None) -> str | None:
        """Contract "Callback": the PDB name at user32's original table entry ``api``, as this
        process's user32 mapping holds it."""
        user32 = next(
            (m for m in self.modules if m.module.name.lower() == "user32.dll" and m.pdb), None
        )
        if api is None or api >= MAX_CALLBACK_TABLE_ENTRIES or user32 is None:
            return None
        table = user32.names.get("apfnDispatch")
        if table is None:
            return None
        data = self.read(user32.module.base + table + 8 * api, 8)
        if data is None:
            return None
        target = int.from_bytes(data, "little")
        if not user32.module.contains(target):
            return None
        return user32.name_at(target - user32.module.base)
