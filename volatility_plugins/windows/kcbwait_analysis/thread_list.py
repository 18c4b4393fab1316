"""A process's threads, listed from both of the kernel's thread lists, robust to broken links.

Windows links every thread twice: ``ETHREAD.ThreadListEntry`` into ``EPROCESS.ThreadListHead``
(the list windows.threads walks, forward only) and ``KTHREAD.ThreadListEntry`` into
``KPROCESS.ThreadListHead``.  A smeared or hostile image can break a list anywhere: a Flink
into unmapped memory, a link back to an earlier entry (a cycle, or an entry pointing at
itself), a link to something that is not a thread.  One broken link must not hide the threads
behind it, so the listing walks each list forward from its head and then backward (Blink).
Each walk stops at the head, at an unreadable link, at an entry it already met (a cycle), after
MAX_NOT_THREADS entries in a row that are not thread objects, or after MAX_THREADS entries.
Threads are listed once, in this order (docs/output-contract.md): the forward walk of the ETHREAD
list; threads only its backward walk reached, in list order; then the same two walks over the
KTHREAD list.

An entry counts as a thread when its ``KTHREAD.Header.Type`` is ThreadObject; without that check
a link into arbitrary memory would turn whatever lies there into rows.  An entry that fails it
is passed over, not a dead end: its links are still followed, because a smeared header on one
thread must not hide the threads listed after it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from volatility3.framework import constants, exceptions, interfaces
from volatility3.plugins.windows.kcbwait_analysis import memory, read_stats

# A process's thread list is walked at most this far in each direction; no real process comes
# close (Windows' own limit is memory), and a corrupt list could otherwise run forever.
MAX_THREADS = 0x10000
# KOBJECTS.ThreadObject: the dispatcher-header Type of every KTHREAD (WRK ke.h).
THREAD_OBJECT_TYPE = 6
# Entries in a row a walk passes over when they are not threads: a smeared header or two is
# worth stepping over, a long run means the walk has left the list for unrelated memory.
MAX_NOT_THREADS = 16
# _LIST_ENTRY: Flink then Blink, 8 bytes each on x64.
_LIST_ENTRY = struct.Struct("<QQ")

# Why a walk stopped before returning to its list head.
STOP_UNREADABLE = "unreadable link"
STOP_CYCLE = "link back to an earlier entry"
STOP_NOT_THREAD = f"{MAX_NOT_THREADS + 1} entries in a row that are not threads"
STOP_TOO_LONG = f"more than {MAX_THREADS} entries"


@dataclass(frozen=True)
class ListShape:
    """Offsets (from the ETHREAD) of the entry each list links and of its head in EPROCESS."""

    name: str
    head_offset: int
    entry_offset: int


@dataclass
class ThreadListing:
    """The threads found (ETHREAD addresses, in listing order) and what broke on the way."""

    addresses: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class ThreadLister:
    """Lists the threads of processes of one kernel (offsets resolved once per image)."""

    def __init__(
        self,
        context: interfaces.context.ContextInterface,
        kernel_module_name: str,
        stats: read_stats.ReadStats | None = None,
    ) -> None:
        self._context = context
        self._stats = stats
        self._kernel = context.modules[kernel_module_name]
        self._layer = context.layers[self._kernel.layer_name]
        self._mask = self._layer.address_mask
        self._table = self._kernel.symbol_table_name
        self._shapes = self._list_shapes()
        self._type_offset = self._offset("_KTHREAD", "Header", "_DISPATCHER_HEADER", "Type")

    def _offset(self, type_name: str, member: str, inner_type: str, inner: str) -> int | None:
        kernel = self._kernel
        if not kernel.get_type(type_name).has_member(member):
            return None
        outer = kernel.get_type(type_name).relative_child_offset(member)
        inner_template = kernel.get_type(inner_type)
        if not inner_template.has_member(inner):
            return None
        return outer + inner_template.relative_child_offset(inner)

    def _list_shapes(self) -> list[ListShape]:
        kernel = self._kernel
        ethread = kernel.get_type("_ETHREAD")
        tcb = ethread.relative_child_offset("Tcb")
        shapes = [
            ListShape(
                "ETHREAD",
                kernel.get_type("_EPROCESS").relative_child_offset("ThreadListHead"),
                ethread.relative_child_offset("ThreadListEntry"),
            )
        ]
        kthread = kernel.get_type("_KTHREAD")
        eprocess = kernel.get_type("_EPROCESS")
        if kthread.has_member("ThreadListEntry") and eprocess.has_member("Pcb"):
            kprocess = kernel.get_type("_KPROCESS")
            if kprocess.has_member("ThreadListHead"):
                shapes.append(
                    ListShape(
                        "KTHREAD",
                        eprocess.relative_child_offset("Pcb")
                        + kprocess.relative_child_offset("ThreadListHead"),
                        tcb + kthread.relative_child_offset("ThreadListEntry"),
                    )
                )
        return shapes

    def _links(self, entry: int) -> tuple[int, int] | None:
        data = memory.read_bytes(
            self._context, self._layer.name, entry, _LIST_ENTRY.size, self._stats
        )
        if data is None:
            return None
        flink, blink = _LIST_ENTRY.unpack(data)
        return flink & self._mask, blink & self._mask

    def _is_thread(self, ethread: int) -> bool | None:
        """Whether the entry's dispatcher header says ThreadObject; None if unreadable."""
        if self._type_offset is None:
            return True
        data = memory.read_bytes(
            self._context, self._layer.name, ethread + self._type_offset, 1, self._stats
        )
        if data is None:
            return None
        return data[0] == THREAD_OBJECT_TYPE

    def _walk(
        self, head: int, shape: ListShape, forward: bool, known: set[int]
    ) -> tuple[list[int], str | None, int]:
        """One walk from ``head``: ETHREAD addresses in walk order, why it stopped early (None
        when it came back to the head) and how many entries it passed over as not threads.
        Entries in ``known`` were already accepted as threads by an earlier walk, so they are
        followed without being checked again."""
        found: list[int] = []
        visited: set[int] = set()
        passed_over = in_a_row = 0
        entry = head
        for _ in range(MAX_THREADS):
            links = self._links(entry)
            if links is None:
                return found, STOP_UNREADABLE, passed_over
            entry = links[0] if forward else links[1]
            if entry == head:
                return found, None, passed_over
            if entry in visited:
                return found, STOP_CYCLE, passed_over
            visited.add(entry)
            ethread = (entry - shape.entry_offset) & self._mask
            if ethread not in known:
                is_thread = self._is_thread(ethread)
                if is_thread is None:
                    return found, STOP_UNREADABLE, passed_over
                if not is_thread:
                    passed_over += 1
                    in_a_row += 1
                    if in_a_row > MAX_NOT_THREADS:
                        return found, STOP_NOT_THREAD, passed_over
                    continue
            in_a_row = 0
            found.append(ethread)
        return found, STOP_TOO_LONG, passed_over

    def list(self, eprocess: int) -> ThreadListing:
        """Every thread of the EPROCESS at ``eprocess`` (a kernel virtual address)."""
        listing = ThreadListing()
        known: set[int] = set()
        for shape in self._shapes:
            head = (eprocess + shape.head_offset) & self._mask
            for forward in (True, False):
                found, stopped, passed_over = self._walk(head, shape, forward, known)
                direction = "Flink" if forward else "Blink"
                if passed_over:
                    listing.problems.append(
                        f"{shape.name} list, {direction} walk: passed over {passed_over} "
                        "entries that are not threads"
                    )
                if stopped is not None:
                    listing.problems.append(
                        f"{shape.name} list, {direction} walk: {stopped} after {len(found)} entries"
                    )
                new = [address for address in found if address not in known]
                if not forward:
                    new.reverse()  # list order: what the backward walk met last comes first
                for address in new:
                    if len(listing.addresses) >= MAX_THREADS:
                        return listing
                    known.add(address)
                    listing.addresses.append(address)
        return listing

    def threads(self, listing: ThreadListing) -> Iterator[interfaces.objects.ObjectInterface]:
        """ETHREAD objects for a listing's addresses."""
        type_name = f"{self._table}{constants.BANG}_ETHREAD"
        for address in listing.addresses:
            try:
                yield self._context.object(type_name, self._layer.name, offset=address)
            except exceptions.InvalidAddressException:
                continue
