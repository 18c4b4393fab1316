"""Reading a built raw image back with plain struct reads, independently of the builder.

A four-level x64 page walk over the image file and field offsets from the symbol table: enough
for tests to check that the bytes say what the truth file says (where frames lie, which pages
are present, which KTHREAD flags are set).  Neither the builder's address spaces nor the plugin
are used.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagebuilder.isf import SymbolTable

PRESENT = 1
ADDRESS_BITS = 0x000F_FFFF_FFFF_F000


class RawImage:
    def __init__(self, path: Path) -> None:
        self.data = path.read_bytes()

    def entry(self, table: int, index: int) -> int:
        return struct.unpack_from("<Q", self.data, table + 8 * index)[0]

    def pte(self, dtb: int, va: int) -> int | None:
        """The last-level entry for ``va`` (present or not); None when a table is missing."""
        table = dtb & ADDRESS_BITS
        for shift in (39, 30, 21):
            entry = self.entry(table, (va >> shift) & 0x1FF)
            if not entry & PRESENT:
                return None
            table = entry & ADDRESS_BITS
        return self.entry(table, (va >> 12) & 0x1FF)

    def translate(self, dtb: int, va: int) -> int | None:
        pte = self.pte(dtb, va)
        if pte is None or not pte & PRESENT:
            return None
        return (pte & ADDRESS_BITS) | (va & 0xFFF)

    def read(self, dtb: int, va: int, size: int) -> bytes | None:
        """``size`` bytes at ``va``, or None when any page of them is not present."""
        out = b""
        while size > 0:
            pa = self.translate(dtb, va)
            if pa is None:
                return None
            n = min(size, 0x1000 - (va & 0xFFF))
            out += self.data[pa : pa + n]
            va, size = va + n, size - n
        return out

    def qword(self, dtb: int, va: int) -> int | None:
        data = self.read(dtb, va, 8)
        return None if data is None else struct.unpack("<Q", data)[0]


@dataclass
class Reader:
    """Typed reads of one image through its symbol table."""

    image: RawImage
    symbols: SymbolTable
    dtb: int  # the System DTB (kernel addresses)
    kernel_base: int

    def field(self, address: int, type_name: str, path: str, dtb: int | None = None) -> int:
        fld = self.symbols.field(type_name, path)
        kind = fld.type["kind"]
        size = fld.size if kind != "pointer" else 8
        data = self.image.read(self.dtb if dtb is None else dtb, address + fld.offset, size)
        assert data is not None, f"{type_name}.{path} at {address:#x} is not readable"
        value = int.from_bytes(data, "little")
        if kind == "bitfield":
            width, position = int(fld.type["bit_length"]), int(fld.type["bit_position"])
            value = (value >> position) & ((1 << width) - 1)
        return value

    def threads(self) -> dict[tuple[int, int], dict[str, int]]:
        """(pid, tid) -> {"ethread", "eprocess", "dtb"} by walking PsActiveProcessHead and each
        EPROCESS.ThreadListHead."""
        sym = self.symbols
        head = self.kernel_base + sym.symbol_rva("PsActiveProcessHead")
        links = sym.offset("_EPROCESS", "ActiveProcessLinks")
        thread_links = sym.offset("_ETHREAD", "ThreadListEntry")
        found: dict[tuple[int, int], dict[str, int]] = {}
        node = self.image.qword(self.dtb, head)
        while node is not None and node != head:
            eproc = node - links
            pid = self.field(eproc, "_EPROCESS", "UniqueProcessId")
            dtb = self.field(eproc, "_EPROCESS", "Pcb.DirectoryTableBase")
            thread_head = eproc + sym.offset("_EPROCESS", "ThreadListHead")
            entry = self.image.qword(self.dtb, thread_head)
            while entry is not None and entry != thread_head:
                ethread = entry - thread_links
                tid = self.field(ethread, "_ETHREAD", "Cid.UniqueThread")
                found[(pid, tid)] = {"ethread": ethread, "eprocess": eproc, "dtb": dtb}
                entry = self.image.qword(self.dtb, entry)
            node = self.image.qword(self.dtb, node)
        return found

    def kthread(self, ethread: int, name: str) -> int:
        return self.field(ethread, "_ETHREAD", f"Tcb.{name}")

    def trap_frames(self, ethread: int) -> list[int]:
        """T(0..K) by the _KSTACK_CONTROL chain from KTHREAD.InitialStack (resident stacks)."""
        sym = self.symbols
        initial = self.kthread(ethread, "InitialStack")
        chain = []
        while initial:
            chain.append(initial - sym.size("_KTRAP_FRAME"))
            initial = self.field(initial, "_KSTACK_CONTROL", "Previous.InitialStack")
        return list(reversed(chain))

    def trap(self, address: int, name: str) -> int:
        return self.field(address, "_KTRAP_FRAME", name)


def ucallout_frame(image: RawImage, dtb: int, frame: int) -> dict[str, Any] | None:
    """The 0x58 bytes at ``frame`` decoded as a UCALLOUT_FRAME, with the qword below it."""
    data = image.read(dtb, frame - 8, 0x60)
    if data is None:
        return None
    slot, _p1, _p2, _p3, _p4, buffer, length, api, rip, _cs, _fl, rsp, _ss = struct.unpack(
        "<QQQQQQIIQQQQQ", data
    )
    return {
        "return_address": slot,
        "buffer": buffer,
        "length": length,
        "api_number": api,
        "rip": rip,
        "rsp": rsp,
    }
