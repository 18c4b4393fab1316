"""The kernel half of an image: page tables, kernel image, globals, pool and executive objects.

Every structure is written field by field through the symbol table (``SymbolTable``), so
the same code lays out any kernel build the project has a table for.
"""

from __future__ import annotations

import random
import struct
from typing import Any

from imagebuilder.isf import SymbolTable
from imagebuilder.memory import LOW_STUB_PA, PAGE, SYSTEM_PML4_PA, AddressSpace, PhysicalMemory
from imagebuilder.pe_image import new_image, set_image_base

KUSER_SHARED_DATA = 0xFFFFF78000000000
KUSER_SHARED_DATA_USER = 0x7FFE0000
KERNEL_BASE = 0xFFFFF8063A000000  # 2 MiB aligned, as the low-stub search expects
POOL_START = 0xFFFFB00F00000000
STACKS_START = 0xFFFFD00A00000000
LARGE_PAGE = 0x200000
KERNEL_STACK_SIZE = 0x6000  # KERNEL_STACK_SIZE on x64 Windows
# Further kernel regions every Windows 10 machine has mapped, each in its own PML4 slot: the
# paged pool, the PFN database (MmPfnDatabase) and the HAL heap at the top of the address
# space.  With the regions above and the self-map they give the System PML4 the shape of a
# real one (MemProcFS checks for at least six supervisor kernel-half entries before it trusts
# a DTB it did not find through the low stub, e.g. the one a crash dump header names).
PAGED_POOL_START = 0xFFFFC50000000000
PFN_DATABASE = 0xFFFFE58000000000
HAL_HEAP = 0xFFFFFFFFFFC00000
_USED_PML4_SLOTS = {
    (a >> 39) & 0x1FF
    for a in (
        KUSER_SHARED_DATA,
        KERNEL_BASE,
        POOL_START,
        STACKS_START,
        PAGED_POOL_START,
        PFN_DATABASE,
        HAL_HEAP,
    )
}
# Exported data of ntoskrnl.exe the builder places: MemProcFS finds the System EPROCESS
# through the PsInitialSystemProcess export before it turns to symbols.
_KERNEL_EXPORTS = ("KeNumberProcessors", "PsInitialSystemProcess", "PsLoadedModuleList")

# IMAGE_SCN_CNT_CODE | MEM_NOT_PAGED | MEM_EXECUTE | MEM_READ: ntoskrnl's POOLCODE section.
SCN_NONPAGED_CODE = 0x68000020

# PROCESSOR_START_BLOCK (WRK amd64.h): Jmp {0xE9, offset}, CompletionFlag = 1 at +4,
# LmTarget at +0x70, ProcessorState.SpecialRegisters.Cr3 at +0xA0.
_LOW_STUB_SIGNATURE = b"\xe9\x4d\x06\x00\x01\x00\x00\x00"


class StructWriter:
    """Writes named fields of a symbol-table type into an address space."""

    def __init__(self, symbols: SymbolTable) -> None:
        self.symbols = symbols

    def put(
        self,
        space: AddressSpace,
        address: int,
        type_name: str,
        values: dict[str, Any],
        optional: bool = False,
    ) -> None:
        """Write ``values`` (dotted field path -> value); ``optional`` skips absent fields.

        The structure's bytes are read once, patched field by field (bitfields merge with
        their neighbours) and written back once.
        """
        fields = []
        for path, value in values.items():
            if optional and not self.symbols.has_field(type_name, path):
                continue
            fields.append((self.symbols.field(type_name, path), value))
        if not fields:
            return
        start = min(f.offset for f, _ in fields)
        end = max(f.offset + f.size for f, _ in fields)
        blob = bytearray(space.read(address + start, end - start))
        for fld, value in fields:
            at = fld.offset - start
            current = bytes(blob[at : at + fld.size]) if fld.type["kind"] == "bitfield" else None
            blob[at : at + fld.size] = self.symbols.encode_type(fld.type, fld.size, value, current)
        space.write(address + start, bytes(blob))

    def list_ring(self, space: AddressSpace, head: int, entries: list[int]) -> None:
        """Link ``entries`` (addresses of _LIST_ENTRY fields) into a ring starting at ``head``."""
        ring = [head, *entries]
        for i, node in enumerate(ring):
            flink = ring[(i + 1) % len(ring)]
            blink = ring[i - 1]
            space.write(node, struct.pack("<QQ", flink, blink))

    def unicode_string(self, space: AddressSpace, address: int, buffer: int, text: str) -> None:
        # surrogatepass: a scenario may name a module with unpaired surrogates (invalid UTF-16).
        data = text.encode("utf-16-le", "surrogatepass")
        space.write(buffer, data + b"\0\0")
        self.put(
            space,
            address,
            "_UNICODE_STRING",
            {"Length": len(data), "MaximumLength": len(data) + 2, "Buffer": buffer},
        )


