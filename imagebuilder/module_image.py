"""A built PE image as it is mapped at its base, with the facts the truth file needs."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from imagebuilder.pe_image import PeImage, set_image_base


@dataclass
class ModuleImage:
    name: str
    path: str
    base: int
    data: bytes
    exports: dict[str, int]  # name -> RVA
    export_dir: tuple[int, int] = (0, 0)  # RVA, size
    # RVA, size: pages a process gets its own copy of (the callback table a hijack rewrites)
    data_section: tuple[int, int] = (0, 0)
    extras: dict[str, int] = field(default_factory=dict)
    export_layout: dict[str, Any] = field(default_factory=dict)  # PeImage.export_layout
    pdata: tuple[int, int] = (0, 0)  # RVA, size of the exception directory
    # Exports the builder places on purpose (the rest are filler for a real export count); the
    # truth file's inventory lists only these.  Empty: all exports.
    notable: frozenset[str] = frozenset()
    # user32: callback handler RVA -> RVA just after its `call [__imp_NtCallbackReturn]`, the
    # return address on the stack of a thread resting in NtCallbackReturn called from there.
    handler_returns: dict[int, int] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.data)

    def address(self, export: str) -> int:
        return self.base + self.exports[export]

    def contains(self, address: int) -> bool:
        return self.base <= address < self.base + self.size

    def inventory_exports(self) -> dict[str, int]:
        """Name -> address of the notable exports (all when none are marked)."""
        names = [n for n in self.exports if not self.notable or n in self.notable]
        return {n: self.base + self.exports[n] for n in names}

    @cached_property
    def _export_index(self) -> tuple[list[int], list[str]]:
        """Distinct export RVAs ascending, each with its alphabetically first name."""
        first: dict[int, str] = {}
        for name, rva in self.exports.items():
            if rva not in first or name < first[rva]:
                first[rva] = name
        rvas = sorted(first)
        return rvas, [first[r] for r in rvas]

    def nearest_export(self, rva: int) -> tuple[int, str] | None:
        """(RVA, name) of the export at or nearest below ``rva``; the alphabetically first
        name where several share an address."""
        rvas, names = self._export_index
        index = bisect.bisect_right(rvas, rva) - 1
        return (rvas[index], names[index]) if index >= 0 else None


def mapped(img: PeImage, path: str, base: int, **facts: Any) -> ModuleImage:
    """The built image as it is mapped at ``base``, with its export facts."""
    return ModuleImage(
        img.name,
        path,
        base,
        set_image_base(bytes(img), base),
        img.exports,
        export_dir=(img.export_rva, img.export_size),
        export_layout=img.export_layout,
        pdata=(img.pdata_rva, 12 * len(img.pdata)) if img.pdata else (0, 0),
        **facts,
    )
