"""Which function an address belongs to, from an x64 image's .pdata, read from memory.

Every x64 function that allocates stack or calls out has a RUNTIME_FUNCTION (BeginAddress,
EndAddress, UnwindData: three ULONG RVAs) in the exception directory; a function split into
parts (hot/cold code) has one entry per part, the later ones marked ``UNW_FLAG_CHAININFO`` in
their UNWIND_INFO, which then ends with a copy of the parent's RUNTIME_FUNCTION (Microsoft, "x64
exception handling": UNWIND_INFO, chained unwind info).  Two addresses are in the same function
when following those chains from each ends at the same primary entry.  A name is only given an
offset (``export+0xN``) inside its own function: the nearest export before an address in
another, unexported function (every user32 callback handler) names the wrong function.
"""

from __future__ import annotations

import bisect
import enum
import struct
from dataclasses import dataclass, field
from typing import Callable, Optional

# x64 RUNTIME_FUNCTION: ULONG BeginAddress, EndAddress, UnwindData.
_RUNTIME_FUNCTION = struct.Struct("<III")
# UNWIND_INFO: UBYTE Version:3, Flags:5; UBYTE SizeOfProlog; UBYTE CountOfCodes; UBYTE Frame.
UNW_FLAG_CHAININFO = 0x4
# A real image chains a part to its parent once or twice; a longer chain is corrupt or a loop.
MAX_CHAIN = 32
# ntdll has ~5,000 RUNTIME_FUNCTIONs; the directory itself is capped by its reader.
MAX_FUNCTIONS = 0x20000

UnwindReader = Callable[[int, int], Optional[bytes]]
"""(rva, length) -> bytes of the image at that RVA, or None when unreadable."""


class DirectoryState(enum.Enum):
    """How much of an image's exception directory was read.  An image without one is
    COMPLETE (every function in it is a leaf); INCOMPLETE means headers or some page of the
    directory could not be read, so a function missing from it may just be unread."""

    COMPLETE = enum.auto()
    INCOMPLETE = enum.auto()


@dataclass(frozen=True)
class RuntimeFunctions:
    """One image's RUNTIME_FUNCTIONs sorted by BeginAddress (empty entries dropped)."""

    begins: tuple[int, ...] = ()
    ends: tuple[int, ...] = ()
    unwind: tuple[int, ...] = ()
    _primary: dict[int, int] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def parse(cls, pdata: bytes | None) -> RuntimeFunctions:
        """Entries of an exception directory; zero (unreadable) and inverted ones are dropped,
        and the rest sorted, so an unsorted or partly paged-out directory still answers."""
        if not pdata:
            return cls()
        count = min(len(pdata) // _RUNTIME_FUNCTION.size, MAX_FUNCTIONS)
        entries = sorted(
            entry
            for entry in _RUNTIME_FUNCTION.iter_unpack(pdata[: count * _RUNTIME_FUNCTION.size])
            if entry[0] < entry[1]
        )
        return cls(
            tuple(e[0] for e in entries), tuple(e[1] for e in entries), tuple(e[2] for e in entries)
        )

    def covering(self, rva: int) -> int | None:
        """Index of the entry whose [BeginAddress, EndAddress) holds ``rva``."""
        index = bisect.bisect_right(self.begins, rva) - 1
        if index >= 0 and rva < self.ends[index]:
            return index
        return None

    def primary_begin(self, rva: int, read: UnwindReader) -> int | None:
        """BeginAddress of the primary entry of the function holding ``rva`` (chains
        followed), or None when no entry holds it.  A chain that cannot be read, loops or is
        too long ends at the last entry reached: the part itself counts as the function."""
        index = self.covering(rva)
        if index is None:
            return None
        begin = self.begins[index]
        if begin not in self._primary:
            self._primary[begin] = self._follow(index, read)
        return self._primary[begin]

    def _follow(self, index: int, read: UnwindReader) -> int:
        begin, unwind = self.begins[index], self.unwind[index]
        seen = {begin}
        for _ in range(MAX_CHAIN):
            parent = _parent_entry(unwind, read)
            if parent is None or parent[0] in seen:
                return begin
            begin, unwind = parent[0], parent[2]
            seen.add(begin)
        return begin


def _parent_entry(unwind: int, read: UnwindReader) -> tuple[int, int, int] | None:
    """The RUNTIME_FUNCTION a part's unwind data chains to, or None for a primary entry.

    UnwindData with bit 0 set names another RUNTIME_FUNCTION directly (an indirect entry);
    otherwise the UNWIND_INFO's CHAININFO flag says a parent entry follows its unwind codes,
    which are padded to an even count.
    """
    if unwind & 1:
        raw = read(unwind & ~1, _RUNTIME_FUNCTION.size)
        return _RUNTIME_FUNCTION.unpack(raw) if raw is not None else None
    header = read(unwind, 4)
    if header is None or not (header[0] >> 3) & UNW_FLAG_CHAININFO:
        return None
    codes = (header[2] + 1) & ~1
    raw = read(unwind + 4 + 2 * codes, _RUNTIME_FUNCTION.size)
    return _RUNTIME_FUNCTION.unpack(raw) if raw is not None else None


def same_function(
    functions: RuntimeFunctions, name_rva: int, address_rva: int, read: UnwindReader
) -> bool | None:
    """True/False when both RVAs lie in RUNTIME_FUNCTIONs (same primary entry or not); None
    when neither does (two leaf routines: the caller decides); False when only one does."""
    name_function = functions.primary_begin(name_rva, read)
    address_function = functions.primary_begin(address_rva, read)
    if name_function is None and address_function is None:
        return None
    return name_function is not None and name_function == address_function
