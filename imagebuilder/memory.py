"""Sparse physical memory and x64 4-level page tables.

Only pages that hold data exist; the image file is written sparse, so a 1 GiB scenario with
a few thousand used pages costs a few thousand pages on disk.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

PAGE = 0x1000
KERNEL_SPACE_START = 0xFFFF800000000000

# Page-table entry bits (Intel SDM vol. 3, 4.5): present, writable, user.
PTE_PRESENT = 0x1
PTE_WRITE = 0x2
PTE_USER = 0x4
# A not-present entry with other bits set reads as a page-file entry to Volatility
# (PagedInvalidAddressException), which is how Windows leaves paged-out pages.
PAGEFILE_PTE = 0x0000_0001_0000_0000  # page-file offset 1, page file 0, not present

# Physical pages the builder reserves below the general allocator: the x64 low stub
# (PROCESSOR_START_BLOCK) in the first MiB, and the System PML4 inside the window
# Volatility scans first for a self-referencing page table (0x150000-0x2A0000).
LOW_STUB_PA = 0x1000
SYSTEM_PML4_PA = 0x1AA000
FIRST_FREE_PA = 0x1000000
_ZERO_PAGE = bytes(PAGE)


class OutOfMemory(ValueError):
    """The scenario needs more physical memory than it asked for."""


class PhysicalMemory:
    """Pages by physical frame number, allocated upwards from 16 MiB."""

    def __init__(self, size: int) -> None:
        if size % PAGE or size < FIRST_FREE_PA + 64 * PAGE:
            raise ValueError(f"physical size {size:#x} must be page aligned and above 16 MiB")
        self.size = size
        self.pages: dict[int, bytearray] = {}
        self._next = FIRST_FREE_PA

    def alloc(self) -> int:
        if self._next + PAGE > self.size:
            raise OutOfMemory(
                f"scenario needs more than {self.size // (1024 * 1024)} MiB of physical memory"
                " (raise memory_mb)"
            )
        address = self._next
        self._next += PAGE
        self.pages[address >> 12] = bytearray(PAGE)
        return address

    @property
    def used(self) -> int:
        return self._next

    def page(self, address: int) -> bytearray:
        pfn = address >> 12
        data = self.pages.get(pfn)
        if data is None:
            data = self.pages[pfn] = bytearray(PAGE)
        return data

    def write(self, address: int, data: bytes) -> None:
        while data:
            page = self.page(address)
            start = address & 0xFFF
            chunk = data[: PAGE - start]
            page[start : start + len(chunk)] = chunk
            address += len(chunk)
            data = data[len(chunk) :]

    def read(self, address: int, length: int) -> bytes:
        out = bytearray()
        while length > 0:
            start = address & 0xFFF
            n = min(length, PAGE - start)
            page = self.pages.get(address >> 12)
            out += page[start : start + n] if page is not None else bytes(n)
            address += n
            length -= n
        return bytes(out)

    def runs(self) -> Iterator[tuple[int, bytes]]:
        """Used pages in address order, as (physical address, 4 KiB of data)."""
        for pfn in sorted(self.pages):
            yield pfn << 12, bytes(self.pages[pfn])

    def write_raw(self, path: Path) -> None:
        """A raw physical image, written sparse: runs of used, non-zero pages only."""
        with open(path, "wb") as handle:
            handle.truncate(self.size)
            run_start, run = -1, []
            for pfn in sorted(self.pages):
                page = self.pages[pfn]
                if page == _ZERO_PAGE:
                    continue
                if run and pfn != run_start + len(run):
                    handle.seek(run_start << 12)
                    handle.write(b"".join(run))
                    run = []
                if not run:
                    run_start = pfn
                run.append(page)
            if run:
                handle.seek(run_start << 12)
                handle.write(b"".join(run))


class AddressSpace:
    """One x64 virtual address space (a PML4) over a PhysicalMemory.

    Process spaces hand kernel addresses to the System space, whose upper-half PML4
    entries are copied into every process PML4 when the image is finalised, as Windows
    shares the kernel half between all address spaces.
    """

    def __init__(
        self,
        memory: PhysicalMemory,
        pml4: int,
        self_ref_index: int,
        kernel: AddressSpace | None = None,
    ) -> None:
        self.memory = memory
        self.pml4 = pml4
        self.kernel = kernel
        self.self_ref_index = self_ref_index
        # Present translations by page, so repeated writes skip the four-level walk.
        self._tlb: dict[int, int] = {}
        memory.page(pml4)
        self._set_entry(pml4, self_ref_index, pml4 | PTE_PRESENT | PTE_WRITE)

    # -- page tables -------------------------------------------------------------------
    def _entry(self, table: int, index: int) -> int:
        return struct.unpack_from("<Q", self.memory.page(table), index * 8)[0]

    def _set_entry(self, table: int, index: int, value: int) -> None:
        struct.pack_into("<Q", self.memory.page(table), index * 8, value)

    @staticmethod
    def _indices(va: int) -> tuple[int, int, int, int]:
        return (va >> 39) & 0x1FF, (va >> 30) & 0x1FF, (va >> 21) & 0x1FF, (va >> 12) & 0x1FF

    def _space_for(self, va: int) -> AddressSpace:
        if va >= KERNEL_SPACE_START and self.kernel is not None:
            return self.kernel
        return self

    def _pte_slot(self, va: int, create: bool) -> tuple[int, int] | None:
        user = va < KERNEL_SPACE_START
        flags = PTE_PRESENT | PTE_WRITE | (PTE_USER if user else 0)
        table = self.pml4
        for index in self._indices(va)[:3]:
            entry = self._entry(table, index)
            if not entry & PTE_PRESENT:
                if not create:
                    return None
                new = self.memory.alloc()
                self._set_entry(table, index, new | flags)
                entry = new
            table = entry & 0x000FFFFFFFFFF000
        return table, self._indices(va)[3]

    def map_page(self, va: int, pa: int) -> None:
        space = self._space_for(va)
        table, index = space._pte_slot(va, create=True)  # type: ignore[misc]
        user = va < KERNEL_SPACE_START
        space._set_entry(table, index, pa | PTE_PRESENT | PTE_WRITE | (PTE_USER if user else 0))
        space._tlb[va >> 12] = pa & ~0xFFF

    def page_out(self, va: int) -> None:
        """Leave the page as Windows leaves a paged-out one: a not-present page-file PTE."""
        space = self._space_for(va)
        slot = space._pte_slot(va, create=True)
        assert slot is not None
        space._set_entry(slot[0], slot[1], PAGEFILE_PTE)
        space._tlb.pop(va >> 12, None)

    def translate(self, va: int) -> int | None:
        space = self._space_for(va)
        cached = space._tlb.get(va >> 12)
        if cached is not None:
            return cached | (va & 0xFFF)
        slot = space._pte_slot(va, create=False)
        if slot is None:
            return None
        entry = space._entry(*slot)
        if not entry & PTE_PRESENT:
            return None
        return (entry & 0x000FFFFFFFFFF000) | (va & 0xFFF)

    def is_mapped(self, va: int) -> bool:
        return self.translate(va) is not None

    def entry_slots(self, va: int) -> list[int]:
        """Physical addresses of the page-table entries (PML4E, PDPTE, PDE, PTE) that translate
        ``va``, as far as the tables exist: what a reader of ``va`` depends on besides the
        page itself."""
        space = self._space_for(va)
        slots = []
        table = space.pml4
        for depth, index in enumerate(space._indices(va)):
            slots.append(table + 8 * index)
            if depth == 3:
                break
            entry = space._entry(table, index)
            if not entry & PTE_PRESENT:
                break
            table = entry & 0x000FFFFFFFFFF000
        return slots

    def ensure(self, va: int, size: int) -> None:
        """Back [va, va+size) with fresh zeroed pages where nothing is mapped yet."""
        page = va & ~0xFFF
        while page < va + size:
            if self.translate(page) is None:
                self.map_page(page, self.memory.alloc())
            page += PAGE

    # -- data --------------------------------------------------------------------------
    def write(self, va: int, data: bytes) -> None:
        self.ensure(va, len(data))
        while data:
            n = min(len(data), PAGE - (va & 0xFFF))
            pa = self.translate(va)
            assert pa is not None
            self.memory.write(pa, data[:n])
            va += n
            data = data[n:]

    def read(self, va: int, length: int) -> bytes:
        out = bytearray()
        while length > 0:
            n = min(length, PAGE - (va & 0xFFF))
            pa = self.translate(va)
            out += self.memory.read(pa, n) if pa is not None else bytes(n)
            va += n
            length -= n
        return bytes(out)

    def share_kernel_half(self) -> None:
        """Copy the System space's upper-half PML4 entries (all but the self-reference)."""
        assert self.kernel is not None
        for index in range(256, 512):
            if index == self.self_ref_index:
                continue
            value = self.kernel._entry(self.kernel.pml4, index)
            if value:
                self._set_entry(self.pml4, index, value)
