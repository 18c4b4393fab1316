"""Export tables of PE images mapped in a process, parsed from memory.

A loaded image is laid out by RVA (memory layout), not by file offset.  Only the header page and
the export directory's pages are read: a linker keeps the IMAGE_EXPORT_DIRECTORY, its three
arrays and the name strings inside the range the EXPORT data directory names, so anything an
export directory points at outside that range is corrupt or hostile.  pefile parses the header
page (a fixed 4 KiB buffer); the export directory is parsed here, with every count, array and
string checked against that range and against fixed caps, so a hostile directory costs at most
MAX_EXPORT_DIRECTORY bytes and MAX_EXPORTS entries.

Outcomes (docs/output-contract.md): a table (possibly empty: a valid image without exports), or
``unreadable`` (the header or a page of the directory could not be read) or ``invalid`` (header
sizes beyond the caps or the image, counts or arrays that do not fit the directory).  Single
entries that are unusable (name not NUL-terminated inside the directory or longer than
MAX_EXPORT_NAME, ordinal beyond the address table, RVA 0 or beyond SizeOfImage, forwarders) are
left out and the rest of the table is kept.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

import pefile
from volatility3.framework import interfaces
from volatility3.plugins.windows.kcbwait_analysis import memory, read_stats, text

HEADER_SIZE = memory.PAGE_SIZE
# A sane image's export directory is far smaller (ntdll's is ~0x20000 bytes).
MAX_EXPORT_DIRECTORY = 0x100000
# Upper bound of SizeOfImage (and so of any RVA) this module accepts; ntdll is ~2 MiB.
MAX_IMAGE_SPAN = 0x4000000
# ntdll exports ~2,500 names; 64 Ki entries per array is far beyond any real image.
MAX_EXPORTS = 0x10000
# Longest export name accepted (C++ decorated names stay well below this).
MAX_EXPORT_NAME = 0x200
# IMAGE_EXPORT_DIRECTORY: 40 bytes; NumberOfFunctions at +0x14, then NumberOfNames,
# AddressOfFunctions, AddressOfNames, AddressOfNameOrdinals (all ULONG).
_EXPORT_DIRECTORY = struct.Struct("<20xIIIII")

IMAGE_DIRECTORY_ENTRY_EXPORT = pefile.DIRECTORY_ENTRY["IMAGE_DIRECTORY_ENTRY_EXPORT"]
IMAGE_DIRECTORY_ENTRY_EXCEPTION = pefile.DIRECTORY_ENTRY["IMAGE_DIRECTORY_ENTRY_EXCEPTION"]
IMAGE_DIRECTORY_ENTRY_DEBUG = pefile.DIRECTORY_ENTRY["IMAGE_DIRECTORY_ENTRY_DEBUG"]
# IMAGE_SECTION_HEADER.Characteristics bits.
IMAGE_SCN_MEM_EXECUTE = 0x20000000
IMAGE_SCN_MEM_WRITE = 0x80000000

UNREADABLE = "unreadable"
INVALID = "invalid"


@dataclass(frozen=True)
class ModuleExports:
    """Named, non-forwarded exports of one mapped image, as absolute addresses.

    Where several names share one address only the alphabetically first is kept
    (docs/output-contract.md: ``NtCallbackReturn`` before ``ZwCallbackReturn``); ``by_name`` still
    knows every name.
    """

    base: int
    addresses: tuple[int, ...]
    names: tuple[str, ...]
    by_name: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_pairs(cls, base: int, pairs: Iterable[tuple[str, int]]) -> ModuleExports:
        """Builds the table from (name, absolute address) pairs."""
        by_name: dict[str, int] = {}
        first_name: dict[int, str] = {}
        for name, address in pairs:
            by_name.setdefault(name, address)
            if address not in first_name or name < first_name[address]:
                first_name[address] = name
        addresses = tuple(sorted(first_name))
        return cls(base, addresses, tuple(first_name[a] for a in addresses), by_name)

    def address_of(self, name: str) -> int | None:
        """Address of the export ``name`` or None."""
        return self.by_name.get(name)

    def nearest_at_or_below(self, address: int) -> tuple[int, str] | None:
        """(address, name) of the export with the highest address <= ``address``."""
        index = bisect.bisect_right(self.addresses, address) - 1
        if index < 0:
            return None
        return self.addresses[index], self.names[index]

    def next_above(self, address: int) -> int | None:
        """Lowest export address strictly above ``address``."""
        index = bisect.bisect_right(self.addresses, address)
        if index >= len(self.addresses):
            return None
        return self.addresses[index]


@dataclass(frozen=True)
class DataDirectory:
    rva: int
    size: int


@dataclass(frozen=True)
class Section:
    """One IMAGE_SECTION_HEADER as mapped: [rva, rva + size)."""

    name: str
    rva: int
    size: int
    characteristics: int

    def contains(self, rva: int) -> bool:
        return self.rva <= rva < self.rva + self.size

    @property
    def executable(self) -> bool:
        return bool(self.characteristics & IMAGE_SCN_MEM_EXECUTE)

    @property
    def writable(self) -> bool:
        return bool(self.characteristics & IMAGE_SCN_MEM_WRITE)


@dataclass(frozen=True)
class ImageHeaders:
    """The few header facts this plugin needs from a mapped image."""

    size_of_image: int
    export: DataDirectory
    exception: DataDirectory
    debug: DataDirectory = DataDirectory(0, 0)
    sections: tuple[Section, ...] = ()

    def section_of(self, rva: int) -> Section | None:
        for section in self.sections:
            if section.contains(rva):
                return section
        return None


def parse_headers(header: bytes) -> ImageHeaders | None:
    """Parses DOS/NT headers from the first page of a mapped image (None if not a PE)."""
    try:
        pe = pefile.PE(data=header, fast_load=True)
    except pefile.PEFormatError:
        return None
    directories = getattr(pe.OPTIONAL_HEADER, "DATA_DIRECTORY", [])

    def directory(index: int) -> DataDirectory:
        if index < len(directories):
            return DataDirectory(directories[index].VirtualAddress, directories[index].Size)
        return DataDirectory(0, 0)

    sections = []
    for section in pe.sections:
        # The loader maps VirtualSize (SizeOfRawData when it is 0) rounded up to
        # SectionAlignment; pefile reads the section table from this one header page only.
        alignment = max(1, pe.OPTIONAL_HEADER.SectionAlignment or 1)
        span = section.Misc_VirtualSize or section.SizeOfRawData
        span = (span + alignment - 1) // alignment * alignment
        name = text.latin1(section.Name)
        sections.append(Section(name, section.VirtualAddress, span, section.Characteristics))
    return ImageHeaders(
        pe.OPTIONAL_HEADER.SizeOfImage,
        directory(IMAGE_DIRECTORY_ENTRY_EXPORT),
        directory(IMAGE_DIRECTORY_ENTRY_EXCEPTION),
        directory(IMAGE_DIRECTORY_ENTRY_DEBUG),
        tuple(sections),
    )


class CorruptExports(ValueError):
    """The export directory's own fields contradict its size or the caps."""