class Kernel:
    """The System address space and the kernel's own memory."""

    def __init__(self, symbols: SymbolTable, memory: PhysicalMemory, seed: int, build: int) -> None:
        self.symbols = symbols
        self.memory = memory
        self.writer = StructWriter(symbols)
        self.build = build
        rng = random.Random(seed)
        # Windows 10 1607+ randomises the self-map slot; Volatility accepts any in 0x100-0x1FE.
        self.self_ref_index = rng.choice(
            [i for i in range(0x100, 0x1FF) if i not in _USED_PML4_SLOTS]
        )
        self.space = AddressSpace(memory, SYSTEM_PML4_PA, self.self_ref_index)
        self._pool_next = POOL_START
        self._stack_next = STACKS_START
        self._map_kuser_shared_data()
        for region in (PAGED_POOL_START, PFN_DATABASE, HAL_HEAP):
            self.space.ensure(region, PAGE)
        self._write_kernel_image()
        self._write_low_stub()
        if self.symbols.has_symbol("MmProtectToValue"):
            self._write_protect_to_value()
        self._write_version_globals()

    # -- fixed pieces --------------------------------------------------------------------
    def _map_kuser_shared_data(self) -> None:
        self.kuser_pa = self.memory.alloc()
        self.space.map_page(KUSER_SHARED_DATA, self.kuser_pa)
        self.space.map_page(KUSER_SHARED_DATA_USER, self.kuser_pa)
        # _KUSER_SHARED_DATA: NtBuildNumber +0x260, NtMajorVersion +0x26C, NtMinorVersion
        # +0x270 are fixed by the documented layout (Volatility checks +0x26C).
        page = self.memory.page(self.kuser_pa)
        struct.pack_into("<III", page, 0x260, self.build, 0, 0)
        struct.pack_into("<II", page, 0x26C, 10, 0)
        # NtProductType = NtProductWinNt (1): windows.info rejects an out-of-range value.
        self.writer.put(
            self.space, KUSER_SHARED_DATA, "_KUSER_SHARED_DATA", {"NtProductType": 1}, optional=True
        )

    def _write_kernel_image(self) -> None:
        top = max([self.symbols.symbol_rva(n) for n in self.globals_used()] + [0x10000])
        size = (top + 0x10000 + PAGE - 1) & ~(PAGE - 1)
        # The first sections of a real ntoskrnl.exe: .text, then the non-paged POOLCODE code
        # section (MemProcFS recognises the kernel image by that section name).
        image = new_image(
            "ntoskrnl.exe",
            size,
            [(".text", 0x1000, "code"), ("POOLCODE", 0x2000, "code"), (".edata", 0x3000, "rdata")],
        )
        image.section("POOLCODE").characteristics = SCN_NONPAGED_CODE
        image.put("POOLCODE", 0x2000, b"\xc3")
        image.exports = {
            name: self.symbols.symbol_rva(name)
            for name in _KERNEL_EXPORTS
            if self.symbols.has_symbol(name)
        }
        if image.exports:
            image.build_exports(".edata", 0x3000)
        image.dll = False
        image.codeview = (self.symbols.guid, self.symbols.age, self.symbols.pdb_name)
        image.put(".text", 0x1000, b"\x48\x83\xec\x28\xcc")  # KiSystemStartup stand-in
        data = set_image_base(bytes(image), KERNEL_BASE)
        self.space.write(KERNEL_BASE, data[: 4 * PAGE])
        # ntoskrnl is resident as a whole (Windows maps it with 2 MiB large pages); the builder
        # backs only the pages it writes, plus the first page of every 2 MiB of the image, so
        # that a reader scanning back from a kernel address (a crash dump header's
        # PsActiveProcessHead) to the MZ header finds each 2 MiB of the image readable.
        for offset in range(0, size, LARGE_PAGE):
            self.space.ensure(KERNEL_BASE + offset, PAGE)

    def _write_low_stub(self) -> None:
        stub = bytearray(PAGE)
        stub[0:8] = _LOW_STUB_SIGNATURE
        struct.pack_into("<Q", stub, 0x70, KERNEL_BASE + 0x1000)  # LmTarget
        struct.pack_into("<Q", stub, 0xA0, SYSTEM_PML4_PA)  # Cr3
        self.memory.write(LOW_STUB_PA, bytes(stub))

    def _write_protect_to_value(self) -> None:
        # MmProtectToValue: the 32 PAGE_* values that MMVAD_FLAGS.Protection indexes
        # (base protections, then NOCACHE 0x200, GUARD 0x100 and WRITECOMBINE 0x400 forms).
        base = [0x01, 0x02, 0x10, 0x20, 0x04, 0x08, 0x40, 0x80]
        values = (
            base
            + [0x01]
            + [v | 0x200 for v in base[1:]]
            + [0x01]
            + [v | 0x100 for v in base[1:]]
            + [0x01]
            + [v | 0x400 for v in base[1:]]
        )
        self.space.write(self.symbol_address("MmProtectToValue"), struct.pack("<32I", *values))

    def _write_version_globals(self) -> None:
        """What windows.info reads: KdVersionBlock, KeNumberProcessors, KUSER_SHARED_DATA.

        KdDebuggerDataBlock is left zeroed (no 'KDBG' OwnerTag), as on systems where the
        block is encoded; windows.info then skips the lines it would take from it.
        """
        sym, w = self.symbols, self.writer
        if sym.has_symbol("KdVersionBlock") and sym.has_type("_DBGKD_GET_VERSION64"):
            # _DBGKD_GET_VERSION64: MajorVersion 0xF (free build), MinorVersion = build.
            w.put(
                self.space,
                self.symbol_address("KdVersionBlock"),
                "_DBGKD_GET_VERSION64",
                {
                    "MajorVersion": 0xF,
                    "MinorVersion": self.build,
                    "MachineType": 0x8664,
                    "KernBase": KERNEL_BASE,
                    "PsLoadedModuleList": 0,
                    "MaxStateChange": 3,
                    "MaxManipulate": 0x33,
                },
                optional=True,
            )
        if sym.has_symbol("KeNumberProcessors"):
            self.space.write(self.symbol_address("KeNumberProcessors"), struct.pack("<I", 2))
        if sym.has_symbol("KdDebuggerDataBlock"):
            self.space.ensure(self.symbol_address("KdDebuggerDataBlock"), 0x400)
        w.put(
            self.space,
            KUSER_SHARED_DATA,
            "_KUSER_SHARED_DATA",
            {
                "SystemTime.LowPart": 0x2B5E6000,
                "SystemTime.High1Time": 0x01DA9B87,
                "SystemTime.High2Time": 0x01DA9B87,
                "NtSystemRoot": "C:\\Windows".encode("utf-16-le"),
            },
            optional=True,
        )

    def globals_used(self) -> list[str]:
        names = ["PsActiveProcessHead"]
        for name in (
            "PsInitialSystemProcess",
            "KeUserCallbackDispatcher",
            "PsNtdllExports",
            "MmProtectToValue",
            "KdVersionBlock",
            "KeNumberProcessors",
            "KdDebuggerDataBlock",
        ):
            if self.symbols.has_symbol(name):
                names.append(name)
        return names

    def symbol_address(self, name: str) -> int:
        return KERNEL_BASE + self.symbols.symbol_rva(name)

    def write_system_process(self, eprocess: int) -> None:
        """PsInitialSystemProcess: the System EPROCESS, as the kernel sets it at phase 0."""
        if self.symbols.has_symbol("PsInitialSystemProcess"):
            self.space.write(
                self.symbol_address("PsInitialSystemProcess"), struct.pack("<Q", eprocess)
            )

    def write_dispatcher_globals(self, dispatcher: int, dispatcher_return: int) -> None:
        """Where KeUserModeCallback finds ntdll!KiUserCallbackDispatcher (callback-machinery.md)."""
        if self.symbols.has_symbol("KeUserCallbackDispatcher"):
            self.space.write(
                self.symbol_address("KeUserCallbackDispatcher"), struct.pack("<Q", dispatcher)
            )
        if self.symbols.has_symbol("PsNtdllExports") and self.symbols.has_type("_PS_NTDLL_EXPORTS"):
            self.writer.put(
                self.space,
                self.symbol_address("PsNtdllExports"),
                "_PS_NTDLL_EXPORTS",
                {
                    "KiUserCallbackDispatcher": dispatcher,
                    "KiUserCallbackDispatcherReturn": dispatcher_return,
                },
                optional=True,
            )

    # -- allocation ------------------------------------------------------------------------
    def pool(self, size: int, tag: bytes) -> int:
        """A pool block: a 16-byte _POOL_HEADER (PoolTag at +4) then the 16-byte aligned body."""
        header = self._pool_next
        body = header + 16
        self._pool_next = (body + size + 15) & ~15
        block_size = (size + 16 + 15) // 16
        self.space.write(header, struct.pack("<HH4sQ", 0, block_size & 0xFF, tag[:4], 0))
        self.space.ensure(body, size)
        return body

    def pool_object(self, type_name: str, tag: bytes) -> int:
        return self.pool(self.symbols.size(type_name), tag)

    @property
    def stack_cursor(self) -> int:
        """Where the next kernel stack will start (everything below is handed out)."""
        return self._stack_next

    def kernel_stack(self) -> tuple[int, int]:
        """A fresh kernel stack: (StackBase, StackLimit); pages appear as they are written."""
        limit = self._stack_next + PAGE  # one unmapped guard page below, as Windows leaves
        base = limit + KERNEL_STACK_SIZE
        self._stack_next = base
        return base, limit

    def new_process_space(self) -> AddressSpace:
        space = AddressSpace(
            self.memory, self.memory.alloc(), self.self_ref_index, kernel=self.space
        )
        space.map_page(KUSER_SHARED_DATA_USER, self.kuser_pa)
        return space
