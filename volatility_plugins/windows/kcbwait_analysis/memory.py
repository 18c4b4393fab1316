"""Bounded, exception-safe reads from Volatility layers.

Every analysis step of windows.kcbwait reads memory whose contents may be smeared, paged out or
hostile.  These helpers turn Volatility's ``InvalidAddressException`` (which includes
``PagedInvalidAddressException``) into ``None`` so that a caller can record an ``unreadable: X``
note instead of losing the thread row, and they refuse reads larger than a fixed cap.
"""

from __future__ import annotations

import struct
from typing import Callable, Iterable, Iterator, Optional, TypeVar

from volatility3.framework import exceptions, interfaces
from volatility3.plugins.windows.kcbwait_analysis import read_stats

PAGE_SIZE = 0x1000
# No single read of this plugin needs more than this; anything larger is a corrupt length.
MAX_READ = 0x100000
# x64 user and kernel addresses are 64-bit; anything outside is a corrupt pointer.
ADDRESS_LIMIT = 1 << 64

T = TypeVar("T")

PageSource = Callable[[int], Optional[bytes]]
"""Returns the PAGE_SIZE bytes of the page at a page-aligned address, or None if unreadable."""


def canonical(address: int) -> int:
    """``address`` in x64 canonical form (bits 63..48 copies of bit 47).

    Volatility masks pointer members to the layer's 48 address bits; a value shown to the
    analyst should read as Windows stores it (0xffffd00a... for a kernel address).
    """
    address &= (1 << 64) - 1
    if address & (1 << 47):
        return address | 0xFFFF_0000_0000_0000
    return address & 0x0000_FFFF_FFFF_FFFF


def try_read(getter: Callable[[], T]) -> T | None:
    """Runs ``getter`` and returns its value, or None when it touched unreadable memory."""
    try:
        return getter()
    except exceptions.InvalidAddressException:
        return None


def read_bytes(
    context: interfaces.context.ContextInterface,
    layer_name: str,
    address: int,
    length: int,
    stats: read_stats.ReadStats | None = None,
) -> bytes | None:
    """Reads ``length`` bytes at ``address``; None if any byte is unreadable or the request is
    out of range.  ``stats``, when given, counts the read."""
    if length <= 0 or length > MAX_READ or address < 0 or address + length > ADDRESS_LIMIT:
        return None
    if stats is not None:
        stats.count_read(length)
    try:
        return context.layers[layer_name].read(address, length)
    except exceptions.InvalidAddressException:
        return None


def read_u64(
    context: interfaces.context.ContextInterface,
    layer_name: str,
    address: int,
    stats: read_stats.ReadStats | None = None,
) -> int | None:
    """Reads one little-endian qword (x64 pointers are 8 bytes)."""
    data = read_bytes(context, layer_name, address, 8, stats)
    if data is None:
        return None
    return struct.unpack("<Q", data)[0]


def layer_page_source(
    context: interfaces.context.ContextInterface,
    layer_name: str,
    stats: read_stats.ReadStats | None = None,
) -> PageSource:
    """A PageSource backed by a Volatility layer."""

    def page(address: int) -> bytes | None:
        return read_bytes(context, layer_name, address, PAGE_SIZE, stats)

    return page


class PagedReader:
    """Reads through a PageSource one page at a time, remembering each page it fetched.

    Reading page by page means one unreadable page (paged out, never committed) costs only that
    page, not the whole window around it.  ``max_pages`` caps how much one reader may fetch.
    """

    def __init__(self, source: PageSource, max_pages: int = 512) -> None:
        self._source = source
        self._pages: dict[int, bytes | None] = {}
        self._max_pages = max_pages
        self.unreadable = False
        """True once any page requested through this reader could not be read."""
        self.exhausted = False
        """True once a page was refused because the reader's page budget was spent."""

    def page(self, address: int) -> bytes | None:
        """The page containing ``address`` (None if unreadable or over the page budget)."""
        base = address & ~(PAGE_SIZE - 1)
        if base not in self._pages:
            if len(self._pages) >= self._max_pages:
                self.exhausted = True
                return None
            if base < 0 or base >= ADDRESS_LIMIT:
                self.unreadable = True
                return None
            data = self._source(base)
            if data is not None and len(data) != PAGE_SIZE:
                data = None
            self._pages[base] = data
        data = self._pages[base]
        if data is None:
            self.unreadable = True
        return data

    def read(self, address: int, length: int) -> bytes | None:
        """Reads ``length`` bytes (at most a few pages) or None if any part is unreadable."""
        if length <= 0 or length > 4 * PAGE_SIZE or address < 0:
            return None
        chunks = []
        cursor = address
        end = address + length
        while cursor < end:
            data = self.page(cursor)
            if data is None:
                return None
            start = cursor & (PAGE_SIZE - 1)
            take = min(end - cursor, PAGE_SIZE - start)
            chunks.append(data[start : start + take])
            cursor += take
        return b"".join(chunks)


def bounded(iterable: Iterable[T], limit: int) -> Iterator[T]:
    """Yields at most ``limit`` items of a memory-driven iterable, stopping quietly (instead of
    raising) when advancing it touches unreadable memory."""
    iterator = iter(iterable)
    for _ in range(limit):
        try:
            item = next(iterator)
        except StopIteration:
            return
        except exceptions.InvalidAddressException:
            return
        yield item
