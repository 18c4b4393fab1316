"""PE32+ images the builder writes itself: headers, sections, exports, .pdata and CodeView.

Layout choices keep the in-memory view and the file view identical (FileAlignment ==
SectionAlignment, raw offsets == RVAs), so Volatility's PE reconstruction from memory and
pefile both read the same bytes.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass, field
from typing import Any

IMAGE_FILE_MACHINE_AMD64 = 0x8664
PAGE = 0x1000
_SCN_CODE = 0x60000020  # CODE | EXECUTE | READ
_SCN_RDATA = 0x40000040  # INITIALIZED_DATA | READ
_SCN_DATA = 0xC0000040  # INITIALIZED_DATA | READ | WRITE
E_LFANEW = 0x80  # where this builder puts the NT headers
_OPTIONAL_HEADER = E_LFANEW + 24
_DATA_DIRECTORIES = _OPTIONAL_HEADER + 112  # PE32+: DataDirectory follows NumberOfRvaAndSizes


def data_directory_offset(index: int) -> int:
    """Header offset of IMAGE_DATA_DIRECTORY[index] (VirtualAddress, then Size) as written."""
    return _DATA_DIRECTORIES + 8 * index


@dataclass
class Section:
    name: str
    rva: int
    data: bytearray
    characteristics: int

    @property
    def virtual_size(self) -> int:
        return max(len(self.data), 1)


@dataclass
class PeImage:
    """A PE32+ image under construction; ``bytes()`` lays it out."""

    name: str
    size_of_image: int
    sections: list[Section] = field(default_factory=list)
    exports: dict[str, int] = field(default_factory=dict)  # name -> RVA
    pdata: list[tuple[int, int, int]] = field(default_factory=list)  # begin, end, unwind RVA
    codeview: tuple[str, int, str] | None = None  # GUID hex, age, pdb name
    dll: bool = True
    export_rva: int = 0
    export_size: int = 0
    pdata_rva: int = 0
    # Further IMAGE_DATA_DIRECTORY entries (index -> RVA, size): imports, IAT, base relocations.
    directories: dict[int, tuple[int, int]] = field(default_factory=dict)
    # Where build_exports put the arrays and each name string (RVAs), for damage.py.
    export_layout: dict[str, Any] = field(default_factory=dict)

    def section(self, name: str) -> Section:
        for sec in self.sections:
            if sec.name == name:
                return sec
        raise KeyError(name)

    def put(self, section: str, rva: int, data: bytes) -> None:
        sec = self.section(section)
        start = rva - sec.rva
        if start < 0:
            raise ValueError(f"RVA {rva:#x} is below section {section}")
        if len(sec.data) < start + len(data):
            sec.data.extend(bytes(start + len(data) - len(sec.data)))
        sec.data[start : start + len(data)] = data

    def build_exports(self, section: str, rva: int) -> None:
        """Write the export directory at ``rva``, names sorted for the loader's binary search."""
        names = sorted(self.exports)
        functions = sorted(set(self.exports.values()))
        index_of = {f: i for i, f in enumerate(functions)}
        n_funcs, n_names = len(functions), len(names)
        dll_name = self.name.encode("utf-8", "surrogatepass") + b"\0"
        eat = rva + 40
        npt = eat + 4 * n_funcs
        ord_table = npt + 4 * n_names
        strings = ord_table + 2 * n_names
        blob = bytearray()
        name_rvas = []
        dll_name_rva = strings
        blob += dll_name
        for name in names:
            name_rvas.append(strings + len(blob))
            blob += name.encode() + b"\0"
        directory = struct.pack(
            "<IIHHIIIIIII", 0, 0, 0, 0, dll_name_rva, 1, n_funcs, n_names, eat, npt, ord_table
        )
        body = bytearray(directory)
        body += b"".join(struct.pack("<I", f) for f in functions)
        body += b"".join(struct.pack("<I", r) for r in name_rvas)
        body += b"".join(struct.pack("<H", index_of[self.exports[n]]) for n in names)
        body += blob
        self.put(section, rva, bytes(body))
        self.export_rva, self.export_size = rva, len(body)
        self.export_layout = {
            "functions": eat,
            "names": npt,
            "ordinals": ord_table,
            "function_rvas": functions,
            "name_rvas": dict(zip(names, name_rvas, strict=True)),
        }

    def build_pdata(self, section: str, rva: int) -> None:
        body = b"".join(struct.pack("<III", b, e, u) for b, e, u in sorted(self.pdata))
        self.put(section, rva, body)
        self.pdata_rva = rva

    def __bytes__(self) -> bytes:
        image = bytearray(self.size_of_image)
        image[:PAGE] = self._headers()
        for sec in self.sections:
            image[sec.rva : sec.rva + len(sec.data)] = sec.data
        return bytes(image)

    def _headers(self) -> bytes:
        hdr = bytearray(PAGE)
        # IMAGE_DOS_HEADER: e_magic and e_lfanew are all a loader reads.
        hdr[0:2] = b"MZ"
        e_lfanew = E_LFANEW
        struct.pack_into("<I", hdr, 0x3C, e_lfanew)
        n_sections = len(self.sections)
        characteristics = 0x2022 if self.dll else 0x0022  # EXECUTABLE | LARGE_ADDRESS_AWARE (| DLL)
        hdr[e_lfanew : e_lfanew + 4] = b"PE\0\0"
        struct.pack_into(
            "<HHIIIHH",
            hdr,
            e_lfanew + 4,
            IMAGE_FILE_MACHINE_AMD64,
            n_sections,
            0x5F000000,
            0,
            0,
            0xF0,
            characteristics,
        )
        opt = e_lfanew + 24
        code = [s for s in self.sections if s.characteristics == _SCN_CODE]
        struct.pack_into(
            "<HBBIIIII",
            hdr,
            opt,
            0x20B,
            14,
            0,
            sum(s.virtual_size for s in code),
            0,
            0,
            code[0].rva if code else 0,
            code[0].rva if code else 0,
        )
        struct.pack_into(
            "<QIIHHHHHHIIIIHHQQQQII",
            hdr,
            opt + 24,
            0,
            PAGE,
            PAGE,
            10,
            0,
            10,
            0,
            10,
            0,
            0,
            self.size_of_image,
            PAGE,
            0,
            3 if self.dll else 1,
            0x160,
            0x100000,
            0x1000,
            0x100000,
            0x1000,
            0,
            16,
        )
        # ImageBase stays 0 in the header; the caller relocates nothing, so it patches the
        # real base in with set_image_base() once the image has an address.
        dirs = opt + 112
        struct.pack_into("<II", hdr, dirs + 0 * 8, self.export_rva, self.export_size)
        if self.pdata:
            struct.pack_into("<II", hdr, dirs + 3 * 8, self.pdata_rva, 12 * len(self.pdata))
        for index, (rva, size) in self.directories.items():
            struct.pack_into("<II", hdr, dirs + 8 * index, rva, size)
        sec_table = opt + 0xF0
        for i, sec in enumerate(self.sections):
            struct.pack_into(
                "<8sIIIIIIHHI",
                hdr,
                sec_table + 40 * i,
                sec.name.encode("utf-8", "surrogatepass")[:8],
                page_up(sec.virtual_size),
                sec.rva,
                page_up(sec.virtual_size),
                sec.rva,
                0,
                0,
                0,
                0,
                sec.characteristics,
            )
        if self.codeview:
            # IMAGE_DEBUG_DIRECTORY and the RSDS record live in the header page, so the
            # debug data is found the same way in memory and in a rebuilt file view.
            debug_dir = sec_table + 40 * n_sections + 0x20
            record = debug_dir + 28 + 4
            guid_hex, age, pdb = self.codeview
            rsds = (
                b"RSDS"
                + uuid.UUID(hex=guid_hex).bytes_le
                + struct.pack("<I", age)
                + pdb.encode()
                + b"\0"
            )
            hdr[record : record + len(rsds)] = rsds
            struct.pack_into(
                "<IIHHIIII", hdr, debug_dir, 0, 0x5F000000, 0, 0, 2, len(rsds), record, record
            )
            struct.pack_into("<II", hdr, dirs + 6 * 8, debug_dir, 28)
        return bytes(hdr)


