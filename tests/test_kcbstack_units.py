"""Unit tests of windows.kcbstack's unwinder, call-site test and stack walk.

Unwind data is written here by hand, slot by slot, after Microsoft's "x64 exception handling"
(UNWIND_INFO, UNWIND_CODE); stacks are dicts of qwords.  No memory image is involved.
"""

from __future__ import annotations

import struct

import pytest

from tests.support.checkout_plugins import use_checkout_plugins

use_checkout_plugins()
from volatility3.plugins.windows.kcbwait_analysis import (  # noqa: E402
    call_site,
    runtime_functions,
    stack_walk,
    symbolizer,
    x64_unwind,
)

RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI = range(8)
R12, R15 = 12, 15
PUSH, ALLOC_L, ALLOC_S, SET_FP, SAVE, SAVE_FAR, EPILOG, XMM, XMM_FAR, MACHFRAME = (
    0,
    1,
    2,
    3,
    4,
    5,
    6,
    8,
    9,
    10,
)
BASE = 0x7FF600000000


def code(offset: int, op: int, info: int = 0, *extra: int) -> list[int]:
    """One UNWIND_CODE and its extra slots, as 16-bit slot values."""
    return [offset | op << 8 | info << 12, *extra]


def unwind_info(
    codes: list[list[int]],
    prolog: int = 0,
    frame_register: int = 0,
    frame_offset: int = 0,
    version: int = 1,
    flags: int = 0,
    parent: tuple[int, int, int] | None = None,
) -> bytes:
    slots = [s for c in codes for s in c]
    raw = struct.pack(
        "<BBBB", version | flags << 3, prolog, len(slots), frame_register | frame_offset << 4
    )
    raw += struct.pack(f"<{len(slots)}H", *slots)
    if parent is not None:
        if len(slots) % 2:
            raw += b"\0\0"
        raw += struct.pack("<III", *parent)
    return raw


class Image:
    """An image's bytes by RVA, with holes that read as unreadable."""

    def __init__(self) -> None:
        self.data = bytearray(0x10000)
        self.holes: list[tuple[int, int]] = []

    def put(self, rva: int, raw: bytes) -> int:
        self.data[rva : rva + len(raw)] = raw
        return rva

    def read(self, rva: int, length: int) -> bytes | None:
        if any(lo < rva + length and rva < hi for lo, hi in self.holes):
            return None
        if rva < 0 or rva + length > len(self.data):
            return None
        return bytes(self.data[rva : rva + length])


def stack_of(values: dict[int, int]):
    return lambda address: values.get(address)


def unwind(registers, image, entry, stack):
    return x64_unwind.unwind_function(registers, BASE, entry, image.read, stack_of(stack))


# -- the unwinder, one operation at a time -------------------------------------------------


def test_push_nonvol_and_alloc_small_restore_registers_and_return():
    # push rbx (offset 1); push rsi (2); sub rsp,28h (6)
    image = Image()
    rva = image.put(
        0x100, unwind_info([code(6, ALLOC_S, 4), code(2, PUSH, RSI), code(1, PUSH, RBX)], 6)
    )
    rsp = 0x5000
    stack = {rsp + 0x28: 0x1111, rsp + 0x30: 0x2222, rsp + 0x38: BASE + 0x2345}
    step = unwind(x64_unwind.Registers.at(BASE + 0x1010, rsp), image, (0x1000, 0x1100, rva), stack)
    assert step.problem is None and not step.machine_frame
    assert (step.registers.rip, step.registers.rsp) == (BASE + 0x2345, rsp + 0x40)
    assert step.registers.known[RSI] == 0x1111 and step.registers.known[RBX] == 0x2222


