"""Is a process's kernel callback table hijacked?  (docs/output-contract.md, "Table".)

``PEB.KernelCallbackTable`` is user32's ``apfnDispatch`` (wow64win.dll's own thunk table on
the 64-bit side of a WoW64 process): a read-only array in the owner image whose entries all
point into the owner's code (real-binaries.md).  Malware that redirects callbacks either points
the PEB at a copy it controls (usually private RWX memory) or overwrites entries; so the table
must lie inside its owner in a non-writable section, and every entry in an executable section
of the owner.  Anything else is reported with where it points: another module, or private
memory (RWX named as such, from the VAD's protection).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence, Union

from volatility3.framework import exceptions, interfaces
from volatility3.plugins.windows.kcbwait_analysis import memory, pe_exports

# docs/output-contract.md: a table is checked for at most this many entries.
MAX_ENTRIES = 0x400
USER_SPACE_END = {8: 0x800000000000, 4: 0x100000000}
# A process has a few hundred VADs; a tree walk is capped far beyond that.
MAX_VADS = 0x10000
RWX_PROTECTION = "PAGE_EXECUTE_READWRITE"
OWNER_64 = "user32.dll"
OWNER_WOW64 = "wow64win.dll"
WOW64_USER32_SUFFIX = "\\syswow64\\user32.dll"


@dataclass(frozen=True)
class InModule:
    """An address inside a loaded module (another one, or the owner outside its code)."""

    module: str
    rva: int


@dataclass(frozen=True)
class InPrivate:
    """An address in no module: private memory, RWX when its VAD says so."""

    address: int
    rwx: bool


Where = Union[InModule, InPrivate]


@dataclass(frozen=True)
class TableOutsideOwner:
    table: int
    where: Where


@dataclass(frozen=True)
class TableInWritableSection:
    table: int
    section: str
    owner: str


@dataclass(frozen=True)
class TableOutsideSections:
    table: int
    owner: str


@dataclass(frozen=True)
class EntryHijacked:
    index: int
    where: Where


Hijack = Union[TableOutsideOwner, TableInWritableSection, TableOutsideSections, EntryHijacked]


@dataclass(frozen=True)
class TableVerdict:
    """``ok`` when there are no hijacks and nothing was unreadable."""

    hijacks: tuple[Hijack, ...] = ()
    unreadable: bool = False


@dataclass(frozen=True)
class Region:
    """A named module or a VAD: [base, base + size)."""

    name: str | None
    base: int
    size: int
    private: bool = False
    rwx: bool = False
    path: str | None = None

    def contains(self, address: int) -> bool:
        return self.base <= address < self.base + self.size


@dataclass(frozen=True)
class Owner:
    """The image that should own the table, with its section headers (None: unreadable)."""

    region: Region
    sections: tuple[pe_exports.Section, ...] | None

    def section_of(self, address: int) -> pe_exports.Section | None:
        if not self.region.contains(address):
            return None
        rva = address - self.region.base
        for section in self.sections or ():
            if section.contains(rva):
                return section
        return None

    def executes(self, address: int) -> bool:
        section = self.section_of(address)
        return section is not None and section.executable


def where(address: int, modules: Sequence[Region], vads: Callable[[], Sequence[Region]]) -> Where:
    """Where ``address`` points: a module (first match, loader order), else private memory."""
    for module in modules:
        if module.contains(address):
            return InModule(module.name or "", address - module.base)
    for vad in vads():
        if vad.contains(address):
            return InPrivate(address, vad.rwx)
    return InPrivate(address, False)


def check_table(
    table: int,
    owner: Owner | None,
    modules: Sequence[Region],
    vads: Callable[[], Sequence[Region]],
) -> TableVerdict:
    """The table pointer's own verdict (item 1 of the contract)."""
    if owner is None or not owner.region.contains(table):
        return TableVerdict((TableOutsideOwner(table, where(table, modules, vads)),))
    if owner.sections is None:
        return TableVerdict((), True)
    section = owner.section_of(table)
    name = owner.region.name or ""
    if section is None:
        return TableVerdict((TableOutsideSections(table, name),))
    if section.writable:
        return TableVerdict((TableInWritableSection(table, section.name, name),))
    return TableVerdict()


def check_entry(
    index: int,
    value: int | None,
    owner: Owner | None,
    modules: Sequence[Region],
    vads: Callable[[], Sequence[Region]],
) -> TableVerdict:
    """One entry's verdict (item 2): it must lie in an executable section of the owner."""
    if value is None or (owner is not None and owner.sections is None):
        return TableVerdict((), True)
    if owner is not None and owner.executes(value):
        return TableVerdict()
    return TableVerdict((EntryHijacked(index, where(value, modules, vads)),))