def _array(directory: bytes, start: int, rva: int, count: int, width: int) -> bytes:
    """The ``count`` entries of ``width`` bytes at ``rva``, which must lie in the directory."""
    if count == 0:
        return b""
    offset = rva - start
    if offset < 0 or offset + count * width > len(directory):
        raise CorruptExports(f"array at RVA {rva:#x} is outside the export directory")
    return directory[offset : offset + count * width]


def _name(directory: bytes, start: int, rva: int) -> str | None:
    """The NUL-terminated name at ``rva`` inside the directory, or None."""
    offset = rva - start
    if offset < 0 or offset >= len(directory):
        return None
    end = directory.find(b"\0", offset, offset + MAX_EXPORT_NAME + 1)
    if end <= offset:
        return None
    return text.latin1(directory[offset:end])


def parse_export_directory(
    directory: bytes, start: int, size_of_image: int, base: int
) -> ModuleExports:
    """Parses an export directory read from RVA ``start`` of the image mapped at ``base``.

    Raises CorruptExports when the directory's counts or arrays do not fit it.  Forwarded
    exports (an RVA inside the export directory) and unusable entries are left out: they do not
    name code at that address.
    """
    if len(directory) < 40:
        raise CorruptExports("export directory smaller than IMAGE_EXPORT_DIRECTORY")
    functions_count, names_count, functions_rva, names_rva, ordinals_rva = (
        _EXPORT_DIRECTORY.unpack_from(directory, 0)
    )
    if functions_count > MAX_EXPORTS or names_count > MAX_EXPORTS:
        raise CorruptExports(f"{functions_count} functions, {names_count} names")
    functions = struct.unpack(
        f"<{functions_count}I", _array(directory, start, functions_rva, functions_count, 4)
    )
    names = struct.unpack(f"<{names_count}I", _array(directory, start, names_rva, names_count, 4))
    ordinals = struct.unpack(
        f"<{names_count}H", _array(directory, start, ordinals_rva, names_count, 2)
    )
    end = start + len(directory)
    pairs: list[tuple[str, int]] = []
    # Both arrays hold names_count entries (unpacked above).
    for name_rva, ordinal in zip(names, ordinals):
        if ordinal >= functions_count:
            continue
        function_rva = functions[ordinal]
        if function_rva == 0 or function_rva >= size_of_image or start <= function_rva < end:
            continue
        name = _name(directory, start, name_rva)
        if name:
            pairs.append((name, base + function_rva))
    return ModuleExports.from_pairs(base, pairs)


