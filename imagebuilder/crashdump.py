"""Windows 64-bit complete memory dump (``PAGEDU64``, DumpType 1) of a built image.

Layout of _DUMP_HEADER64 (0x2000 bytes; offsets as in Volatility's crash64.json and the
public DbgEng documentation): Signature 'PAGE' +0, ValidDump 'DU64' +4, MajorVersion +8,
MinorVersion +0xC, DirectoryTableBase +0x10, PfnDataBase +0x18, PsLoadedModuleList +0x20,
PsActiveProcessHead +0x28, MachineImageType +0x30, NumberProcessors +0x34, BugCheckCode +0x38,
KdDebuggerDataBlock +0x80, PhysicalMemoryBlockBuffer +0x88 (NumberOfRuns ULONG, NumberOfPages
ULONG64 at +0x90, runs of {BasePage, PageCount} from +0x98), DumpType +0xF98,
RequiredDumpSpace +0xFA0, SystemTime +0xFA8.  Page data follows the header, run after run.

The runs are the machine's physical memory map, as Windows writes them: conventional memory
below 640 KiB (page 0 and the legacy hole 0xA0000-0xFFFFF left out), then everything from
1 MiB up.  Readers hold few runs (LeechCore, and so MemProcFS, refuses more than 32), so a
complete dump never lists the used pages one run each.  Zero pages are written as holes of a
sparse file, so the dump costs the disk what the raw image costs.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import TYPE_CHECKING

from imagebuilder.memory import PAGE

if TYPE_CHECKING:
    from imagebuilder.build import BuiltImage

HEADER_SIZE = 0x2000
_RUNS_OFFSET = 0x98
_MAX_RUNS = 32  # _PHYSICAL_MEMORY_MAX_RUNS as dump readers (LeechCore) size the array
_LOW_MEMORY = (1, 0x9F)  # pages 0x1000-0x9FFFF: conventional memory, the real-mode IVT page out
_HIGH_MEMORY_PFN = 0x100  # 1 MiB


def physical_runs(pfns: list[int], max_runs: int = _MAX_RUNS) -> list[tuple[int, int]]:
    """Runs (first pfn, count) covering ``pfns``; the smallest gaps are filled if too many."""
    runs: list[list[int]] = []
    for pfn in sorted(pfns):
        if runs and runs[-1][0] + runs[-1][1] == pfn:
            runs[-1][1] += 1
        else:
            runs.append([pfn, 1])
    while len(runs) > max_runs:
        gaps = [(runs[i + 1][0] - (runs[i][0] + runs[i][1]), i) for i in range(len(runs) - 1)]
        _, i = min(gaps)
        runs[i][1] = runs[i + 1][0] + runs[i + 1][1] - runs[i][0]
        del runs[i + 1]
    return [(a, b) for a, b in runs]


def memory_map(size: int, pfns: list[int]) -> list[tuple[int, int]]:
    """The physical memory runs of a machine with ``size`` bytes of RAM: [1, 0x9F] and
    1 MiB up; runs over the used pages (merged to at most 32) if some lie outside it."""
    runs = [_LOW_MEMORY, (_HIGH_MEMORY_PFN, size // PAGE - _HIGH_MEMORY_PFN)]
    low_end = _LOW_MEMORY[0] + _LOW_MEMORY[1]
    if all(_LOW_MEMORY[0] <= pfn < low_end or pfn >= _HIGH_MEMORY_PFN for pfn in pfns):
        return runs
    return physical_runs(pfns)


def write_crash_dump(path: Path, image: BuiltImage) -> None:
    memory = image.memory
    runs = memory_map(memory.size, list(memory.pages))
    total = sum(count for _, count in runs)
    header = bytearray(HEADER_SIZE)
    # Unused header space holds the 'PAGE' fill pattern, as Windows writes it.
    header[:] = b"PAGE" * (HEADER_SIZE // 4)
    kernel = image.kernel
    struct.pack_into("<4s4sII", header, 0, b"PAGE", b"DU64", 15, kernel.build)
    struct.pack_into(
        "<QQQQ", header, 0x10, kernel.space.pml4, 0, 0, kernel.symbol_address("PsActiveProcessHead")
    )
    struct.pack_into("<IIII", header, 0x30, 0x8664, 2, 0xE2, 0)  # MANUALLY_INITIATED_CRASH
    struct.pack_into("<QQQQ", header, 0x40, 0, 0, 0, 0)
    struct.pack_into("<Q", header, 0x80, 0)
    struct.pack_into("<IIQ", header, 0x88, len(runs), 0, total)
    for i, (base, count) in enumerate(runs):
        struct.pack_into("<QQ", header, _RUNS_OFFSET + 16 * i, base, count)
    struct.pack_into("<IIQQ", header, 0xF98, 1, 0, HEADER_SIZE + total * PAGE, 0)
    zero = bytes(PAGE)
    with open(path, "wb") as handle:
        handle.write(header)
        handle.truncate(HEADER_SIZE + total * PAGE)
        offset = HEADER_SIZE
        for base, count in runs:
            for pfn in sorted(p for p in memory.pages if base <= p < base + count):
                page = memory.pages[pfn]
                if page != zero:
                    handle.seek(offset + (pfn - base) * PAGE)
                    handle.write(bytes(page))
            offset += count * PAGE
