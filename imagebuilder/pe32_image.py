"""PE32 (i386) images: the 32-bit DLLs a WoW64 process maps from \\Windows\\SysWOW64.

Only what a reader of a mapped 32-bit image looks at: the DOS header, IMAGE_NT_HEADERS32
(machine 0x14C, optional-header magic 0x10B, ImageBase a ULONG) and the section table.  As in
pe_image.py, FileAlignment == SectionAlignment and raw offsets equal RVAs, so the mapped view
and a file rebuilt from it are the same bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from imagebuilder.pe_image import E_LFANEW, PAGE, page_up

IMAGE_FILE_MACHINE_I386 = 0x14C
PE32_MAGIC = 0x10B
_OPTIONAL_HEADER_SIZE = 0xE0  # IMAGE_OPTIONAL_HEADER32 with 16 data directories
# EXECUTABLE_IMAGE | 32BIT_MACHINE | DLL
_DLL_CHARACTERISTICS = 0x0002 | 0x0100 | 0x2000
SCN_CODE = 0x60000020  # CODE | EXECUTE | READ
SCN_RDATA = 0x40000040  # INITIALIZED_DATA | READ
SCN_DATA = 0xC0000040  # INITIALIZED_DATA | READ | WRITE


@dataclass(frozen=True)
class Section32:
    name: str
    rva: int
    data: bytes
    characteristics: int

    @property
    def virtual_size(self) -> int:
        return page_up(max(len(self.data), 1))


def pe32_image(sections: list[Section32], base: int) -> bytes:
    """The mapped image: headers page, then each section at its RVA."""
    size_of_image = max(s.rva + s.virtual_size for s in sections)
    image = bytearray(size_of_image)
    image[0:2] = b"MZ"
    struct.pack_into("<I", image, 0x3C, E_LFANEW)
    image[E_LFANEW : E_LFANEW + 4] = b"PE\0\0"
    struct.pack_into(
        "<HHIIIHH",
        image,
        E_LFANEW + 4,
        IMAGE_FILE_MACHINE_I386,
        len(sections),
        0x5F000000,
        0,
        0,
        _OPTIONAL_HEADER_SIZE,
        _DLL_CHARACTERISTICS,
    )
    optional = E_LFANEW + 24
    code = [s for s in sections if s.characteristics == SCN_CODE]
    struct.pack_into("<HBBI", image, optional, PE32_MAGIC, 14, 0, sum(s.virtual_size for s in code))
    struct.pack_into("<I", image, optional + 20, code[0].rva if code else 0)  # BaseOfCode
    struct.pack_into("<III", image, optional + 28, base, PAGE, PAGE)  # ImageBase, alignments
    struct.pack_into("<HH", image, optional + 40, 10, 0)  # OperatingSystemVersion
    struct.pack_into("<HH", image, optional + 48, 10, 0)  # SubsystemVersion
    struct.pack_into("<II", image, optional + 56, size_of_image, PAGE)  # SizeOfImage, headers
    struct.pack_into("<HH", image, optional + 68, 3, 0x140)  # console subsystem; dynamic base, NX
    struct.pack_into("<IIII", image, optional + 72, 0x40000, 0x1000, 0x100000, 0x1000)
    struct.pack_into("<I", image, optional + 92, 16)  # NumberOfRvaAndSizes
    table = optional + _OPTIONAL_HEADER_SIZE
    for index, sec in enumerate(sections):
        struct.pack_into(
            "<8sIIIIIIHHI",
            image,
            table + 40 * index,
            sec.name.encode()[:8],
            sec.virtual_size,
            sec.rva,
            sec.virtual_size,
            sec.rva,
            0,
            0,
            0,
            0,
            sec.characteristics,
        )
        image[sec.rva : sec.rva + len(sec.data)] = sec.data
    return bytes(image)