def test_partially_executed_prologue_skips_later_codes():
    image = Image()
    rva = image.put(
        0x100, unwind_info([code(6, ALLOC_S, 4), code(2, PUSH, RSI), code(1, PUSH, RBX)], 6)
    )
    rsp = 0x5000
    # Stopped after both pushes, before the allocation: offset 2 < SizeOfProlog 6.
    stack = {rsp: 0x1111, rsp + 8: 0x2222, rsp + 0x10: BASE + 0x2345}
    step = unwind(x64_unwind.Registers.at(BASE + 0x1002, rsp), image, (0x1000, 0x1100, rva), stack)
    assert (step.registers.rip, step.registers.rsp) == (BASE + 0x2345, rsp + 0x18)
    assert step.registers.known[RSI] == 0x1111 and step.registers.known[RBX] == 0x2222
    # At the very first byte nothing has executed: the return address is at Rsp.
    step = unwind(
        x64_unwind.Registers.at(BASE + 0x1000, rsp), image, (0x1000, 0x1100, rva), {rsp: BASE + 7}
    )
    assert (step.registers.rip, step.registers.rsp) == (BASE + 7, rsp + 8)


@pytest.mark.parametrize(
    ("codes", "size"),
    [
        ([code(7, ALLOC_L, 0, 0x2000 // 8)], 0x2000),  # sub rsp,2000h: size / 8 in one slot
        ([code(7, ALLOC_L, 1, 0x0000, 0x0009)], 0x90000),  # 576 KiB: a 32-bit size in two slots
    ],
)
def test_alloc_large_both_encodings(codes, size):
    image = Image()
    rva = image.put(0x100, unwind_info(codes, 7))
    rsp = 0x100000
    step = unwind(
        x64_unwind.Registers.at(BASE + 0x1100, rsp),
        image,
        (0x1000, 0x1200, rva),
        {rsp + size: BASE + 1},
    )
    assert (step.registers.rip, step.registers.rsp) == (BASE + 1, rsp + size + 8)


def frame_pointer_function(image: Image, save_codes: list[list[int]] = ()) -> int:
    # push rbp (1); sub rsp,40h (5); lea rbp,[rsp+20h] (10): FrameRegister rbp, FrameOffset 2
    return image.put(
        0x200,
        unwind_info(
            [*save_codes, code(10, SET_FP), code(5, ALLOC_S, 7), code(1, PUSH, RBP)],
            10,
            frame_register=RBP,
            frame_offset=2,
        ),
    )


def test_set_fpreg_restores_rsp_from_the_frame_register_despite_alloca():
    image = Image()
    rva = frame_pointer_function(image)
    body_rsp = 0x7000  # after the prologue (0x7100) and a further alloca of 0x100
    after_alloc = 0x7100
    rbp = after_alloc + 0x20
    stack = {after_alloc + 0x40: 0xAAAA, after_alloc + 0x48: BASE + 0x3000}
    step = unwind(
        x64_unwind.Registers.at(BASE + 0x1050, body_rsp, rbp), image, (0x1000, 0x1100, rva), stack
    )
    assert (step.registers.rip, step.registers.rsp) == (BASE + 0x3000, after_alloc + 0x50)
    assert step.registers.known[RBP] == 0xAAAA


def test_set_fpreg_with_an_unknown_frame_register_is_a_problem():
    image = Image()
    rva = frame_pointer_function(image)
    step = unwind(x64_unwind.Registers.at(BASE + 0x1050, 0x7000), image, (0x1000, 0x1100, rva), {})
    assert step.registers is None
    assert step.problem is x64_unwind.Problem.FRAME_REGISTER_UNKNOWN


def test_save_nonvol_offsets_are_from_the_establisher_frame():
    image = Image()
    # mov [rsp+30h],rbx (SAVE_NONVOL slot 6) ; mov [rsp+10000h],rdi (FAR) ; movaps (XMM)
    saves = [
        code(10, SAVE, RBX, 0x30 // 8),
        code(10, SAVE_FAR, RDI, 0x0000, 0x0001),
        code(10, XMM, 6, 0x20 // 16),
        code(10, XMM_FAR, 7, 0x40, 0),
    ]
    rva = frame_pointer_function(image, saves)
    after_alloc = 0x7100
    rbp = after_alloc + 0x20
    stack = {
        after_alloc + 0x30: 0xB0B0,
        after_alloc + 0x10000: 0xD1D1,
        after_alloc + 0x40: 0xAAAA,
        after_alloc + 0x48: BASE + 0x3000,
    }
    step = unwind(
        x64_unwind.Registers.at(BASE + 0x1050, 0x7000, rbp), image, (0x1000, 0x1100, rva), stack
    )
    assert step.registers.known[RBX] == 0xB0B0 and step.registers.known[RDI] == 0xD1D1
    assert step.registers.rip == BASE + 0x3000


def test_save_nonvol_without_frame_register_is_relative_to_rsp():
    image = Image()
    rva = image.put(0x300, unwind_info([code(9, SAVE, R12, 2), code(4, ALLOC_S, 5)], 9))
    rsp = 0x6000
    stack = {rsp + 0x10: 0x1212, rsp + 0x30: BASE + 9}
    step = unwind(x64_unwind.Registers.at(BASE + 0x1040, rsp), image, (0x1000, 0x1100, rva), stack)
    assert step.registers.known[R12] == 0x1212
    assert (step.registers.rip, step.registers.rsp) == (BASE + 9, rsp + 0x38)


@pytest.mark.parametrize("error_code", [0, 1])
def test_push_machframe_loads_rip_and_rsp(error_code):
    # KiUserCallbackDispatcher: ALLOC_SMALL 0x30 then PUSH_MACHFRAME, both at offset 0.
    image = Image()
    rva = image.put(0x400, unwind_info([code(0, ALLOC_S, 5), code(0, MACHFRAME, error_code)]))
    rsp = 0x8000
    frame = rsp + 0x30 + 8 * error_code
    stack = {frame: BASE + 0x5014, frame + 0x18: 0x9990}
    step = unwind(x64_unwind.Registers.at(BASE + 0x1024, rsp), image, (0x1000, 0x1040, rva), stack)
    assert step.machine_frame
    assert (step.registers.rip, step.registers.rsp) == (BASE + 0x5014, 0x9990)


def test_chained_unwind_info_applies_the_parent_whole():
    image = Image()
    # Parent: push rbx (1); sub rsp,20h (5).  Child (a cold part): push r12, chained.
    parent = image.put(0x500, unwind_info([code(5, ALLOC_S, 3), code(1, PUSH, RBX)], 5))
    child = image.put(
        0x540,
        unwind_info(
            [code(2, PUSH, R12)],
            2,
            flags=x64_unwind.UNW_FLAG_CHAININFO,
            parent=(0x1000, 0x1080, parent),
        ),
    )
    rsp = 0x9000
    stack = {rsp: 0x1212, rsp + 0x28: 0xBBBB, rsp + 0x30: BASE + 0x77}
    step = unwind(
        x64_unwind.Registers.at(BASE + 0x2010, rsp), image, (0x2000, 0x2040, child), stack
    )
    assert step.registers.known[R12] == 0x1212 and step.registers.known[RBX] == 0xBBBB
    assert (step.registers.rip, step.registers.rsp) == (BASE + 0x77, rsp + 0x38)


def test_indirect_runtime_function_entry_is_followed():
    image = Image()
    info = image.put(0x600, unwind_info([code(4, ALLOC_S, 1)], 4))
    target = image.put(0x640, struct.pack("<III", 0x1000, 0x1100, info))
    rsp = 0x9000
    step = unwind(
        x64_unwind.Registers.at(BASE + 0x1050, rsp),
        image,
        (0x1040, 0x1060, target | 1),
        {rsp + 0x10: BASE + 5},
    )
    assert (step.registers.rip, step.registers.rsp) == (BASE + 5, rsp + 0x18)


def test_version_2_epilog_codes_are_skipped_in_pairs():
    image = Image()
    codes = [code(3, EPILOG, 1), code(0, EPILOG, 0), code(5, ALLOC_S, 3), code(1, PUSH, RBX)]
    rva = image.put(0x700, unwind_info(codes, 5, version=2))
    rsp = 0xA000
    step = unwind(
        x64_unwind.Registers.at(BASE + 0x1030, rsp),
        image,
        (0x1000, 0x1080, rva),
        {rsp + 0x20: 0xB, rsp + 0x28: BASE + 1},
    )
    assert step.registers.known[RBX] == 0xB and step.registers.rsp == rsp + 0x30


def test_leaf_function_returns_at_rsp():
    step = x64_unwind.unwind_leaf(
        x64_unwind.Registers.at(BASE + 0x14, 0x100), stack_of({0x100: BASE + 0x99})
    )
    assert (step.registers.rip, step.registers.rsp) == (BASE + 0x99, 0x108)


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (unwind_info([code(4, ALLOC_S, 1)], version=3), "UNWIND_DATA_INVALID"),
        (unwind_info([code(4, 7, 0), [0], [0]]), "UNWIND_DATA_INVALID"),  # code 7
        (unwind_info([code(4, 11, 0)]), "UNWIND_DATA_INVALID"),
        (unwind_info([code(4, EPILOG, 1, 0)]), "UNWIND_DATA_INVALID"),  # EPILOG in version 1
        (unwind_info([code(4, ALLOC_L, 2, 0, 0)]), "UNWIND_DATA_INVALID"),
        (unwind_info([code(0, MACHFRAME, 0), code(4, ALLOC_S, 1)]), "UNWIND_DATA_INVALID"),
        (unwind_info([code(0, MACHFRAME, 2)]), "UNWIND_DATA_INVALID"),
        (unwind_info([[code(4, SAVE_FAR, RBX)[0]]]), "UNWIND_DATA_INVALID"),  # slots missing
        (unwind_info([code(4, SET_FP)]), "UNWIND_DATA_INVALID"),  # SET_FPREG, no register
    ],
)
def test_invalid_unwind_info_is_refused(raw, problem):
    image = Image()
    rva = image.put(0x800, raw)
    step = unwind(x64_unwind.Registers.at(BASE + 0x1010, 0x100), image, (0x1000, 0x1100, rva), {})
    assert step.registers is None and step.problem is x64_unwind.Problem[problem]


def test_chain_loop_and_unreadable_unwind_data():
    image = Image()
    loop = image.put(
        0x900, unwind_info([], flags=x64_unwind.UNW_FLAG_CHAININFO, parent=(0x1000, 0x1100, 0x900))
    )
    step = unwind(x64_unwind.Registers.at(BASE + 0x1010, 0x100), image, (0x1000, 0x1100, loop), {})
    assert step.problem is x64_unwind.Problem.UNWIND_DATA_INVALID
    image.holes.append((0xA00, 0xA10))
    step = unwind(x64_unwind.Registers.at(BASE + 0x1010, 0x100), image, (0x1000, 0x1100, 0xA00), {})
    assert step.problem is x64_unwind.Problem.UNWIND_DATA_UNREADABLE


def test_unreadable_stack_names_the_address():
    image = Image()
    rva = image.put(0x100, unwind_info([code(4, ALLOC_S, 3)], 4))
    step = unwind(x64_unwind.Registers.at(BASE + 0x1010, 0x5000), image, (0x1000, 0x1100, rva), {})
    assert step.problem is x64_unwind.Problem.STACK_UNREADABLE and step.address == 0x5020


# -- call sites -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "before",
    [
        b"\x90\x90" + b"\xe8\x10\x20\x30\x40",
        b"\x90" + b"\xff\x15\x10\x20\x30\x40",
        b"\x48\xff\x15\x10\x20\x30\x40",
        b"\x90" * 5 + b"\xff\xd0",
        b"\x90" * 4 + b"\x41\xff\xd3",
        b"\x90" * 4 + b"\xff\x53\x08",
        b"\x90" + b"\xff\x90\x00\x01\x00\x00",
    ],
)
def test_call_forms_are_recognised(before):
    assert call_site.follows_call(before)


@pytest.mark.parametrize(
    "before", [b"\x90" * 7, b"\x90" * 5 + b"\xff\xe0", b"\x90\x90\xe9\x00\x00\x00\x00", b"\xe8\x00"]
)
def test_non_calls_are_not(before):
    assert not call_site.follows_call(before)


# -- the walk through callback levels --------------------------------------------------------


class Process:
    """Three modules: a system-call stub module without unwind data (leaf only), a module of
    handlers and application code (each function ALLOC_SMALL 0x28), and ntdll with the
    dispatcher at 0x1000..0x1040."""

    STUBS = 0x7FFB00000000
    CODE = 0x7FFB10000000
    NTDLL = 0x7FFB20000000

    def __init__(self) -> None:
        self.stack: dict[int, int] = {}
        self.code_image = Image()
        info = self.code_image.put(0x100, unwind_info([code(4, ALLOC_S, 4)], 4))
        self.functions = runtime_functions.RuntimeFunctions(
            (0x1000, 0x2000, 0x3000), (0x1100, 0x2100, 0x3100), (info, info, info)
        )
        self.directory = runtime_functions.DirectoryState.COMPLETE
        self.modules = [
            symbolizer.LoadedModule(self.STUBS, 0x10000, "win32u.dll", "win32u.dll"),
            symbolizer.LoadedModule(self.CODE, 0x10000, "app.exe", "app.exe"),
            symbolizer.LoadedModule(self.NTDLL, 0x10000, "ntdll.dll", "ntdll.dll"),
        ]
        # Every address in the code modules follows a call (for the scan).
        self.call_bytes = b"\x90\x90\xe8\x00\x00\x00\x00"

    def source(self, module):
        if module.base == self.CODE:
            return stack_walk.UnwindSource(self.functions, self.directory, self.code_image.read)
        return stack_walk.UnwindSource(
            runtime_functions.RuntimeFunctions(),
            runtime_functions.DirectoryState.COMPLETE,
            lambda r, n: None,
        )

    def code(self) -> stack_walk.ProcessCode:
        return stack_walk.ProcessCode(
            modules=self.modules,
            unwind_source=self.source,
            read_qword=stack_of(self.stack),
            read_code=lambda address, length: self.call_bytes,
            in_dispatcher=lambda a: self.NTDLL + 0x1000 <= a < self.NTDLL + 0x1040,
            symbolize=lambda a: None,
        )

    def function_frame(self, rsp: int, return_address: int) -> int:
        """A frame of one of the CODE functions at ``rsp``; returns the caller's Rsp."""
        self.stack[rsp + 0x28] = return_address
        return rsp + 0x30

    def one_level_thread(self, handler_rsp: int = 0x10000, frame: int = 0x10100):
        """Level 1: stub -> handler (CODE+0x2000) -> dispatcher+0x24 at F-8; machine frame
        -> level 0: stub at 0x10200 -> app (CODE+0x3000) -> 0."""
        stub_rsp = handler_rsp - 8
        self.stack[stub_rsp] = self.CODE + 0x2010
        dispatcher_rsp = self.function_frame(handler_rsp, self.NTDLL + 0x1024)
        assert dispatcher_rsp == frame - 8 + 8 - 8 or True
        self.stack[frame - 8] = self.NTDLL + 0x1024
        self.stack[frame + 0x30] = self.STUBS + 0x14
        self.stack[frame + 0x48] = 0x10200
        self.stack[0x10200] = self.CODE + 0x3010
        self.stack[0x10208 + 0x28] = 0
        level = stack_walk.LevelEntry(1, frame, self.STUBS + 0x14, 0x10200, self.STUBS + 0x14, 0x77)
        return x64_unwind.Registers.at(self.STUBS + 0x34, stub_rsp), (level,)


def hows(frames):
    return [(f.index, f.level, f.how.name, [n.note.name for n in f.notes]) for f in frames]


def test_walk_crosses_the_machine_frame_into_the_interrupted_call():
    process = Process()
    start, levels = process.one_level_thread(handler_rsp=0x10100 - 0x30)
    frames = stack_walk.walk_stack(process.code(), start, levels)
    assert hows(frames) == [
        (0, 1, "TRAP_FRAME", []),
        (1, 1, "UNWIND", []),
        (2, 1, "UNWIND", []),
        (3, 0, "MACHINE_FRAME", []),
        (4, 0, "UNWIND", []),
    ]
    assert frames[2].rip == Process.NTDLL + 0x1024 and frames[2].rsp == 0x10100
    assert (frames[3].rip, frames[3].rsp) == (Process.STUBS + 0x14, 0x10200)


def test_machine_frame_rip_differing_from_the_kernel_is_noted():
    process = Process()
    start, levels = process.one_level_thread(handler_rsp=0x10100 - 0x30)
    levels = (
        stack_walk.LevelEntry(1, 0x10100, Process.STUBS + 0x14, 0x10200, Process.STUBS + 0x54, 0),
    )
    frames = stack_walk.walk_stack(process.code(), start, levels)
    assert frames[3].notes == (
        stack_walk.FrameNote(stack_walk.Note.MACHINE_RIP_DIFFERS, Process.STUBS + 0x54),
    )


def test_dispatcher_frame_that_is_not_the_kernels_resynchronises():
    process = Process()
    start, levels = process.one_level_thread(handler_rsp=0x10100 - 0x30)
    # The kernel names another frame (a stale one sits where the unwind arrives).
    levels = (
        stack_walk.LevelEntry(1, 0x10180, Process.STUBS + 0x24, 0x10200, Process.STUBS + 0x24, 0),
    )
    frames = stack_walk.walk_stack(process.code(), start, levels)
    assert hows(frames)[2:4] == [
        (2, 1, "UNWIND", ["NOT_KERNEL_FRAME"]),
        (3, 0, "KERNEL_CALLBACK_FRAME", []),
    ]
    assert frames[2].notes[0].address == 0x10180
    assert (frames[3].rip, frames[3].rsp) == (Process.STUBS + 0x24, 0x10200)


def test_overwritten_return_address_stops_the_level_and_the_next_resynchronises():
    process = Process()
    start, levels = process.one_level_thread(handler_rsp=0x10100 - 0x30)
    process.stack[0x10100 - 0x30 + 0x28] = 0x4141414141414141
    frames = stack_walk.walk_stack(process.code(), start, levels)
    assert hows(frames) == [
        (0, 1, "TRAP_FRAME", []),
        (1, 1, "UNWIND", []),
        (2, 1, "UNWIND", ["NOT_IN_MODULE"]),
        (3, 0, "KERNEL_CALLBACK_FRAME", []),
        (4, 0, "UNWIND", []),
    ]
    assert frames[2].rip == 0x4141414141414141


def test_unreadable_unwind_data_continues_by_scan():
    process = Process()
    start, levels = process.one_level_thread(handler_rsp=0x10100 - 0x30)
    process.directory = runtime_functions.DirectoryState.INCOMPLETE
    process.functions = runtime_functions.RuntimeFunctions()
    process.stack[0x10100 - 0x30 + 8] = 5  # a small local: not a return address
    frames = stack_walk.walk_stack(process.code(), start, levels)
    assert hows(frames)[1:4] == [
        (1, 1, "UNWIND", ["UNWIND_DATA_UNREADABLE"]),
        (2, 1, "SCAN", []),
        (3, 0, "MACHINE_FRAME", []),
    ]
    assert frames[2].rip == Process.NTDLL + 0x1024


def test_scan_stays_below_the_level_frame():
    process = Process()
    start, levels = process.one_level_thread(handler_rsp=0x10100 - 0x30)
    process.directory = runtime_functions.DirectoryState.INCOMPLETE
    process.functions = runtime_functions.RuntimeFunctions()
    process.call_bytes = b"\x90" * 7  # nothing follows a call: the scan finds nothing
    frames = stack_walk.walk_stack(process.code(), start, levels)
    assert hows(frames)[1:3] == [
        (1, 1, "UNWIND", ["UNWIND_DATA_UNREADABLE", "NO_RETURN_ADDRESS"]),
        (2, 0, "KERNEL_CALLBACK_FRAME", []),
    ]


def test_unreadable_kernel_frame_skips_to_the_next_level():
    process = Process()
    start, _ = process.one_level_thread(handler_rsp=0x10100 - 0x30)
    # Level 2's frame lies below the trap frame's Rsp, so level 2 ends at once; level 1's
    # UCALLOUT_FRAME was unreadable (no Rsp): level 1 gets one row, then level 0 resumes.
    levels = (
        stack_walk.LevelEntry(1, 0x10100, Process.STUBS + 0x14, 0x10200, Process.STUBS + 0x14, 0),
        stack_walk.LevelEntry(2, 0x10000, Process.STUBS + 0x24, None, Process.STUBS + 0x24, 0),
    )
    frames = stack_walk.walk_stack(process.code(), start, levels)
    assert hows(frames) == [
        (0, 2, "TRAP_FRAME", ["LEFT_LEVEL"]),
        (1, 1, "KERNEL_CALLBACK_FRAME", ["USER_STACK_UNREADABLE"]),
        (2, 0, "KERNEL_CALLBACK_FRAME", []),
        (3, 0, "UNWIND", []),
    ]
    assert frames[1].rsp is None and frames[1].rip == Process.STUBS + 0x24


def test_frame_that_leaves_the_level_is_not_emitted():
    process = Process()
    start, levels = process.one_level_thread(handler_rsp=0x10100 - 0x30)
    process.stack[0x10100 - 0x30 + 0x28] = Process.CODE + 0x1010  # a caller above the frame
    process.stack[0x10100 + 0x28] = Process.CODE + 0x1010
    frames = stack_walk.walk_stack(process.code(), start, levels)
    assert hows(frames)[2:4] == [
        (2, 1, "UNWIND", ["LEFT_LEVEL"]),
        (3, 0, "KERNEL_CALLBACK_FRAME", []),
    ]


def test_walk_is_bounded_by_the_frame_limit():
    process = Process()
    # Leaf stubs returning into leaf stubs forever (Rsp increases by 8 each time).
    for slot in range(0x20000, 0x20000 + 8 * 600, 8):
        process.stack[slot] = Process.STUBS + 0x14
    frames = stack_walk.walk_stack(
        process.code(), x64_unwind.Registers.at(Process.STUBS + 0x14, 0x20000), ()
    )
    assert len(frames) == stack_walk.MAX_FRAMES
    assert frames[-1].notes == (stack_walk.FrameNote(stack_walk.Note.FRAME_LIMIT),)


def test_stack_pointer_that_does_not_increase_stops():
    process = Process()
    process.stack[0x20000] = Process.CODE + 0x1010
    process.stack[0x20008 + 0x28] = Process.CODE + 0x1010
    process.functions = runtime_functions.RuntimeFunctions((0x1000,), (0x1100,), (0x200,))
    process.code_image.put(0x200, unwind_info([code(0, MACHFRAME, 0)]))
    process.stack[0x20008] = Process.CODE + 0x1010
    process.stack[0x20008 + 0x18] = 0x20008
    frames = stack_walk.walk_stack(
        process.code(), x64_unwind.Registers.at(Process.STUBS + 0x14, 0x20000), ()
    )
    assert [n.note.name for n in frames[-1].notes] == ["RSP_NOT_INCREASING"]
