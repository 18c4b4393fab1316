"""Private memory of a process that no module maps: where hijacked callback-table entries,
table copies and instrumentation callbacks point.

Each kind is one private VadS (``_MMVAD_SHORT``, PrivateMemory 1) created on first use, 64 KiB,
with the protection an investigator tells apart: PAGE_READWRITE (``private``) or
PAGE_EXECUTE_READWRITE (``private_rwx``, what injected code usually gets).  The ``32`` kinds lie
below 4 GiB, where a WoW64 process's 32-bit table entries can point.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from imagebuilder.process_layout import (
    MM_EXECUTE_READWRITE,
    MM_READWRITE,
    PRIVATE_MEMORY,
    ProcessLayout,
    Vad,
)

REGION_SIZE = 0x10000
SLOT = 0x100  # allocations are this far apart (a table copy takes as many slots as it needs)
REGIONS = {  # kind -> (base, MMVAD_FLAGS.Protection)
    "private": (PRIVATE_MEMORY, MM_READWRITE),
    "private_rwx": (PRIVATE_MEMORY + 0x10_0000_0000, MM_EXECUTE_READWRITE),
    "private32": (0x0510_0000, MM_READWRITE),
    "private_rwx32": (0x0520_0000, MM_EXECUTE_READWRITE),
}
# What a hijacked entry or an instrumentation callback points at: `sub rsp,48h; int3`.
PAYLOAD = b"\x48\x83\xec\x48\xcc"


@dataclass
class PrivateMemory:
    layout: ProcessLayout
    _next: dict[str, int] = field(default_factory=dict)

    def alloc(self, kind: str, data: bytes = PAYLOAD) -> int:
        """Writes ``data`` at the next free slot of region ``kind`` and returns its address."""
        base, protection = REGIONS[kind]
        if kind not in self._next:
            self._next[kind] = base
            self.layout.vads.append(Vad(base, base + REGION_SIZE - 1, protection=protection))
        address = self._next[kind]
        size = -(-max(len(data), 1) // SLOT) * SLOT
        if address + size > base + REGION_SIZE:
            raise ValueError(f"process {self.layout.pid}: {kind} memory exhausted")
        self._next[kind] = address + size
        self.layout.space.write(address, data)
        return address