def set_image_base(image: bytes, base: int) -> bytes:
    """Record the load address in OptionalHeader.ImageBase, as a mapped image shows it."""
    out = bytearray(image)
    e_lfanew = struct.unpack_from("<I", out, 0x3C)[0]
    struct.pack_into("<Q", out, e_lfanew + 24 + 24, base)
    return bytes(out)


def page_up(value: int) -> int:
    return (value + PAGE - 1) & ~(PAGE - 1)


def export_directory_size(dll_name: str, exports: dict[str, int], functions: int) -> int:
    """The size ``PeImage.build_exports`` gives a directory of ``exports`` (name -> RVA) with
    ``functions`` distinct addresses."""
    strings = len(dll_name.encode("utf-8", "surrogatepass")) + 1
    strings += sum(len(name.encode()) + 1 for name in exports)
    return 40 + 4 * functions + 6 * len(exports) + strings


def new_image(name: str, size_of_image: int, sections: list[tuple[str, int, int]]) -> PeImage:
    """An image with empty sections: (name, rva, kind) where kind is 'code', 'rdata' or 'data'."""
    kinds = {"code": _SCN_CODE, "rdata": _SCN_RDATA, "data": _SCN_DATA}
    return PeImage(
        name, size_of_image, [Section(n, rva, bytearray(), kinds[k]) for n, rva, k in sections]
    )
