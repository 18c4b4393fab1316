"""Callback-table integrity: what windows.kcbwait's Table column and windows.kcbtable must say
about a process's table, by the rules of docs/output-contract.md ("Table (callback-table
integrity)", "windows.kcbtable").

A ``TableCheck`` holds what the builder laid out for one table of one process: the pointer it
wrote into the PEB (64-bit) or _PEB32 (32-bit), the owner image (user32.dll; wow64win.dll for a
WoW64 process's 64-bit table; the SysWOW64 user32.dll for its 32-bit table), the process's
modules and VADs, and a reader over the builder's own address space for the bytes it wrote.
The owner's sections are taken from the owner's PE headers as the builder wrote them.
Nothing here runs or imports the plugin.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from imagebuilder.memory import AddressSpace
from imagebuilder.module_image import ModuleImage
from imagebuilder.process_layout import MM_EXECUTE_READWRITE, Vad

MAX_ENTRIES = 0x400  # contract: at most 0x400 entries; ApiNumbers >= 0x400 are invalid
USER_LIMIT = {64: 0x8000_0000_0000, 32: 0x1_0000_0000}
SCN_MEM_EXECUTE = 0x20000000
SCN_MEM_WRITE = 0x80000000
UNREADABLE = "unreadable: KernelCallbackTable"

Reader = Callable[[int, int], "bytes | None"]
"""(address, size) -> the bytes the builder wrote there, None when a page is not present."""


@dataclass(frozen=True)
class PeSection:
    name: str
    start: int  # virtual address
    end: int  # exclusive: start + VirtualSize
    characteristics: int

    @property
    def executable(self) -> bool:
        return bool(self.characteristics & SCN_MEM_EXECUTE)

    @property
    def writable(self) -> bool:
        return bool(self.characteristics & SCN_MEM_WRITE)

    def contains(self, address: int, size: int = 1) -> bool:
        return self.start <= address and address + size <= self.end


def pe_sections(module: ModuleImage) -> list[PeSection]:
    """The section table of the module's headers as written (PE32 and PE32+ alike: it follows
    the optional header, whose size IMAGE_FILE_HEADER gives)."""
    data = module.data
    e_lfanew = struct.unpack_from("<I", data, 0x3C)[0]
    count, = struct.unpack_from("<H", data, e_lfanew + 6)
    optional_size, = struct.unpack_from("<H", data, e_lfanew + 20)
    table = e_lfanew + 24 + optional_size
    sections = []
    for index in range(count):
        raw_name, virtual_size, rva = struct.unpack_from("<8sII", data, table + 40 * index)
        characteristics, = struct.unpack_from("<I", data, table + 40 * index + 36)
        name = raw_name.rstrip(b"\0").decode("latin-1")
        start = module.base + rva
        sections.append(PeSection(name, start, start + virtual_size, characteristics))
    return sections


def space_reader(space: AddressSpace) -> Reader:
    def read(address: int, size: int) -> bytes | None:
        pages = range(address & ~0xFFF, address + size, 0x1000)
        if not all(space.is_mapped(page) for page in pages):
            return None
        return space.read(address, size)

    return read


@dataclass
class TableCheck:
    """One table of one process, as laid out."""

    bits: int  # 64, or 32 for a WoW64 process's 32-bit table
    table: int  # the pointer as written (0: none)
    owner: ModuleImage | None
    modules: list[ModuleImage]  # what <where> names: the process's loaded modules
    vads: list[Vad]
    read: Reader

    @property
    def entry_size(self) -> int:
        return self.bits // 8

    @cached_property
    def sections(self) -> list[PeSection]:
        return pe_sections(self.owner) if self.owner is not None else []

    @cached_property
    def table_section(self) -> PeSection | None:
        """The owner section holding the table."""
        return next((s for s in self.sections if s.contains(self.table)), None)

    def where(self, address: int) -> str:
        """Contract ``<where>``: a loaded module, else private RWX memory, else private memory."""
        for module in self.modules:
            if module.contains(address):
                return f"{module.name}+{address - module.base:#x}"
        vad = next((v for v in self.vads if v.module is None and v.contains(address)), None)
        if vad is not None and vad.protection == MM_EXECUTE_READWRITE:
            return f"private RWX memory {address:#x}"
        return f"private memory {address:#x}"

    def table_items(self) -> list[str]:
        """Verdict item 1: where the table itself lies."""
        at = f"hijacked: table at {self.table:#x}"
        if self.owner is None or not self.owner.contains(self.table):
            return [f"{at} in {self.where(self.table)}"]
        section = self.table_section
        if section is None:
            return [f"{at} outside the sections of {self.owner.name}"]
        if section.writable:
            return [f"{at} in writable section {section.name} of {self.owner.name}"]
        return []

    def entry(self, index: int) -> int | None:
        data = self.read(self.table + self.entry_size * index, self.entry_size)
        return None if data is None else int.from_bytes(data, "little")

    def target_verdict(self, index: int, value: int) -> str:
        if any(s.executable and s.contains(value) for s in self.sections):
            return "ok"
        return f"hijacked: entry {index} -> {self.where(value)}"

    def entry_verdict(self, index: int) -> str:
        value = self.entry(index)
        return UNREADABLE if value is None else self.target_verdict(index, value)

    def checked_entries(self) -> list[int]:
        """Contract "Entries checked": consecutive non-zero user addresses from index 0, at
        most 0x400, never past the end of the owner section holding the table."""
        end = self.table_section.end if self.table_section is not None else None
        values: list[int] = []
        for index in range(MAX_ENTRIES):
            address = self.table + self.entry_size * index
            if end is not None and address + self.entry_size > end:
                break
            value = self.entry(index)
            if value is None or value == 0 or value >= USER_LIMIT[self.bits]:
                break
            values.append(value)
        return values

    # -- windows.kcbwait -------------------------------------------------------------------
    def thread_table(self, api_numbers: list[int]) -> str | None:
        """Thread row ``Table``: the table's items, then each level's entry item (each
        ApiNumber once, in level order; the same text once), or ``ok``."""
        if self.table == 0:
            return None
        items = self.table_items()
        for api in dict.fromkeys(api_numbers):
            verdict = self.entry_verdict(api)
            if verdict != "ok" and verdict not in items:
                items.append(verdict)
        return "; ".join(items) or "ok"

    def frame_table(self, api_number: int | None) -> str | None:
        """Callback row ``Table``: the entry verdict of its ApiNumber."""
        if self.table == 0 or api_number is None or api_number >= MAX_ENTRIES:
            return None
        return self.entry_verdict(api_number)

    def annotate(self, record: dict[str, Any]) -> None:
        """Adds ``table`` to a truth thread record and to each of its frames."""
        apis = [f["api_number"] for f in record["frames"] if f["api_number"] is not None]
        record["table"] = self.thread_table([a for a in apis if a < MAX_ENTRIES])
        for frame in record["frames"]:
            frame["table"] = self.frame_table(frame["api_number"])

    # -- windows.kcbtable ------------------------------------------------------------------
    def kcbtable_row(
        self, *, pid: int, process: str, wow64: bool, instrumentation: int = 0
    ) -> dict[str, Any]:
        values = self.checked_entries() if self.table else []
        outside = []
        for index, value in enumerate(values):
            verdict = self.target_verdict(index, value)
            if verdict != "ok":
                outside.append(
                    {"index": index, "target": value, "target_symbol": self.where(value)}
                )
        verdict = None
        if self.table:
            items = self.table_items()
            items += [f"hijacked: entry {e['index']} -> {e['target_symbol']}" for e in outside]
            verdict = "; ".join(items) or "ok"
        section = self.table_section if self.owner and self.owner.contains(self.table) else None
        return {
            "pid": pid,
            "process": process,
            "wow64": wow64,
            "bits": self.bits,
            "table": self.table or None,
            "owner": self.owner.name if self.owner is not None else None,
            "section": section.name if section is not None else None,
            "entries": len(values),
            "outside": len(outside),
            "instrumentation_callback": instrumentation or None,
            "instrumentation_target": self.where(instrumentation) if instrumentation else None,
            "verdict": verdict,
            "entries_outside": outside,
        }


def instrumentation_note(check: TableCheck, address: int) -> str | None:
    """Contract "Notes": every thread of a process whose KPROCESS.InstrumentationCallback is
    set (after the foreign-thread note)."""
    if not address:
        return None
    return f"instrumentation callback {address:#x} in {check.where(address)}"
