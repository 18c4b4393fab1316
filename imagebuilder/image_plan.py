"""Places routines and data in the sections of a PE image, then links it into a PeImage.

Sections follow each other page by page from RVA 0x1000, as a linker lays them out, and every
routine with a frame gets its RUNTIME_FUNCTION (.pdata) and a shared UNWIND_INFO (.rdata).
Labels name routines and data; a piece of code refers to a label and is resolved only once
everything has been placed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from imagebuilder.codeview import DEBUG_DIRECTORY_SIZE, debug_directory_entry, rsds_record
from imagebuilder.function_table import FunctionTable, resolve_primaries
from imagebuilder.pe_image import (
    PAGE,
    PeImage,
    export_directory_size,
    new_image,
    page_up,
)
from imagebuilder.unwind_info import (
    UnwindCode,
    chained_unwind,
    frame_unwind,
    ops_of,
    unwind_info,
)
from imagebuilder.x64_code import (
    INT3,
    Code,
    Routine,
    Rva32,
    abs64_offsets,
    assemble,
    code_size,
)

IMAGE_DIRECTORY_ENTRY_IMPORT = 1
IMAGE_DIRECTORY_ENTRY_RESOURCE = 2
IMAGE_DIRECTORY_ENTRY_BASERELOC = 5
IMAGE_DIRECTORY_ENTRY_DEBUG = 6
IMAGE_DIRECTORY_ENTRY_IAT = 12
IMAGE_REL_BASED_DIR64 = 10
RUNTIME_FUNCTION_SIZE = 12


@dataclass
class _Placed:
    section: str
    rva: int
    code: Code


@dataclass
class ImagePlan:
    name: str
    base: int
    labels: dict[str, int] = field(default_factory=dict)
    exports: dict[str, str] = field(default_factory=dict)  # export name -> label
    sections: list[tuple[str, int, str]] = field(default_factory=list)  # name, RVA, kind
    directories: dict[int, tuple[int, int]] = field(default_factory=dict)
    cursor: int = PAGE
    _items: list[_Placed] = field(default_factory=list)
    # begin RVA, end RVA, label of the UNWIND_INFO
    _functions: list[tuple[int, int, str]] = field(default_factory=list)
    _unwind: dict[Code, str] = field(default_factory=dict)  # UNWIND_INFO -> its label
    # begin RVA -> begin RVA of the parent entry, for entries with chained UNWIND_INFO
    _parents: dict[int, int] = field(default_factory=dict)
    # Data labels the module's PDB names beside its code (apfnDispatch, ...).
    public_data: set[str] = field(default_factory=set)
    # RSDS record: RVA, age, PDB path (GUID stamped when the image is mapped)
    codeview_record: tuple[int, int, str] | None = None
    _export_rva: int = 0
    _pdata_rva: int = 0
    # begin RVA -> what the entry's unwind data does, chains resolved (unwind_info.ops_of)
    unwind_ops: dict[int, tuple] = field(default_factory=dict)
    # stack function name -> (RVA, StackFunction) (stack_functions.py)
    stack_functions: dict[str, tuple[int, Any]] = field(default_factory=dict)

    # -- placing ---------------------------------------------------------------------------------
    def section(self, name: str, kind: str) -> int:
        """Starts section ``name`` ('code', 'rdata' or 'data') on the next page."""
        self.cursor = page_up(self.cursor) if self.sections else PAGE
        self.sections.append((name, self.cursor, kind))
        return self.cursor

    @property
    def _current(self) -> tuple[str, int, str]:
        return self.sections[-1]

    def align(self, alignment: int) -> None:
        pad = -self.cursor % alignment
        if pad:
            filler = INT3 if self._current[2] == "code" else b"\0"
            self.place((filler * pad,))

    def pad_to(self, rva: int) -> None:
        assert rva >= self.cursor, (hex(rva), hex(self.cursor))
        if rva > self.cursor:
            self.place(((INT3 if self._current[2] == "code" else b"\0") * (rva - self.cursor),))

    def place(self, code: Code, label: str | None = None, alignment: int = 1) -> int:
        self.align(alignment)
        rva = self.cursor
        if label is not None:
            assert label not in self.labels, label
            self.labels[label] = rva
        self._items.append(_Placed(self._current[0], rva, code))
        self.cursor += code_size(code)
        return rva

    def routine(self, label: str, routine: Routine, alignment: int = 16) -> int:
        """A routine and, when it has a frame, its RUNTIME_FUNCTION."""
        rva = self.place(routine.code, label, alignment)
        if routine.frame is not None:
            self.runtime_function(
                rva, self.cursor, frame_unwind(routine.frame), ops=(("alloc", routine.frame),)
            )
        return rva

    def runtime_function(
        self,
        begin: int,
        end: int,
        unwind: Code,
        parent: int | None = None,
        ops: tuple = (),
    ) -> str:
        """A RUNTIME_FUNCTION for [begin, end); identical UNWIND_INFO records are shared.
        ``parent``: begin RVA of the entry a chained UNWIND_INFO names.  ``ops``: what the
        unwind data does (chains resolved), for the truth.  Returns the label of the
        UNWIND_INFO."""
        label = self._unwind.setdefault(unwind, f"unwind#{len(self._unwind)}")
        self._functions.append((begin, end, label))
        self.unwind_ops[begin] = ops
        if parent is not None:
            self._parents[begin] = parent
        return label

    def chained_part(
        self,
        label: str,
        code: Code,
        parent: str,
        prologue: int = 0,
        codes: tuple[UnwindCode, ...] = (),
        alignment: int = 1,
    ) -> int:
        """Another piece of routine ``parent`` (right after it, or placed elsewhere as a cold
        fragment) with a RUNTIME_FUNCTION of its own whose UNWIND_INFO chains to the parent's
        entry (UNW_FLAG_CHAININFO)."""
        begin = self.labels[parent]
        _b, end, unwind = next(f for f in self._functions if f[0] == begin)
        self.labels.setdefault(f"{parent}#end", end)
        rva = self.place(code, label, alignment)
        info = chained_unwind(prologue, list(codes), (parent, f"{parent}#end", unwind))
        ops = ops_of(list(codes)) + self.unwind_ops.get(begin, ())
        self.runtime_function(rva, self.cursor, info, parent=begin, ops=ops)
        return rva

    def stack_function(self, function: Any, alignment: int = 16) -> int:
        """A stack_functions.StackFunction: its code, RUNTIME_FUNCTION and UNWIND_INFO (and
        its chained secondary part right after it)."""
        f = function
        rva = self.place(f.code, f.name, alignment)
        info = unwind_info(
            f.prologue,
            list(f.codes),
            version=f.version,
            frame_register=f.frame_register,
            frame_offset=f.frame_offset // 16,
        )
        ops = ops_of(list(f.codes), f.frame_register, f.frame_offset // 16)
        self.runtime_function(rva, self.cursor, info, ops=ops)
        if f.secondary is not None:
            self.chained_part(
                f"{f.name}#secondary",
                f.secondary,
                f.name,
                prologue=f.secondary_prologue,
                codes=tuple(f.secondary_codes),
            )
        self.stack_functions[f.name] = (rva, f)
        return rva

    def unwind_record_rvas(self) -> dict[int, int]:
        """Begin RVA of each RUNTIME_FUNCTION -> RVA of its UNWIND_INFO (after placing)."""
        return {b: self.labels[u] for b, _e, u in self._functions}

    def reserve(self, size: int, label: str, alignment: int = 1) -> int:
        return self.place((b"\0" * size,), label, alignment)

    def unwind_infos(self) -> None:
        """Places every UNWIND_INFO collected so far (DWORD-aligned) in the current section."""
        for unwind, label in self._unwind.items():
            self.place(unwind, label, 4)

    def export_directory(self) -> int:
        """Reserves the export directory (on pages of its own) in the current section."""
        names = {name: 0 for name in self.exports}
        size = export_directory_size(self.name, names, len(set(self.exports.values())))
        self._export_rva = self.reserve(size, "export directory", PAGE)
        self.align(PAGE)
        return self._export_rva

    def debug_directory(self, pdb_path: str, age: int = 1) -> int:
        """The debug directory (one CodeView entry) and its RSDS record on a page of their own
        in the current section, as a linker puts them in .rdata; a page of its own so that a
        scenario can page it out in one process without touching anything else."""
        self.align(PAGE)
        directory = self.cursor
        record = rsds_record("0" * 32, age, pdb_path)
        self.place((debug_directory_entry(directory + DEBUG_DIRECTORY_SIZE, len(record)),))
        self.place((record,), "debug data")
        self.directories[IMAGE_DIRECTORY_ENTRY_DEBUG] = (directory, DEBUG_DIRECTORY_SIZE)
        self.codeview_record = (directory + DEBUG_DIRECTORY_SIZE, age, pdb_path)
        self.align(PAGE)
        return directory

    def function_table(self) -> FunctionTable:
        return resolve_primaries([(b, e, self._parents.get(b)) for b, e, _u in self._functions])

    def public_symbols(self) -> dict[str, int]:
        """Name -> RVA of what the module's PDB names: every label in a code section (labels
        with '#' or a space are the builder's own bookkeeping: unwind records, separated
        fragments), every export name, and the public data labels."""
        code = [(start, kind == "code") for _name, start, kind in self.sections]
        symbols = {}
        for label, rva in self.labels.items():
            in_code = [is_code for start, is_code in code if start <= rva][-1]
            if (in_code and "#" not in label and " " not in label) or label in self.public_data:
                symbols[label] = rva
        for name, label in self.exports.items():
            symbols[name] = self.labels[label]
        return symbols

    def exception_directory(self) -> int:
        self._pdata_rva = self.reserve(RUNTIME_FUNCTION_SIZE * len(self._functions), "pdata", 4)
        return self._pdata_rva

    def base_relocations(self) -> int:
        """The .reloc blocks for every Abs64 pointer placed so far (current section)."""
        pages: dict[int, list[int]] = {}
        for item in self._items:
            for offset in abs64_offsets(item.code):
                rva = item.rva + offset
                pages.setdefault(rva & ~(PAGE - 1), []).append(rva & (PAGE - 1))
        blob = bytearray()
        for page, offsets in sorted(pages.items()):
            entries = [IMAGE_REL_BASED_DIR64 << 12 | o for o in sorted(offsets)]
            if len(entries) % 2:
                entries.append(0)  # IMAGE_REL_BASED_ABSOLUTE: pads the block to a DWORD
            blob += struct.pack("<II", page, 8 + 2 * len(entries))
            blob += b"".join(struct.pack("<H", e) for e in entries)
        rva = self.place((bytes(blob),), "base relocations", 4)
        self.directories[IMAGE_DIRECTORY_ENTRY_BASERELOC] = (rva, len(blob))
        return rva

    # -- linking ---------------------------------------------------------------------------------
    def link(self) -> PeImage:
        """The PeImage with every piece assembled, exports and .pdata written."""
        img = new_image(self.name, page_up(self.cursor), list(self.sections))
        for item in self._items:
            img.put(item.section, item.rva, assemble(item.code, item.rva, self.base, self.labels))
        img.directories.update(self.directories)
        if self.exports:
            img.exports = {name: self.labels[label] for name, label in self.exports.items()}
            img.build_exports(self._section_of(self._export_rva), self._export_rva)
        if self._functions:
            img.pdata = [(b, e, self.labels[u]) for b, e, u in self._functions]
            img.build_pdata(self._section_of(self._pdata_rva), self._pdata_rva)
        return img

    def _section_of(self, rva: int) -> str:
        return [name for name, start, _ in self.sections if start <= rva][-1]


def import_directory(plan: ImagePlan, imports: dict[str, dict[str, int]]) -> dict[str, str]:
    """Import address table, descriptors, lookup tables and hint/name entries in the current
    section; IAT slots hold the resolved addresses (a mapped image's view).  ``imports`` is
    DLL -> name -> address; returns name -> label of its IAT slot."""
    slots: dict[str, str] = {}
    iat_start = plan.cursor
    for dll, names in imports.items():
        plan.align(8)
        for name, address in names.items():
            slots[name] = f"__imp_{name}"
            plan.place((struct.pack("<Q", address),), slots[name])
        plan.place((b"\0" * 8,), f"iat end {dll}")
        plan.labels[f"iat {dll}"] = plan.labels[f"__imp_{next(iter(names))}"]
    plan.directories[IMAGE_DIRECTORY_ENTRY_IAT] = (iat_start, plan.cursor - iat_start)
    plan.align(4)
    descriptors = plan.cursor
    for dll in imports:
        # IMAGE_IMPORT_DESCRIPTOR: OriginalFirstThunk, TimeDateStamp, ForwarderChain, Name,
        # FirstThunk
        plan.place((Rva32(f"int {dll}"), b"\0" * 8, Rva32(f"name {dll}"), Rva32(f"iat {dll}")))
    plan.place((b"\0" * 20,))
    plan.directories[IMAGE_DIRECTORY_ENTRY_IMPORT] = (descriptors, plan.cursor - descriptors)
    for dll, names in imports.items():
        plan.align(8)
        for index, name in enumerate(names):
            label = f"int {dll}" if index == 0 else None
            plan.place((Rva32(f"hint {name}"), b"\0" * 4), label)
        plan.place((b"\0" * 8,))
    for dll, names in imports.items():
        for hint, name in enumerate(names):
            plan.place((struct.pack("<H", hint) + name.encode() + b"\0",), f"hint {name}", 2)
        plan.place((dll.encode() + b"\0",), f"name {dll}", 2)
    return slots
