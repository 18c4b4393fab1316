"""The 32-bit side of a WoW64 process, as on a real machine.

EPROCESS.WoW64Process names an _EWOW64PROCESS whose Peb is the 32-bit PEB (_PEB32, below
4 GiB; executive.write_eprocess writes both).  Its KernelCallbackTable (a ULONG at +0x2C)
points at the table of the 32-bit user32.dll, a PE32 image mapped from \\Windows\\SysWOW64
beside the 32-bit ntdll.dll.  The 32-bit loader lists are left out: the 32-bit user32 is found
by its image VAD's file name (docs/output-contract.md, "Table").
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from imagebuilder.kernel_layout import Kernel
from imagebuilder.module_image import ModuleImage
from imagebuilder.private_memory import PrivateMemory
from imagebuilder.process_layout import WOW64_PEB32, ModuleMapper, ProcessLayout, Vad
from imagebuilder.table_layout import override_entries, owner_table
from imagebuilder.wow64_images import build_ntdll_32, build_user32_32

PEB32_SPAN = 0x1000  # the page the 32-bit PEB sits on (its own private VAD)


@dataclass(frozen=True)
class Wow64Side:
    peb32: int
    table: int  # _PEB32.KernelCallbackTable as written
    user32: ModuleImage
    images: tuple[ModuleImage, ...]  # the 32-bit images mapped, in load order


@lru_cache(maxsize=8)
def _images(table_size: int) -> tuple[ModuleImage, ModuleImage]:
    return build_ntdll_32(), build_user32_32(table_size)


def lay_out_wow64_side(
    kernel: Kernel,
    mapper: ModuleMapper,
    layout: ProcessLayout,
    private: PrivateMemory,
    table_size: int,
    overrides32: dict[int, str],
) -> Wow64Side:
    ntdll32, user32 = _images(table_size)
    for module in (ntdll32, user32):
        # The table pages of the 32-bit user32 are the process's own (its entries may be
        # rewritten), as for the 64-bit owner.
        mapper.map(layout.space, module, private_data=module is user32)
        layout.vads.append(Vad(module.base, module.base + module.size - 1, module))
    table = owner_table(user32)
    override_entries(layout, private, table, overrides32, bits=32)
    layout.space.write(WOW64_PEB32, bytes(PEB32_SPAN))
    kernel.writer.put(layout.space, WOW64_PEB32, "_PEB32", {"KernelCallbackTable": table})
    layout.vads.append(Vad(WOW64_PEB32, WOW64_PEB32 + PEB32_SPAN - 1))
    return Wow64Side(WOW64_PEB32, table, user32, (ntdll32, user32))
