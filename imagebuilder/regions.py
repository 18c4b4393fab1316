"""Which physical bytes of an image belong to which thread, process or list: the fuzz map.

The builder records, as it lays structures out, the virtual ranges windows.kcbwait reads for
each thread (its ETHREAD, kernel stacks, TEB, user stack, callback-table entries), each
process (EPROCESS, PEB, loader data, the module pages it symbolizes with) and each list link,
and translates them here into physical ranges together with the page-table entries that map
them.  The fuzz harness mutates physical bytes and uses this map to know which threads a
mutation touched: every other thread must still be reported exactly as the truth file says.

The map over-approximates on purpose (a thread owns its whole kernel stack and committed user
stack, a process its whole loader heap): a mutation it misattributes to a thread only weakens
a test, while a byte it forgot would make the fuzz report a false failure.

Owners:
- ``("thread", pid, tid)``, ``("process", pid)``, ``("global",)``;
- ``("link", list, node)``: one node's Flink/Blink. ``list`` is ``"processes"`` (nodes: PIDs
  and ``"head"``) or ``"threads:PID"`` (nodes: TIDs, ``"ethread-head"``, ``"kthread-head"``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from imagebuilder.memory import PAGE, AddressSpace

Owner = tuple[Any, ...]
GLOBAL: Owner = ("global",)
PROCESS_LIST = "processes"


def thread_list(pid: int) -> str:
    return f"threads:{pid}"


@dataclass
class RegionMap:
    """Physical ranges by owner; ``process_dependents`` lists processes whose threads also
    depend on another process's memory (an ntdll export directory read from its copy)."""

    ranges: dict[Owner, list[tuple[int, int]]] = field(default_factory=dict)
    process_dependents: dict[int, list[int]] = field(default_factory=dict)
    # Labelled structures the fuzz harness aims at ("trap_frame", "ucallout_frame", ...):
    # label -> physical ranges.  Owners say who a byte belongs to; targets say what it is.
    targets: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    # Virtual addresses of structures, for mutations that redirect a pointer to one of them.
    pointers: list[int] = field(default_factory=list)
    _virtual: list[tuple[Owner, AddressSpace, int, int]] = field(default_factory=list)
    _targets: list[tuple[str, AddressSpace, int, int]] = field(default_factory=list)

    def add_physical(self, owner: Owner, start: int, end: int) -> None:
        if end > start:
            self.ranges.setdefault(owner, []).append((start, end))

    def add_virtual(self, owner: Owner, space: AddressSpace, va: int, size: int) -> None:
        """[va, va + size) in ``space``, translated by ``resolve`` once the image is final."""
        if size > 0:
            self._virtual.append((owner, space, va, size))

    def add_target(self, label: str, space: AddressSpace, va: int, size: int) -> None:
        """A structure worth mutating, by what it is."""
        if size > 0:
            self._targets.append((label, space, va, size))
            self.pointers.append(va)

    def add_physical_target(self, label: str, start: int, end: int) -> None:
        """A structure worth mutating given by its physical range (a page-table entry)."""
        self.targets.setdefault(label, []).append((start, end))

    def resolve(self) -> None:
        """Translates every recorded virtual range (after all damage has been applied)."""
        for owner, space, va, size in self._virtual:
            self._translate(owner, space, va, size)
        self._virtual.clear()
        for label, space, va, size in self._targets:
            start = va
            while start < va + size:
                stop = min(va + size, (start & ~(PAGE - 1)) + PAGE)
                physical = space.translate(start)
                if physical is not None:
                    self.targets.setdefault(label, []).append((physical, physical + (stop - start)))
                start = stop
        self._targets.clear()

    def _translate(self, owner: Owner, space: AddressSpace, va: int, size: int) -> None:
        """The bytes where mapped, and every page's table entries (a not-present PTE too:
        paging the page back in would change what is read)."""
        end = va + size
        page = va & ~(PAGE - 1)
        while page < end:
            start, stop = max(va, page), min(end, page + PAGE)
            physical = space.translate(start)
            if physical is not None:
                self.add_physical(owner, physical, physical + (stop - start))
            for slot in space.entry_slots(page):
                self.add_physical(owner, slot, slot + 8)
            page += PAGE

    def add_excluding(
        self,
        owner: Owner,
        space: AddressSpace,
        va: int,
        size: int,
        holes: Iterable[tuple[Owner, int, int]],
    ) -> None:
        """[va, va + size) for ``owner`` except the (hole owner, start, size) ranges, which go
        to their own owners (list links inside a structure)."""
        cursor = va
        for hole_owner, start, hole_size in sorted(holes, key=lambda h: h[1]):
            self.add_virtual(owner, space, cursor, start - cursor)
            self.add_virtual(hole_owner, space, start, hole_size)
            cursor = start + hole_size
        self.add_virtual(owner, space, cursor, va + size - cursor)

    def to_json(self) -> dict[str, Any]:
        """Owners as JSON-friendly records, ranges merged and sorted."""
        owners = []
        for owner, ranges in self.ranges.items():
            merged: list[list[int]] = []
            for start, end in sorted(ranges):
                if merged and start <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], end)
                else:
                    merged.append([start, end])
            owners.append({"owner": list(owner), "ranges": merged})
        return {
            "owners": owners,
            "process_dependents": {str(k): v for k, v in self.process_dependents.items()},
        }