def combine(verdicts: Sequence[TableVerdict]) -> TableVerdict:
    hijacks: list[Hijack] = []
    for verdict in verdicts:
        for item in verdict.hijacks:
            if item not in hijacks:
                hijacks.append(item)
    return TableVerdict(tuple(hijacks), any(v.unreadable for v in verdicts))


def read_entries(
    read: Callable[[int, int], bytes | None],
    table: int,
    width: int,
    owner: Owner | None,
) -> list[int]:
    """The entries checked (contract "windows.kcbtable"): consecutive non-zero user-mode
    addresses from index 0, at most MAX_ENTRIES, never past the end of the owner section that
    holds the table; stops at the first unreadable entry."""
    limit = MAX_ENTRIES
    section = owner.section_of(table) if owner is not None else None
    if section is not None:
        section_end = owner.region.base + section.rva + section.size
        limit = min(limit, max(0, (section_end - table) // width))
    entries: list[int] = []
    unpack = struct.Struct("<Q" if width == 8 else "<I").unpack
    for index in range(limit):
        raw = read(table + width * index, width)
        if raw is None:
            break
        (value,) = unpack(raw)
        if not 0 < value < USER_SPACE_END[width]:
            break
        entries.append(value)
    return entries


def read_owner(
    context: interfaces.context.ContextInterface,
    layer_name: str,
    region: Region,
    stats=None,
) -> Owner:
    """The owner with its section headers as mapped in ``layer_name``."""
    headers, _problem = pe_exports.read_headers(context, layer_name, region.base, stats)
    return Owner(region, headers.sections if headers is not None else None)


def _vad_nodes(root) -> Iterator:
    """Volatility's VAD walk, ending quietly where the tree is damaged (unreadable nodes, or
    the RuntimeError Volatility raises for a tree deeper than it accepts)."""
    try:
        yield from root.traverse()
    except (exceptions.InvalidAddressException, RuntimeError):
        return


def process_vads(
    proc: interfaces.objects.ObjectInterface,
    protect_values: Sequence[int] | None,
    winnt_protections: dict,
) -> list[Region]:
    """Every VAD of ``proc`` (image VADs carry their file's path and last path element)."""
    regions: list[Region] = []
    try:
        root = proc.get_vad_root()
    except (exceptions.InvalidAddressException, AttributeError):
        return regions
    for vad in memory.bounded(_vad_nodes(root), MAX_VADS):
        try:
            start, end = int(vad.get_start()), int(vad.get_end())
            private = bool(vad.get_private_memory())
            protection = ""
            if protect_values is not None:
                protection = vad.get_protection(protect_values, winnt_protections)
            path = vad.get_file_name()
        except (exceptions.InvalidAddressException, AttributeError):
            continue
        path = path if isinstance(path, str) else None
        regions.append(
            Region(
                path.rsplit("\\", 1)[-1] if path else None,
                start,
                end - start + 1,
                private,
                private and protection == RWX_PROTECTION,
                path,
            )
        )
    return regions


def wow64_user32(vads: Sequence[Region]) -> Region | None:
    """The 32-bit user32 of a WoW64 process: the image VAD of ...\\SysWOW64\\user32.dll."""
    for region in vads:
        if region.path and not region.private and region.path.lower().endswith(WOW64_USER32_SUFFIX):
            return region
    return None


@dataclass
class ProcessTable:
    """One process's callback table (64- or 32-bit) and what its checks need."""

    bits: int
    table: int | None
    """The table pointer; None when it could not be read."""
    owner: Owner | None
    modules: tuple[Region, ...]
    vads: Callable[[], Sequence[Region]]
    _verdict: TableVerdict | None = field(default=None, init=False, repr=False)

    @property
    def present(self) -> bool:
        """A table to check: a non-zero pointer, or an unreadable one beside a loaded owner."""
        return bool(self.table) or (self.table is None and self.owner is not None)

    def verdict(self) -> TableVerdict:
        """The table pointer's verdict (computed once: every thread of the process asks)."""
        if self._verdict is None:
            if self.table is None:
                self._verdict = TableVerdict((), True)
            else:
                self._verdict = check_table(self.table, self.owner, self.modules, self.vads)
        return self._verdict

    def entry(self, index: int, value: int | None) -> TableVerdict:
        return check_entry(index, value, self.owner, self.modules, self.vads)

    def where(self, address: int) -> Where:
        return where(address, self.modules, self.vads)
