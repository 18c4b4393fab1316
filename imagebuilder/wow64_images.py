"""The images only a WoW64 process maps (../shared/docs/real-binaries.md, last section).

- ``wow64win.dll`` (64-bit, \\Windows\\System32): the 64-bit PEB.KernelCallbackTable of a WoW64
  process points at its own table of callback thunks (``whcbfn*`` routines, which switch to the
  32-bit side and run the 32-bit user32's handler), a run of relocated pointers into its .text
  in the read-only .rdata, as user32's own table is.  None of the thunks is exported.
- ``user32.dll`` and ``ntdll.dll`` (32-bit PE32 images, \\Windows\\SysWOW64): the 32-bit PEB's
  KernelCallbackTable points at the 32-bit user32's table of 4-byte pointers in its .rdata.
wow64.dll and wow64cpu.dll are plain modules (user_modules.build_plain).
"""

from __future__ import annotations

import random
import struct

from imagebuilder.image_plan import ImagePlan
from imagebuilder.module_image import ModuleImage, mapped
from imagebuilder.pe32_image import SCN_CODE, SCN_DATA, SCN_RDATA, Section32, pe32_image
from imagebuilder.pe_image import PAGE, page_up
from imagebuilder.user32_image import handler_routines
from imagebuilder.x64_code import Abs64, ordinary_routine

WOW64WIN_BASE = 0x7FFB_9D40_0000
WOW64WIN_PATH = r"\Windows\System32\wow64win.dll"
USER32_32_BASE = 0x7559_0000
USER32_32_PATH = r"\Windows\SysWOW64\user32.dll"
NTDLL_32_BASE = 0x7771_0000
NTDLL_32_PATH = r"\Windows\SysWOW64\ntdll.dll"
_INTERNAL_ROUTINES = 160
# mov edi,edi; push ebp; mov ebp,esp: the hot-patchable x86 prologue of Microsoft's DLLs.
_X86_PROLOGUE = b"\x8b\xff\x55\x8b\xec"
_X86_BODY = (
    b"\x8b\x45\x08",  # mov eax, [ebp+8]
    b"\x8b\x4d\x0c",  # mov ecx, [ebp+0Ch]
    b"\x33\xc0",  # xor eax, eax
    b"\x85\xc9",  # test ecx, ecx
    b"\x50",  # push eax
    b"\x58",  # pop eax
)
_X86_EPILOGUE = b"\x5d\xc2\x08\x00"  # pop ebp; ret 8


def build_wow64win(table_size: int) -> ModuleImage:
    rng = random.Random(0x5764)
    plan = ImagePlan("wow64win.dll", WOW64WIN_BASE)
    internal = [f"internal#{i}" for i in range(_INTERNAL_ROUTINES)]
    callees = tuple(internal[:32])
    routine_of = handler_routines(table_size, rng)
    thunks = [f"whcbfn#{i}" for i in range(max(routine_of) + 1)]
    plan.section(".text", "code")
    half = len(internal) // 2
    for name in internal[:half]:
        plan.routine(name, ordinary_routine(rng, callees))
    for name in thunks:
        plan.routine(name, ordinary_routine(rng, callees))
    for name in internal[half:]:
        plan.routine(name, ordinary_routine(rng, callees))
    plan.section(".rdata", "rdata")
    plan.unwind_infos()
    table = plan.place(
        tuple(Abs64(thunks[routine_of[api]]) for api in range(table_size)), "callback thunks", PAGE
    )
    plan.align(PAGE)  # a process that rewrites the table gets private copies of these pages
    plan.section(".data", "data")
    plan.reserve(0x100, "data")
    plan.section(".pdata", "rdata")
    plan.exception_directory()
    plan.section(".reloc", "rdata")
    plan.base_relocations()
    return mapped(
        plan.link(),
        WOW64WIN_PATH,
        WOW64WIN_BASE,
        data_section=(table, 8 * table_size),
        extras={"callback_table": table},
    )


def _x86_routine(rng: random.Random) -> bytes:
    body = b"".join(rng.choice(_X86_BODY) for _ in range(rng.randint(1, 6)))
    code = _X86_PROLOGUE + body + _X86_EPILOGUE
    return code + b"\xcc" * (-len(code) % 16)


def build_user32_32(table_size: int) -> ModuleImage:
    """The 32-bit user32: handler routines in .text, their table (4-byte pointers, then a zero
    entry) at the start of .rdata, a writable .data."""
    rng = random.Random(0x3232)
    routine_of = handler_routines(table_size, rng)
    text = bytearray()
    starts = []
    for _ in range(max(routine_of) + 1):
        text += _x86_routine(rng)  # an internal routine between handlers
        starts.append(len(text))
        text += _x86_routine(rng)
    text_rva = PAGE
    rdata_rva = text_rva + page_up(len(text))
    table = b"".join(
        struct.pack("<I", USER32_32_BASE + text_rva + starts[routine_of[api]])
        for api in range(table_size)
    )
    table += b"\0" * 4
    data_rva = rdata_rva + page_up(len(table))
    sections = [
        Section32(".text", text_rva, bytes(text), SCN_CODE),
        Section32(".rdata", rdata_rva, table, SCN_RDATA),
        Section32(".data", data_rva, b"\0" * 0x100, SCN_DATA),
    ]
    return ModuleImage(
        "user32.dll",
        USER32_32_PATH,
        USER32_32_BASE,
        pe32_image(sections, USER32_32_BASE),
        {},
        data_section=(rdata_rva, 4 * table_size),
        extras={"callback_table": rdata_rva},
    )


def build_ntdll_32() -> ModuleImage:
    rng = random.Random(0x3264)
    text = b"".join(_x86_routine(rng) for _ in range(64))
    sections = [
        Section32(".text", PAGE, text, SCN_CODE),
        Section32(".rdata", PAGE + page_up(len(text)), b"\0" * 0x100, SCN_RDATA),
    ]
    image = pe32_image(sections, NTDLL_32_BASE)
    return ModuleImage("ntdll.dll", NTDLL_32_PATH, NTDLL_32_BASE, image, {})