def read_pages_into(
    context: interfaces.context.ContextInterface,
    layer_name: str,
    address: int,
    buffer: bytearray,
    stats: read_stats.ReadStats | None = None,
) -> bool:
    """Fills ``buffer`` with the bytes at ``address`` page by page.

    Returns False if any page was unreadable (its bytes stay zero)."""
    complete = True
    cursor = 0
    while cursor < len(buffer):
        page_end = min(len(buffer), cursor + memory.PAGE_SIZE - ((address + cursor) & 0xFFF))
        data = memory.read_bytes(context, layer_name, address + cursor, page_end - cursor, stats)
        if data is None:
            complete = False
        else:
            buffer[cursor:page_end] = data
        cursor = page_end
    return complete


def directory_in_image(headers: ImageHeaders, directory: DataDirectory, cap: int) -> bool:
    """True when ``directory`` is non-empty, at most ``cap`` bytes and inside the image."""
    return (
        0 < directory.size <= cap
        and directory.rva > 0
        and directory.rva + directory.size <= headers.size_of_image
    )


@dataclass(frozen=True)
class ExportsRead:
    """An export table, or None with the reason (UNREADABLE or INVALID)."""

    exports: ModuleExports | None
    problem: str | None = None


def read_headers(
    context: interfaces.context.ContextInterface,
    layer_name: str,
    base: int,
    stats: read_stats.ReadStats | None = None,
) -> tuple[ImageHeaders | None, str | None]:
    """The image's headers, or None and UNREADABLE / INVALID."""
    header = memory.read_bytes(context, layer_name, base, HEADER_SIZE, stats)
    if header is None:
        return None, UNREADABLE
    return headers_from_bytes(header)


def headers_from_bytes(header: bytes) -> tuple[ImageHeaders | None, str | None]:
    """The headers in the first HEADER_SIZE bytes of an image, or None and INVALID."""
    headers = parse_headers(header)
    if headers is None or not 0 < headers.size_of_image <= MAX_IMAGE_SPAN:
        return None, INVALID
    return headers, None


def read_module_exports(
    context: interfaces.context.ContextInterface,
    layer_name: str,
    base: int,
    stats: read_stats.ReadStats | None = None,
) -> ExportsRead:
    """Reads and parses the export table of the image mapped at ``base`` in ``layer_name``.

    UNREADABLE lets the caller try another process's copy of the same image.
    """
    headers, problem = read_headers(context, layer_name, base, stats)
    if headers is None:
        return ExportsRead(None, problem)
    export = headers.export
    if export.rva == 0 and export.size == 0:
        return ExportsRead(ModuleExports.from_pairs(base, []))  # a valid image without exports
    if not directory_in_image(headers, export, MAX_EXPORT_DIRECTORY):
        return ExportsRead(None, INVALID)
    directory = bytearray(export.size)
    if stats is not None:
        stats.count_export_parse(base)
    if not read_pages_into(context, layer_name, base + export.rva, directory, stats):
        return ExportsRead(None, UNREADABLE)
    try:
        return ExportsRead(
            parse_export_directory(bytes(directory), export.rva, headers.size_of_image, base)
        )
    except CorruptExports:
        return ExportsRead(None, INVALID)
