"""A built PE image as it is mapped at its base, with the facts the truth file needs."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from imagebuilder.codeview import CodeView, stamp_guid
from imagebuilder.function_table import FunctionTable
from imagebuilder.pe_image import PAGE, PeImage, set_image_base


@dataclass
class ModuleImage:
    name: str
    path: str
    base: int
    data: bytes
    exports: dict[str, int]  # name -> RVA
    export_dir: tuple[int, int] = (0, 0)  # RVA, size
    # RVA, size: pages a process gets its own copy of (the callback table a hijack rewrites)
    data_section: tuple[int, int] = (0, 0)
    extras: dict[str, int] = field(default_factory=dict)
    export_layout: dict[str, Any] = field(default_factory=dict)  # PeImage.export_layout
    pdata: tuple[int, int] = (0, 0)  # RVA, size of the exception directory
    # Exports the builder places on purpose (the rest are filler for a real export count); the
    # truth file's inventory lists only these.  Empty: all exports.
    notable: frozenset[str] = frozenset()
    # user32: callback handler RVA -> RVA just after its `call [__imp_NtCallbackReturn]`, the
    # return address on the stack of a thread resting in NtCallbackReturn called from there.
    handler_returns: dict[int, int] = field(default_factory=dict)
    # Every RUNTIME_FUNCTION with the primary entry it chains to.
    functions: FunctionTable = field(default_factory=FunctionTable)
    # What the module's PDB names (name -> RVA): functions, exports, public data.
    pdb_symbols: dict[str, int] = field(default_factory=dict)
    codeview: CodeView | None = None
    debug_page: int = 0  # RVA of the page holding the debug directory and RSDS record
    # Begin RVA of each RUNTIME_FUNCTION -> what its unwind data does (unwind_info.ops_of,
    # chains resolved) and the RVA of its UNWIND_INFO: the builder's own record for the truth.
    unwind_ops: dict[int, tuple] = field(default_factory=dict)
    unwind_records: dict[int, int] = field(default_factory=dict)
    # Functions with call sites the stack layouts use: name -> (RVA, StackFunction).
    stack_functions: dict[str, tuple[int, Any]] = field(default_factory=dict)
    # user32: framed callback handler RVA -> {callee function name: RVA of the return
    # address after the handler's call to it}.
    handler_calls: dict[int, dict[str, int]] = field(default_factory=dict)

    def stack_function(self, name: str) -> tuple[int, Any] | None:
        """(address, StackFunction) of a stack function of this module."""
        found = self.stack_functions.get(name)
        return None if found is None else (self.base + found[0], found[1])

    @property
    def size(self) -> int:
        return len(self.data)

    def address(self, export: str) -> int:
        return self.base + self.exports[export]

    def contains(self, address: int) -> bool:
        return self.base <= address < self.base + self.size

    def inventory_exports(self) -> dict[str, int]:
        """Name -> address of the notable exports (all when none are marked)."""
        names = [n for n in self.exports if not self.notable or n in self.notable]
        return {n: self.base + self.exports[n] for n in names}

    @cached_property
    def _export_index(self) -> tuple[list[int], list[str]]:
        """Distinct export RVAs ascending, each with its alphabetically first name."""
        first: dict[int, str] = {}
        for name, rva in self.exports.items():
            if rva not in first or name < first[rva]:
                first[rva] = name
        rvas = sorted(first)
        return rvas, [first[r] for r in rvas]

    def nearest_export(self, rva: int) -> tuple[int, str] | None:
        """(RVA, name) of the export at or nearest below ``rva``; the alphabetically first
        name where several share an address."""
        rvas, names = self._export_index
        index = bisect.bisect_right(rvas, rva) - 1
        return (rvas[index], names[index]) if index >= 0 else None


def mapped(
    img: PeImage,
    path: str,
    base: int,
    codeview_record: tuple[int, int, str] | None = None,
    **facts: Any,
) -> ModuleImage:
    """The built image as it is mapped at ``base``, with its export facts; its RSDS record
    (RVA, age, PDB path), when it has one, gets the GUID of the finished bytes."""
    data = set_image_base(bytes(img), base)
    if codeview_record is not None:
        rva, age, pdb_path = codeview_record
        data, guid = stamp_guid(data, rva)
        facts.update(codeview=CodeView(guid, age, pdb_path), debug_page=rva & ~(PAGE - 1))
    return ModuleImage(
        img.name,
        path,
        base,
        data,
        img.exports,
        export_dir=(img.export_rva, img.export_size),
        export_layout=img.export_layout,
        pdata=(img.pdata_rva, 12 * len(img.pdata)) if img.pdata else (0, 0),
        **facts,
    )


def plan_facts(plan: Any) -> dict[str, Any]:
    """What an ImagePlan knows beyond the bytes, for ``mapped``: functions, PDB names, the
    RSDS record."""
    return {
        "functions": plan.function_table(),
        "pdb_symbols": plan.public_symbols(),
        "codeview_record": plan.codeview_record,
        "unwind_ops": dict(plan.unwind_ops),
        "unwind_records": plan.unwind_record_rvas(),
        "stack_functions": dict(plan.stack_functions),
    }
