"""Export tables of PE images mapped in a process, parsed from memory with pefile.

A loaded image is laid out by RVA (memory layout), not by file offset.  Only the header page and
the export directory's pages are read: a linker keeps the IMAGE_EXPORT_DIRECTORY, its three
arrays and the name strings inside the range the EXPORT data directory names.  pefile is handed a
buffer in which offset == RVA (the section table is hidden from it), so it parses the export
directory exactly where the loader mapped it.
"""

import bisect
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

import pefile
from volatility3.framework import interfaces
from volatility3.plugins.windows.kcbwait_analysis import memory

HEADER_SIZE = memory.PAGE_SIZE
# A sane image's export directory is far smaller (ntdll's is ~0x20000 bytes).
MAX_EXPORT_DIRECTORY = 0x100000
# Upper bound of any RVA this module will materialise a buffer for.
MAX_IMAGE_SPAN = 0x4000000
# IMAGE_FILE_HEADER.NumberOfSections sits 6 bytes into the NT headers ('PE\0\0' + Machine).
_NUMBER_OF_SECTIONS_OFFSET = 6

IMAGE_DIRECTORY_ENTRY_EXPORT = pefile.DIRECTORY_ENTRY["IMAGE_DIRECTORY_ENTRY_EXPORT"]
IMAGE_DIRECTORY_ENTRY_EXCEPTION = pefile.DIRECTORY_ENTRY["IMAGE_DIRECTORY_ENTRY_EXCEPTION"]


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
    def from_pairs(cls, base: int, pairs: Iterable[tuple[str, int]]) -> "ModuleExports":
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
class ImageHeaders:
    """The few header facts this plugin needs from a mapped image."""

    size_of_image: int
    export: DataDirectory
    exception: DataDirectory


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

    return ImageHeaders(
        pe.OPTIONAL_HEADER.SizeOfImage,
        directory(IMAGE_DIRECTORY_ENTRY_EXPORT),
        directory(IMAGE_DIRECTORY_ENTRY_EXCEPTION),
    )


def _hide_sections(header: bytes) -> bytes:
    """Sets NumberOfSections to 0 so pefile maps every RVA to the same buffer offset."""
    if len(header) < 0x40:
        return header
    e_lfanew = struct.unpack_from("<I", header, 0x3C)[0]
    position = e_lfanew + _NUMBER_OF_SECTIONS_OFFSET
    if position + 2 > len(header):
        return header
    patched = bytearray(header)
    struct.pack_into("<H", patched, position, 0)
    return bytes(patched)


def parse_export_directory(image: bytes, base: int) -> ModuleExports | None:
    """Parses the export directory of a memory-layout image buffer (offset == RVA).

    ``image`` must hold at least the header page and the export directory range; bytes not read
    from memory may be zero.  Forwarded exports (an RVA inside the export directory) and exports
    without a name or with RVA 0 are left out: they do not name code at that address.
    """
    try:
        pe = pefile.PE(data=_hide_sections(image), fast_load=True)
        pe.parse_data_directories(directories=[IMAGE_DIRECTORY_ENTRY_EXPORT])
    except pefile.PEFormatError:
        return None
    export_dir = getattr(pe, "DIRECTORY_ENTRY_EXPORT", None)
    if export_dir is None:
        return None
    pairs: list[tuple[str, int]] = []
    for symbol in export_dir.symbols:
        if symbol.forwarder or not symbol.name or not symbol.address:
            continue
        name = symbol.name.decode("ascii", errors="replace")
        pairs.append((name, base + symbol.address))
    return ModuleExports.from_pairs(base, pairs)


def read_pages_into(
    context: interfaces.context.ContextInterface,
    layer_name: str,
    base: int,
    buffer: bytearray,
    rva: int,
    size: int,
) -> bool:
    """Copies [rva, rva+size) of the image at ``base`` into ``buffer`` page by page.

    Returns False if any page was unreadable (its bytes stay zero)."""
    complete = True
    cursor = rva
    end = rva + size
    while cursor < end:
        page_end = min(end, (cursor & ~(memory.PAGE_SIZE - 1)) + memory.PAGE_SIZE)
        data = memory.read_bytes(context, layer_name, base + cursor, page_end - cursor)
        if data is None:
            complete = False
        else:
            buffer[cursor:page_end] = data
        cursor = page_end
    return complete


def read_module_exports(
    context: interfaces.context.ContextInterface, layer_name: str, base: int
) -> ModuleExports | None:
    """Reads and parses the export table of the image mapped at ``base`` in ``layer_name``.

    Returns None when the headers or any page of the export directory cannot be read, so that
    the caller can try another process's copy of the same image.
    """
    header = memory.read_bytes(context, layer_name, base, HEADER_SIZE)
    if header is None:
        return None
    headers = parse_headers(header)
    if headers is None:
        return None
    export = headers.export
    if (
        export.rva == 0
        or export.size == 0
        or export.size > MAX_EXPORT_DIRECTORY
        or export.rva + export.size > MAX_IMAGE_SPAN
    ):
        # A valid image without exports: an empty table, not a failure.
        return ModuleExports.from_pairs(base, [])
    image = bytearray(max(HEADER_SIZE, export.rva + export.size))
    image[:HEADER_SIZE] = header
    if not read_pages_into(context, layer_name, base, image, export.rva, export.size):
        return None
    return parse_export_directory(bytes(image), base)
