"""A minimal 32-bit (x86, non-PAE) Windows image: enough for Volatility to find the kernel.

windows.kcbwait supports x64 kernels only and must say so in one line on a 32-bit image.  Testing
that needs an image whose kernel Volatility accepts as 32-bit, which is all this module builds:
- a page directory with the x86 self-map entry (index 0x300) in the physical window Volatility
  scans for "older windows" (0x30000-0x1030000), and no other page table there;
- KUSER_SHARED_DATA at 0xFFDF0000 and at its user alias 0x7FFE0000 (NtMajorVersion 10);
- a kernel PE32 header with a CodeView (RSDS) record at physical 4 MiB, mapped at 0x80000000 +
  that address (Volatility's "fixed mapping" kernel search for 32-bit images);
- a lab-style 32-bit symbol table of our own: the lab table's types with 4-byte pointers and
  its own GUID (symbol_table_is_64bit looks at the pointer size).
No process or thread is laid out: the plugin must stop before reading any.
"""

from __future__ import annotations

import json
import lzma
import struct
import uuid
from pathlib import Path

from imagebuilder import lab_profile
from imagebuilder.memory import PAGE, PhysicalMemory

X86_GUID = "4B43425741495400000000000000AB32"
X86_AGE = 1
PDB_NAME = "ntkrnlmp.pdb"
PAGE_DIRECTORY_PA = 0x39000
SELF_MAP_INDEX = 0x300  # x86 non-PAE: the page directory maps itself at 0xC0000000
KERNEL_PA = 0x400000
KERNEL_VA = 0x80000000 + KERNEL_PA
KUSER_KERNEL, KUSER_USER = 0xFFDF0000, 0x7FFE0000
KUSER_PA = 0x41000
_PAGE_TABLES_PA = 0x100000  # page tables above the directory, outside the kernel pages
_PRESENT_WRITE = 0x3
MEMORY_MB = 32


class _X86Space:
    """4 KiB pages through one page directory (Intel SDM vol. 3, 4.3)."""

    def __init__(self, memory: PhysicalMemory) -> None:
        self.memory = memory
        self._next_table = _PAGE_TABLES_PA
        memory.page(PAGE_DIRECTORY_PA)
        self._set(PAGE_DIRECTORY_PA, SELF_MAP_INDEX, PAGE_DIRECTORY_PA | _PRESENT_WRITE)

    def _get(self, table: int, index: int) -> int:
        return struct.unpack_from("<I", self.memory.page(table), 4 * index)[0]

    def _set(self, table: int, index: int, value: int) -> None:
        struct.pack_into("<I", self.memory.page(table), 4 * index, value)

    def map_page(self, va: int, pa: int) -> None:
        pde = self._get(PAGE_DIRECTORY_PA, va >> 22)
        if not pde & 1:
            table = self._next_table
            self._next_table += PAGE
            self.memory.page(table)
            pde = table | _PRESENT_WRITE
            self._set(PAGE_DIRECTORY_PA, va >> 22, pde)
        self._set(pde & ~0xFFF, (va >> 12) & 0x3FF, pa | _PRESENT_WRITE)


def _kernel_headers() -> bytes:
    """MZ, PE32 headers (i386) and a debug directory whose RSDS record names the lab PDB."""
    page = bytearray(PAGE)
    page[0:2] = b"MZ"
    e_lfanew = 0x80
    struct.pack_into("<I", page, 0x3C, e_lfanew)
    page[e_lfanew : e_lfanew + 4] = b"PE\0\0"
    # IMAGE_FILE_HEADER: i386, one section, SizeOfOptionalHeader 0xE0, EXECUTABLE | 32BIT.
    struct.pack_into("<HHIIIHH", page, e_lfanew + 4, 0x14C, 1, 0x5F000000, 0, 0, 0xE0, 0x0102)
    optional = e_lfanew + 24
    struct.pack_into("<H", page, optional, 0x10B)  # PE32
    struct.pack_into("<I", page, optional + 28, KERNEL_VA)  # ImageBase
    struct.pack_into("<II", page, optional + 32, PAGE, PAGE)  # Section/FileAlignment
    struct.pack_into("<I", page, optional + 56, 2 * PAGE)  # SizeOfImage
    struct.pack_into("<I", page, optional + 60, PAGE)  # SizeOfHeaders
    struct.pack_into("<I", page, optional + 92, 16)  # NumberOfRvaAndSizes
    debug_directory = 0x300
    record = debug_directory + 28 + 4
    rsds = (
        b"RSDS"
        + uuid.UUID(hex=X86_GUID).bytes_le
        + struct.pack("<I", X86_AGE)
        + PDB_NAME.encode()
        + b"\0"
    )
    page[record : record + len(rsds)] = rsds
    struct.pack_into("<IIHHIIII", page, debug_directory, 0, 0, 0, 0, 2, len(rsds), record, record)
    struct.pack_into("<II", page, optional + 96 + 6 * 8, debug_directory, 28)
    return bytes(page)


def x86_isf() -> dict:
    """The lab table re-labelled as a 32-bit kernel: 4-byte pointers, its own GUID."""
    isf = lab_profile.build_isf()
    isf["base_types"]["pointer"] = {**isf["base_types"]["pointer"], "size": 4}
    pdb = isf["metadata"]["windows"]["pdb"]
    pdb.update(GUID=X86_GUID, age=X86_AGE, machine_type=0x14C)
    isf["metadata"]["producer"] = {"name": "kcbwait-imagebuilder-x86", "version": "1"}
    return isf


def write_x86_image(out_dir: Path) -> dict[str, Path]:
    """Writes ``x86.raw`` and ``symbols/windows/ntkrnlmp.pdb/<GUID>-<age>.json.xz``."""
    memory = PhysicalMemory(MEMORY_MB * 1024 * 1024)
    space = _X86Space(memory)
    memory.write(KUSER_PA + 0x260, struct.pack("<I", 9600))  # NtBuildNumber
    memory.write(KUSER_PA + 0x26C, struct.pack("<II", 10, 0))  # NtMajorVersion, Minor
    space.map_page(KUSER_KERNEL, KUSER_PA)
    space.map_page(KUSER_USER, KUSER_PA)
    memory.write(KERNEL_PA, _kernel_headers())
    memory.write(KERNEL_PA + PAGE, b"\x55\x8b\xec\xcc")  # a code page after the headers
    for offset in (0, PAGE):
        space.map_page(KERNEL_VA + offset, KERNEL_PA + offset)
    out_dir.mkdir(parents=True, exist_ok=True)
    image = out_dir / "x86.raw"
    memory.write_raw(image)
    symbols = out_dir / "symbols"
    isf = symbols / "windows" / PDB_NAME / f"{X86_GUID}-{X86_AGE}.json.xz"
    isf.parent.mkdir(parents=True, exist_ok=True)
    isf.write_bytes(lzma.compress(json.dumps(x86_isf(), sort_keys=True).encode()))
    return {"raw": image, "symbols": symbols}
