"""Which function an address belongs to, by the RUNTIME_FUNCTIONs the builder laid out.

An image's .pdata holds one RUNTIME_FUNCTION per contiguous piece of a function with unwind
data; a piece whose UNWIND_INFO carries UNW_FLAG_CHAININFO (a secondary prologue, a separated
cold fragment) names its parent entry, and following parents ends at the function's primary
entry.  The builder records each entry with the primary it chains to when it places the code,
so the truth never has to parse its own output back.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


@dataclass(frozen=True)
class FunctionTable:
    # (BeginAddress, EndAddress, BeginAddress of the primary entry) per RUNTIME_FUNCTION,
    # ascending; the primary of a primary entry is its own begin.
    entries: tuple[tuple[int, int, int], ...] = ()
    _begins: list[int] = field(default_factory=list, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._begins.extend(begin for begin, _end, _primary in self.entries)

    def primary(self, rva: int) -> int | None:
        """Begin RVA of the primary entry of the function containing ``rva``; None when no
        RUNTIME_FUNCTION contains it."""
        index = bisect.bisect_right(self._begins, rva) - 1
        if index < 0:
            return None
        begin, end, primary = self.entries[index]
        return primary if begin <= rva < end else None

    def entry(self, rva: int) -> int | None:
        """Begin RVA of the RUNTIME_FUNCTION containing ``rva`` (None: no entry)."""
        index = bisect.bisect_right(self._begins, rva) - 1
        if index < 0:
            return None
        begin, end, _primary = self.entries[index]
        return begin if begin <= rva < end else None

    def chained(self) -> list[tuple[int, int, int]]:
        """The secondary entries (a primary other than their own begin)."""
        return [e for e in self.entries if e[0] != e[2]]


def resolve_primaries(functions: list[tuple[int, int, int | None]]) -> FunctionTable:
    """``functions``: (begin, end, parent begin or None) per entry; parents may chain."""
    parent_of = {begin: parent for begin, _end, parent in functions}
    entries = []
    for begin, end, _parent in sorted(functions, key=lambda f: f[0]):
        primary, links = begin, 0
        while parent_of.get(primary) is not None:
            primary = parent_of[primary]
            links += 1
            assert links <= 32, f"chain from {begin:#x} does not end"
        entries.append((begin, end, primary))
    return FunctionTable(tuple(entries))
