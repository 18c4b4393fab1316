"""Unit tests of windows.kcbwait's pure analysis logic: bytes and addresses in, verdicts out.

No memory image is involved: stacks are dicts of pages, PE images are built here byte by byte,
and the kernel module is a tiny stand-in exposing ``object``/``get_type`` like Volatility's.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

# Volatility imports plugins as volatility3.plugins.<relpath>; make the checkout's plugin
# directory the first place that namespace looks (ahead of any installed copy).
PLUGIN_DIR = str(Path(__file__).resolve().parents[1] / "volatility_plugins")
import volatility3.plugins  # noqa: E402

if PLUGIN_DIR not in volatility3.plugins.__path__:
    volatility3.plugins.__path__.insert(0, PLUGIN_DIR)
import volatility3.plugins.windows  # noqa: E402

WINDOWS_DIR = str(Path(PLUGIN_DIR) / "windows")
if WINDOWS_DIR not in volatility3.plugins.windows.__path__:
    volatility3.plugins.windows.__path__.insert(0, WINDOWS_DIR)
for _name in [m for m in sys.modules if m.startswith("volatility3.plugins.windows.kcbwait")]:
    del sys.modules[_name]

from volatility3.plugins.windows.kcbwait_analysis import (  # noqa: E402
    callback_levels,
    findings,
    kernel_callout,
    memory,
    ntdll_exports,
    pdb_names,
    pe_exports,
    runtime_functions,
    symbolizer,
    trap_frame,
    user_callout,
    wording,
)

PAGE = memory.PAGE_SIZE


# ----------------------------------------------------------------------------- PE images


def build_pe(
    exports: dict[str, int],
    forwarders: dict[str, str] | None = None,
    pdata: list[tuple[int, int, int]] | None = None,
    image_size: int = 0x5000,
) -> bytes:
    """A memory-layout x64 DLL: headers, exports at RVA 0x2000, .pdata at RVA 0x3000."""
    forwarders = forwarders or {}
    image = bytearray(image_size)
    image[0:2] = b"MZ"
    struct.pack_into("<I", image, 0x3C, 0x80)
    image[0x80:0x84] = b"PE\0\0"
    # IMAGE_FILE_HEADER: Machine, NumberOfSections, ..., SizeOfOptionalHeader, Characteristics
    struct.pack_into("<HHIIIHH", image, 0x84, 0x8664, 1, 0, 0, 0, 0xF0, 0x2022)
    opt = 0x98
    struct.pack_into("<H", image, opt, 0x20B)
    struct.pack_into("<Q", image, opt + 24, 0x180000000)
    struct.pack_into("<II", image, opt + 32, 0x1000, 0x200)
    struct.pack_into("<II", image, opt + 56, image_size, 0x400)
    struct.pack_into("<I", image, opt + 108, 16)
    export_rva, names_area = 0x2000, 0x2200
    entries = sorted(list(exports.items()) + list(forwarders.items()))
    functions_rva = export_rva + 0x40
    names_rva = functions_rva + 4 * len(entries)
    ordinals_rva = names_rva + 4 * len(entries)
    cursor = names_area
    for index, (name, target) in enumerate(entries):
        name_rva = cursor
        image[cursor : cursor + len(name) + 1] = name.encode() + b"\0"
        cursor += len(name) + 1
        if isinstance(target, str):
            function_rva = cursor
            image[cursor : cursor + len(target) + 1] = target.encode() + b"\0"
            cursor += len(target) + 1
        else:
            function_rva = target
        struct.pack_into("<I", image, functions_rva + 4 * index, function_rva)
        struct.pack_into("<I", image, names_rva + 4 * index, name_rva)
        struct.pack_into("<H", image, ordinals_rva + 2 * index, index)
    export_size = cursor - export_rva
    struct.pack_into(
        "<IIHHIIIIIII",
        image,
        export_rva,
        0,
        0,
        0,
        0,
        names_area,
        1,
        len(entries),
        len(entries),
        functions_rva,
        names_rva,
        ordinals_rva,
    )
    struct.pack_into("<II", image, opt + 112, export_rva, export_size)
    pdata = pdata or []
    for index, (begin, end, unwind) in enumerate(pdata):
        struct.pack_into("<III", image, 0x3000 + 12 * index, begin, end, unwind)
    struct.pack_into("<II", image, opt + 112 + 3 * 8, 0x3000 if pdata else 0, 12 * len(pdata))
    # One section header (.text) so the image looks ordinary; its file layout is irrelevant.
    section = opt + 0xF0
    image[section : section + 8] = b".text\0\0\0"
    struct.pack_into("<IIII", image, section + 8, image_size - 0x1000, 0x1000, 0x400, 0x400)
    return bytes(image)


BASE = 0x7FFB_0000_0000


def parse_exports(image: bytes) -> pe_exports.ModuleExports:
    """Parses ``image``'s export directory as read_module_exports does after reading it."""
    headers = pe_exports.parse_headers(image[:PAGE])
    assert headers is not None
    rva, size = headers.export.rva, headers.export.size
    return pe_exports.parse_export_directory(
        image[rva : rva + size], rva, headers.size_of_image, BASE
    )


def test_parse_export_directory_reads_names_addresses_and_skips_forwarders():
    image = build_pe(
        {"NtCallbackReturn": 0x1100, "ZwCallbackReturn": 0x1100, "NtClose": 0x1120},
        forwarders={"RtlForwarded": "other.Function"},
    )
    exports = parse_exports(image)
    assert exports.address_of("NtClose") == BASE + 0x1120
    assert exports.address_of("ZwCallbackReturn") == BASE + 0x1100
    assert exports.address_of("RtlForwarded") is None
    # One name per address: the alphabetically first.
    assert exports.addresses == (BASE + 0x1100, BASE + 0x1120)
    assert exports.names == ("NtCallbackReturn", "NtClose")


def test_parse_headers_finds_export_and_exception_directories():
    image = build_pe({"A": 0x1000}, pdata=[(0x1000, 0x1010, 0x4000)])
    headers = pe_exports.parse_headers(image[:PAGE])
    assert headers is not None
    assert headers.size_of_image == 0x5000
    assert headers.export.rva == 0x2000
    assert (headers.exception.rva, headers.exception.size) == (0x3000, 12)
    assert pe_exports.parse_headers(b"\0" * PAGE) is None


def test_module_exports_neighbours():
    exports = pe_exports.ModuleExports.from_pairs(0, [("b", 0x20), ("a", 0x10), ("c", 0x40)])
    assert exports.nearest_at_or_below(0x10) == (0x10, "a")
    assert exports.nearest_at_or_below(0x3F) == (0x20, "b")
    assert exports.nearest_at_or_below(0x0F) is None
    assert exports.next_above(0x10) == 0x20
    assert exports.next_above(0x40) is None


# ----------------------------------------------------------------------------- ntdll facts


def test_callback_return_ranges_stop_at_next_export_or_0x20():
    exports = pe_exports.ModuleExports.from_pairs(
        BASE,
        [
            ("NtCallbackReturn", BASE + 0x100),
            ("ZwCallbackReturn", BASE + 0x100),
            ("NtClose", BASE + 0x110),
        ],
    )
    assert ntdll_exports.callback_return_ranges(exports) == ((BASE + 0x100, BASE + 0x110),)
    lonely = pe_exports.ModuleExports.from_pairs(BASE, [("NtCallbackReturn", BASE + 0x100)])
    ranges = ntdll_exports.callback_return_ranges(lonely)
    assert ranges == ((BASE + 0x100, BASE + 0x120),)
    assert ntdll_exports.address_in_ranges(BASE + 0x114, ranges)
    assert not ntdll_exports.address_in_ranges(BASE + 0x120, ranges)


def test_dispatcher_range_from_runtime_function_else_fallback():
    pdata = struct.pack("<III", 0x1000, 0x1050, 0x9000) + struct.pack("<III", 0x2000, 0x2080, 0)
    assert ntdll_exports.find_runtime_function(pdata, 0x2010) == (0x2000, 0x2080)
    assert ntdll_exports.find_runtime_function(pdata, 0x1050) is None
    assert ntdll_exports.dispatcher_function_range(BASE + 0x2001, BASE, pdata) == (
        BASE + 0x2000,
        BASE + 0x2080,
    )
    assert ntdll_exports.dispatcher_function_range(BASE + 0x3000, BASE, pdata) == (
        BASE + 0x3000,
        BASE + 0x3000 + ntdll_exports.DISPATCHER_FALLBACK_SIZE,
    )


def test_build_facts_prefers_kernel_dispatcher_inside_the_image():
    exports = pe_exports.ModuleExports.from_pairs(
        BASE, [("KiUserCallbackDispatcher", BASE + 0x500), ("NtCallbackReturn", BASE + 0x600)]
    )
    facts = ntdll_exports.build_facts(BASE, 0x10000, exports, None, BASE + 0x510)
    assert facts.dispatcher == BASE + 0x510
    # A kernel value outside this ntdll (another boot's base) loses to the export.
    facts = ntdll_exports.build_facts(BASE, 0x10000, exports, None, 0x1234)
    assert facts.dispatcher == BASE + 0x500
    assert facts.callback_return_ranges == ((BASE + 0x600, BASE + 0x620),)
    facts = ntdll_exports.build_facts(None, 0, None, None, None)
    assert facts.dispatcher is None and facts.dispatcher_range is None


# ----------------------------------------------------------------------------- symbols

USER32 = symbolizer.LoadedModule(0x7FFA_0000_0000, 0x10000, "USER32.dll", r"C:\w\user32.dll")


def unwind_image(chains: dict[int, tuple[int, int, int]] | None = None):
    """An unwind-data reader over a fake image: the UNWIND_INFO at each RVA in ``chains`` has
    UNW_FLAG_CHAININFO and 3 codes (padded to 4) before its parent RUNTIME_FUNCTION; zero bytes
    elsewhere read as UNWIND_INFO without flags."""
    image = bytearray(0x10000)
    for rva, parent in (chains or {}).items():
        image[rva : rva + 4] = bytes([1 | (runtime_functions.UNW_FLAG_CHAININFO << 3), 4, 3, 0])
        struct.pack_into("<III", image, rva + 4 + 2 * 4, *parent)

    def read(rva, length):
        if not 0 <= rva <= len(image) - length:
            return None
        return bytes(image[rva : rva + length])

    return read


def user32_symbols(pdata=(), chains=None, names=None):
    """USER32 with one export at +0x1000 (or ``names``) and RUNTIME_FUNCTIONs ``pdata``."""
    names = names or [("DispatchMessageW", 0x1000)]
    packed = b"".join(struct.pack("<III", *entry) for entry in pdata)
    return symbolizer.ModuleSymbols(
        pe_exports.ModuleExports.from_pairs(USER32.base, [(n, USER32.base + r) for n, r in names]),
        runtime_functions.RuntimeFunctions.parse(packed),
        unwind_image(chains),
    )


@pytest.mark.parametrize(
    "offset, expected",
    [
        (0x1000, "USER32.dll!DispatchMessageW"),
        (0x1014, "USER32.dll!DispatchMessageW+0x14"),
        (0x10FF, "USER32.dll!DispatchMessageW+0xff"),
        # An unexported routine right after the export's function is not the export.
        (0x1100, "USER32.dll+0x1100"),
        (0x1180, "USER32.dll+0x1180"),
        (0x0800, "USER32.dll+0x800"),
    ],
)
def test_names_get_offsets_only_inside_their_function(offset, expected):
    symbols = user32_symbols(pdata=[(0x1000, 0x1100, 0x8000), (0x1100, 0x1200, 0x8010)])
    assert symbolizer.format_symbol(USER32, symbols, USER32.base + offset) == expected


def test_chained_parts_belong_to_their_primary_function():
    # 0x3000-0x3040 is a cold part of the function at 0x1000 (its UNWIND_INFO chains back).
    pdata = [(0x1000, 0x1100, 0x8000), (0x3000, 0x3040, 0x8100)]
    chained = user32_symbols(pdata, chains={0x8100: (0x1000, 0x1100, 0x8000)})
    assert symbolizer.format_symbol(USER32, chained, USER32.base + 0x3010) == (
        "USER32.dll!DispatchMessageW+0x2010"
    )
    unchained = user32_symbols(pdata)
    assert symbolizer.format_symbol(USER32, unchained, USER32.base + 0x3010) == "USER32.dll+0x3010"
    # A chain that loops back on itself ends where it started, without hanging.
    looping = user32_symbols(pdata, chains={0x8100: (0x3000, 0x3040, 0x8100)})
    assert symbolizer.format_symbol(USER32, looping, USER32.base + 0x3010) == "USER32.dll+0x3010"


def test_leaf_routines_without_unwind_data_span_at_most_their_stub():
    names = [("NtClose", 0x2000), ("NtOpenFile", 0x2020), ("RtlBig", 0x3000)]
    symbols = user32_symbols(names=names)  # no .pdata at all (or unreadable)
    fmt = symbolizer.format_symbol
    assert fmt(USER32, symbols, USER32.base + 0x2014) == "USER32.dll!NtClose+0x14"
    assert fmt(USER32, symbols, USER32.base + 0x2020) == "USER32.dll!NtOpenFile"
    assert fmt(USER32, symbols, USER32.base + 0x3020) == "USER32.dll+0x3020"
    # A leaf name next to an address inside a RUNTIME_FUNCTION: different functions.
    mixed = user32_symbols(pdata=[(0x2010, 0x2040, 0x8000)], names=names)
    assert fmt(USER32, mixed, USER32.base + 0x2014) == "USER32.dll+0x2014"


def test_symbolizer_without_names_or_module():
    empty = symbolizer.ModuleSymbols(None, runtime_functions.RuntimeFunctions(), unwind_image())
    assert symbolizer.format_symbol(USER32, empty, USER32.base + 0x1014) == "USER32.dll+0x1014"
    requested = []

    def provider(module):
        requested.append(module.name)
        return user32_symbols(pdata=[(0x1000, 0x1100, 0x8000)])

    sym = symbolizer.Symbolizer([USER32], provider)
    assert sym.symbolize(0x1000) is None
    assert sym.symbolize(None) is None
    assert requested == []  # names are loaded only for a module that contains the address
    assert sym.symbolize(USER32.base + 0x1002) == "USER32.dll!DispatchMessageW+0x2"


def test_codeview_records():
    guid = bytes(range(16))
    record = b"RSDS" + guid + struct.pack("<I", 2) + b"C:\\build\\x64\\Hook.pdb\0junk"
    codeview = pdb_names.parse_rsds(record)
    assert codeview == pdb_names.CodeView("Hook.pdb", "030201000504070608090A0B0C0D0E0F", 2)
    assert pdb_names.parse_rsds(b"NB10" + bytes(30)) is None
    assert pdb_names.parse_rsds(b"RSDS" + guid + struct.pack("<I", 0) + b"x.pdb\0") is None
    assert pdb_names.parse_rsds(b"RSDS" + guid) is None


# ----------------------------------------------------------------------------- user stack

DISPATCHER = (BASE + 0x9000, BASE + 0x9060)
STACK_LOW, STACK_HIGH = 0x5000_0000, 0x5001_0000
BOUNDS = user_callout.StackBounds(STACK_LOW, STACK_HIGH)


def is_return(value):
    return DISPATCHER[0] <= value < DISPATCHER[1]


class FakeStack:
    """A user stack: writable bytes over [STACK_LOW, STACK_HIGH), some pages unreadable."""

    def __init__(self):
        self.data = bytearray(STACK_HIGH - STACK_LOW)
        self.unreadable_pages: set[int] = set()

    def qword(self, address, value):
        struct.pack_into("<Q", self.data, address - STACK_LOW, value)

    def frame(self, address, *, rip, rsp, length, api, return_address=DISPATCHER[0] + 0x24):
        """Lays out a UCALLOUT_FRAME at ``address`` the way KeUserModeCallback does."""
        self.qword(address - 8, return_address)
        struct.pack_into("<QII", self.data, address - STACK_LOW + 0x20, address + 0x58, length, api)
        self.qword(address + 0x30, rip)
        self.qword(address + 0x38, 0x33)
        self.qword(address + 0x48, rsp)

    def page(self, address):
        if address in self.unreadable_pages or not STACK_LOW <= address < STACK_HIGH:
            return None
        offset = address - STACK_LOW
        return bytes(self.data[offset : offset + PAGE])

    def reader(self, max_pages=512):
        return memory.PagedReader(self.page, max_pages)


def callout_frame_address(rsp, length):
    """callback-machinery.md: (Rsp - (align16(InputLength) + 0x58)) & ~0xF."""
    return (rsp - (((length + 15) & ~15) + 0x58)) & ~0xF


def nested_stack():
    """Two nested callbacks, each level's frame on its own page.

    The thread's syscall at Rsp 0x5000F808 was interrupted by level 1 (frame on page 0x5000F000);
    level 1's handler made a syscall at 0x5000E100, interrupted by level 2 (page 0x5000E000);
    level 2's handler is now in a syscall at 0x5000DF00 (page 0x5000D000).
    """
    stack = FakeStack()
    frame1 = callout_frame_address(0x5000_F808, 48)
    stack.frame(frame1, rip=0x7FF0_1014, rsp=0x5000_F808, length=48, api=2)
    frame2 = callout_frame_address(0x5000_E100, 24)
    stack.frame(frame2, rip=0x7FF0_2014, rsp=0x5000_E100, length=24, api=17)
    return stack, 0x5000_DF00, frame1, frame2


def test_scan_finds_nested_frames_outermost_first():
    stack, current_rsp, frame1, frame2 = nested_stack()
    assert (frame1, frame2) == (0x5000_F780, 0x5000_E080)
    result = user_callout.scan_callout_frames(stack.reader(), current_rsp, BOUNDS, is_return)
    assert [f.address for f in result.frames] == [frame1, frame2]
    assert not result.unreadable
    outer, inner = result.frames
    assert (outer.api_number, outer.length, outer.rip, outer.rsp, outer.buffer) == (
        2,
        48,
        0x7FF0_1014,
        0x5000_F808,
        frame1 + 0x58,
    )
    assert (inner.api_number, inner.length, inner.rip, inner.rsp) == (
        17,
        24,
        0x7FF0_2014,
        0x5000_E100,
    )
    assert (inner.seg_cs, inner.return_address) == (0x33, DISPATCHER[0] + 0x24)


def test_scan_skips_what_is_not_a_frame_and_starts_where_told():
    stack, current_rsp, frame1, frame2 = nested_stack()
    # A stale frame below the start (already popped) is not found when the scan starts at Rsp...
    stale = current_rsp - 0x100
    stack.frame(stale, rip=1, rsp=current_rsp + 0x40, length=8, api=1)
    # ... a dispatcher-looking qword whose "frame" would hold input past its Rsp is rejected ...
    bogus = current_rsp + 0x40
    stack.frame(bogus, rip=1, rsp=bogus + 0x60, length=0x100, api=1)
    # ... and so is a misaligned candidate.
    stack.qword(current_rsp + 0x10, DISPATCHER[0] + 4)
    result = user_callout.scan_callout_frames(stack.reader(), current_rsp, BOUNDS, is_return)
    assert [f.address for f in result.frames] == [frame1, frame2]
    # From StackLimit (the swapped-out case: no trap frame Rsp), the stale frame comes first
    # and chains into the live ones: three frames for two levels.
    result = user_callout.scan_callout_frames(stack.reader(), STACK_LOW, BOUNDS, is_return)
    assert [f.address for f in result.frames] == [frame1, frame2, stale]


def test_scan_page_budget_and_unreadable_pages():
    stack, current_rsp, frame1, _frame2 = nested_stack()
    stack.unreadable_pages.add(0x5000_E000)  # hides level 2's frame
    result = user_callout.scan_callout_frames(stack.reader(), current_rsp, BOUNDS, is_return)
    assert result.unreadable
    assert [f.address for f in result.frames] == [frame1]
    stack.unreadable_pages.clear()
    # One page of budget: the scan stops quietly after the page it started on.
    result = user_callout.scan_callout_frames(stack.reader(1), current_rsp, BOUNDS, is_return)
    assert result.frames == () and not result.unreadable


def test_ucallout_frame_structure():
    def frame(address, length, rsp):
        return user_callout.UcalloutFrame(address, DISPATCHER[0], 0, length, 0, 0, 0, 0, rsp, 0)

    top = STACK_HIGH
    assert user_callout.is_ucallout_frame(frame(0x5000_1000, 0x10, 0x5000_1068), top)
    assert not user_callout.is_ucallout_frame(frame(0x5000_1008, 0x10, 0x5000_1068), top)
    assert not user_callout.is_ucallout_frame(frame(0x5000_1000, 0x11, 0x5000_1068), top)
    assert not user_callout.is_ucallout_frame(frame(0x5000_1000, 0, STACK_HIGH + 8), top)
    assert user_callout.is_ucallout_frame(frame(0x5000_1000, 0, STACK_HIGH + 8), None)
    assert not user_callout.is_ucallout_frame(frame(0x5000_1000, 0xFFFFFFFF, 0x5000_2000), None)


def test_read_frame_keeps_an_unreadable_return_slot_apart():
    stack, _rsp, frame1, _frame2 = nested_stack()
    frame = user_callout.read_frame(stack.reader(), frame1)
    assert frame.address == frame1 and frame.return_address == DISPATCHER[0] + 0x24
    stack.frame(0x5000_3000, rip=5, rsp=0x5000_3100, length=0, api=1)
    stack.unreadable_pages.add(0x5000_2000)
    frame = user_callout.read_frame(stack.reader(), 0x5000_3000)
    assert frame.rip == 5 and frame.return_address is None
    assert user_callout.read_frame(stack.reader(), 0x5000_2000) is None


def test_teb_limits():
    assert user_callout.teb_problems(None, 0x5000_1000) == (findings.Unreadable.TEB, None)
    assert user_callout.teb_problems((STACK_HIGH, STACK_LOW), None) == (
        None,
        findings.Invalid.STACK_BOUNDS,
    )
    assert user_callout.teb_problems((1, 1 << 48), None)[1] is findings.Invalid.STACK_BOUNDS
    assert user_callout.teb_problems((STACK_LOW, STACK_HIGH), STACK_HIGH)[1] is (
        findings.Invalid.RSP_OUTSIDE_STACK
    )
    assert user_callout.teb_problems((STACK_LOW, STACK_HIGH), STACK_LOW) == (None, None)
    assert user_callout.usable_bounds((STACK_LOW, STACK_HIGH)) == BOUNDS
    assert user_callout.usable_bounds((STACK_HIGH, STACK_LOW)) is None


def test_paged_reader_spans_pages_and_respects_its_budget():
    pages = {0: bytes(range(256)) * 16, PAGE: b"\xaa" * PAGE}
    reader = memory.PagedReader(pages.get, max_pages=2)
    assert reader.read(PAGE - 2, 4) == bytes([254, 255, 0xAA, 0xAA])
    assert reader.read(3 * PAGE, 8) is None
    assert reader.exhausted and not reader.unreadable


# ----------------------------------------------------------------------------- kernel side


class FakeKernel:
    """Stands in for a Volatility kernel module: objects are looked up by (type, address)."""

    def __init__(self, objects, trap_frame_size=0x190):
        self._objects = objects
        self._size = trap_frame_size

    def object(self, object_type, offset, absolute=False):
        assert absolute
        try:
            return self._objects[(object_type, offset)]
        except KeyError:
            from volatility3.framework import exceptions

            raise exceptions.InvalidAddressException("kernel", offset, "unmapped") from None

    def get_type(self, name):
        assert name == "_KTRAP_FRAME"
        return SimpleNamespace(size=self._size)


def stack_control(previous_initial, previous_kernel_stack=0, expansion=False, base=None):
    """A _KSTACK_CONTROL at the top of a stack segment (segment n's StackBase is n + 0x30 here,
    so that Previous.StackBase names the segment Previous.InitialStack leads to)."""
    return SimpleNamespace(
        StackExpansion=int(expansion),
        has_member=lambda name: name == "StackExpansion",
        StackBase=base,
        Previous=SimpleNamespace(
            InitialStack=previous_initial,
            KernelStack=previous_kernel_stack,
            StackBase=previous_initial + 0x30 if previous_initial else 0,
        ),
    )


BASE_STACK, LEVEL1_STACK, EXPANSION_STACK, LEVEL2_STACK = (
    0xFFFF_A000,
    0xFFFF_B000,
    0xFFFF_C000,
    0xFFFF_D000,
)


def kernel_with_two_callouts(kcallout2_trap=None, drop=()):
    """A thread in two nested callbacks whose level-2 stack sits behind an expansion segment;
    T(0).Rsp and T(1).Rsp name the frames of nested_stack()."""
    objects = {
        ("_KSTACK_CONTROL", LEVEL2_STACK): stack_control(EXPANSION_STACK, 0xFFFF_CE00),
        ("_KSTACK_CONTROL", EXPANSION_STACK): stack_control(LEVEL1_STACK, 0, expansion=True),
        ("_KSTACK_CONTROL", LEVEL1_STACK): stack_control(BASE_STACK, 0xFFFF_AD00),
        ("_KSTACK_CONTROL", BASE_STACK): stack_control(0),
        ("_KTRAP_FRAME", BASE_STACK - 0x190): SimpleNamespace(
            Rip=0x7FF0_1014, Rsp=0x5000_F780, SegCs=0x33
        ),
        ("_KTRAP_FRAME", LEVEL1_STACK - 0x190): SimpleNamespace(
            Rip=0x7FF0_2014, Rsp=0x5000_E080, SegCs=0x33
        ),
        ("_KTRAP_FRAME", LEVEL2_STACK - 0x190): SimpleNamespace(
            Rip=0x7FF0_3014, Rsp=0x5000_DF00, SegCs=0x33
        ),
        ("_KEXCEPTION_FRAME", 0xFFFF_AD00): SimpleNamespace(TrapFrame=BASE_STACK - 0x190),
        ("_KEXCEPTION_FRAME", 0xFFFF_CE00): SimpleNamespace(
            TrapFrame=kcallout2_trap if kcallout2_trap is not None else LEVEL1_STACK - 0x190
        ),
    }
    for (kind, address), control in objects.items():
        if kind == "_KSTACK_CONTROL":
            control.StackBase = address + 0x30
    for key in drop:
        del objects[key]
    return FakeKernel(objects)


def levels_of(kernel, stack, bounds=BOUNDS):
    kernel_stack = kernel_callout.read_kernel_stack(kernel, LEVEL2_STACK, True)
    reader = stack.reader()
    return [
        callback_levels.level_from_kernel(
            level,
            user_callout.read_frame(reader, level.trap_frame.rsp) if level.trap_frame else None,
            bounds,
            is_return,
        )
        for level in kernel_stack.levels
    ]


def test_kernel_stack_walk_skips_expansions_and_names_every_trap_frame():
    kernel = kernel_with_two_callouts()
    stack = kernel_callout.read_kernel_stack(kernel, LEVEL2_STACK, True)
    assert stack.status is findings.KernelStackStatus.READABLE
    assert stack.current_trap_frame == LEVEL2_STACK - 0x190
    assert [lv.level for lv in stack.levels] == [1, 2]
    assert [lv.caller_trap_frame for lv in stack.levels] == [
        BASE_STACK - 0x190,
        LEVEL1_STACK - 0x190,
    ]
    assert [lv.trap_frame.rsp for lv in stack.levels] == [0x5000_F780, 0x5000_E080]
    # The table has no resident bit (None): the chain is walked all the same.
    assert kernel_callout.read_kernel_stack(kernel, LEVEL2_STACK, None).levels == stack.levels


def test_kernel_stack_not_resident_or_broken():
    kernel = kernel_with_two_callouts()
    swapped = kernel_callout.read_kernel_stack(kernel, LEVEL2_STACK, False)
    assert swapped == kernel_callout.KernelStack(findings.KernelStackStatus.NOT_RESIDENT)
    unmapped = kernel_callout.read_kernel_stack(kernel, 0xFFFF_E000, True)
    assert unmapped.status is findings.KernelStackStatus.NOT_RESIDENT
    assert kernel_callout.read_kernel_stack(kernel, 0, True).status is (
        findings.KernelStackStatus.NOT_RESIDENT
    )
    broken = kernel_callout.read_kernel_stack(
        kernel_with_two_callouts(drop=[("_KSTACK_CONTROL", BASE_STACK)]), LEVEL2_STACK, True
    )
    assert broken.status is findings.KernelStackStatus.BROKEN
    assert broken.current_trap_frame == LEVEL2_STACK - 0x190 and broken.levels == ()
    # A link to a segment that is not the one Previous describes (a stale or smeared
    # Previous.InitialStack) breaks the chain rather than adding a level.
    relinked = kernel_with_two_callouts()
    relinked._objects[("_KSTACK_CONTROL", LEVEL1_STACK)].Previous.StackBase = 0x1234
    stack = kernel_callout.read_kernel_stack(relinked, LEVEL2_STACK, True)
    assert stack.status is findings.KernelStackStatus.BROKEN


def test_levels_come_from_the_kernel_and_agree_with_the_frames_there():
    stack, _rsp, frame1, frame2 = nested_stack()
    # A stale frame in level 1's handler locals, between the two live frames: never a level.
    stack.frame(0x5000_E800, rip=9, rsp=0x5000_E900, length=0, api=7)
    levels = levels_of(kernel_with_two_callouts(), stack)
    assert [(lv.number, lv.frame_address) for lv in levels] == [(1, frame1), (2, frame2)]
    assert all(lv.kernel_side == findings.KernelSide.agrees() for lv in levels)
    assert [lv.frame.api_number for lv in levels] == [2, 17]
    assert all(lv.is_frame and lv.return_outside_dispatcher is None for lv in levels)


def test_a_paged_out_frame_keeps_its_level_and_is_unreadable_not_mismatch():
    stack, _rsp, frame1, frame2 = nested_stack()
    stack.unreadable_pages.add(frame2 & ~0xFFF)
    outer, inner = levels_of(kernel_with_two_callouts(), stack)
    assert outer.kernel_side.verdict is findings.Verdict.AGREES
    assert (inner.number, inner.frame_address, inner.frame) == (2, frame2, None)
    assert inner.rip == 0x7FF0_2014  # the kernel's copy, T(1).Rip
    assert inner.kernel_side == findings.KernelSide.unreadable_by(
        findings.UnreadableSide.USER_STACK
    )
    assert inner.unreadable == {findings.Unreadable.USER_STACK} and not inner.is_frame
    assert wording.kernel_side(inner.kernel_side) == "unreadable: user stack"


def test_kernel_side_mismatches_are_named():
    stack, _rsp, frame1, frame2 = nested_stack()
    stack.qword(frame2 + 0x30, 0x1)  # MachineFrame.Rip
    levels = levels_of(kernel_with_two_callouts(kcallout2_trap=0xDEAD), stack)
    assert levels[0].kernel_side.verdict is findings.Verdict.AGREES
    assert levels[1].kernel_side.differences == (
        findings.RipDiffers(0x7FF0_2014, 0x1),
        findings.KcalloutTrapFrameDiffers(0xDEAD, LEVEL1_STACK - 0x190),
    )
    assert wording.kernel_side(levels[1].kernel_side) == (
        "mismatch: trap frame Rip 0x7ff02014 != MachineFrame.Rip 0x1, "
        f"KCALLOUT_FRAME.TrapFrame 0xdead != trap frame {LEVEL1_STACK - 0x190:#x}"
    )
    sides = tuple(lv.kernel_side for lv in levels)
    thread = findings.thread_kernel_side(sides, True, findings.KernelStackStatus.READABLE)
    assert wording.kernel_side(thread, thread_row=True) == "mismatch"


def test_a_forged_rsp_names_no_frame_and_one_outside_the_stack():
    stack, _rsp, frame1, _frame2 = nested_stack()
    forged = kernel_with_two_callouts()
    forged._objects[("_KTRAP_FRAME", LEVEL1_STACK - 0x190)].Rsp = frame1 - 0x100
    outer, inner = levels_of(forged, stack)
    assert outer.kernel_side.verdict is findings.Verdict.AGREES
    assert inner.frame_address == frame1 - 0x100 and not inner.is_frame
    assert inner.kernel_side.differences[0] == findings.NotAFrame(frame1 - 0x100)
    forged._objects[("_KTRAP_FRAME", LEVEL1_STACK - 0x190)].Rsp = STACK_HIGH + 0x1000
    inner = levels_of(forged, stack)[1]
    assert inner.frame is None
    assert inner.kernel_side.differences == (findings.FrameOutsideStack(STACK_HIGH + 0x1000),)


def test_unreadable_kernel_parts_of_a_level():
    stack, _rsp, _frame1, _frame2 = nested_stack()
    no_kcallout = kernel_with_two_callouts(drop=[("_KEXCEPTION_FRAME", 0xFFFF_CE00)])
    inner = levels_of(no_kcallout, stack)[1]
    assert wording.kernel_side(inner.kernel_side) == "unreadable: kernel stack"
    no_trap = kernel_with_two_callouts(drop=[("_KTRAP_FRAME", LEVEL1_STACK - 0x190)])
    inner = levels_of(no_trap, stack)[1]
    assert (inner.number, inner.frame_address, inner.rip) == (2, None, None)
    assert inner.unreadable == {findings.Unreadable.KERNEL_STACK}


def test_a_hooked_dispatcher_is_a_note_not_a_condition():
    stack, _rsp, frame1, frame2 = nested_stack()
    hook = 0x7FFB_5000_1234
    stack.qword(frame1 - 8, hook)
    stack.qword(frame2 - 8, hook)
    levels = levels_of(kernel_with_two_callouts(), stack)
    assert [lv.kernel_side.verdict for lv in levels] == [findings.Verdict.AGREES] * 2
    assert [lv.return_outside_dispatcher for lv in levels] == [hook, hook]
    assert wording.level_notes(findings.LevelNotes(hook)) == (
        f"return address {hook:#x} not in KiUserCallbackDispatcher"
    )


def test_fallback_levels_are_numbered_only_when_the_count_is_the_kernels():
    stack, _rsp, frame1, frame2 = nested_stack()
    frames = user_callout.scan_callout_frames(stack.reader(), STACK_LOW, BOUNDS, is_return).frames
    swapped = findings.KernelStackStatus.NOT_RESIDENT
    levels = callback_levels.levels_from_scan(frames, 2, swapped)
    assert [lv.number for lv in levels] == [1, 2]
    assert {wording.kernel_side(lv.kernel_side) for lv in levels} == {
        "unreadable: kernel stack not resident"
    }
    assert [lv.number for lv in callback_levels.levels_from_scan(frames, 3, swapped)] == [
        None,
        None,
    ]
    broken = callback_levels.levels_from_scan(frames, 2, findings.KernelStackStatus.BROKEN)
    assert wording.kernel_side(broken[0].kernel_side) == "unreadable: kernel stack"


def test_thread_kernel_side_is_three_valued():
    agrees = findings.KernelSide.agrees()
    paged = findings.KernelSide.unreadable_by(findings.UnreadableSide.USER_STACK)
    readable = findings.KernelStackStatus.READABLE
    swapped = findings.KernelStackStatus.NOT_RESIDENT

    def thread(sides, in_callback=True, status=readable):
        side = findings.thread_kernel_side(tuple(sides), in_callback, status)
        return wording.kernel_side(side, thread_row=True)

    assert thread([agrees, agrees]) == "agrees"
    assert thread([agrees, paged]) == "unreadable: user stack"
    assert thread([paged, findings.KernelSide.mismatch()]) == "mismatch"
    assert thread([], in_callback=False) is None
    assert thread([]) is None
    assert thread([], status=swapped) == "unreadable: kernel stack not resident"


def test_trap_frame_user_mode_and_reading():
    assert trap_frame.is_user_mode(0x33) and not trap_frame.is_user_mode(0x10)
    kernel = kernel_with_two_callouts()
    frame = trap_frame.read_trap_frame(kernel, BASE_STACK - 0x190)
    assert frame is not None and frame.user_mode and frame.rip == 0x7FF0_1014
    assert trap_frame.read_trap_frame(kernel, 0) is None
    assert trap_frame.read_trap_frame(kernel, 0x1234) is None


# ----------------------------------------------------------------------------- reason and notes


def test_reason_texts():
    assert wording.reason(findings.Reason(True, True)) == "at-return+in-callback"
    assert wording.reason(findings.Reason(True, False)) == "at-return"
    assert wording.reason(findings.Reason(False, True)) == "in-callback"
    assert wording.reason(findings.Reason()) == "none"


def test_notes_order_and_texts():
    assert wording.thread_notes(findings.ThreadNotes()) == ""
    notes = findings.ThreadNotes(
        foreign=findings.ForeignThread(None, 0xFFFF_1000),
        kernel_stack_not_resident=True,
        trap_frame_differs=0x0,
        kernel_levels=findings.CountDiffers(1, 2),
        frames_found=findings.CountDiffers(0, 2),
        return_addresses=(0x10, 0x20),
        unreadable=frozenset(
            {
                findings.Unreadable.KERNEL_STACK,
                findings.Unreadable.TEB,
                findings.Unreadable.TRAP_FRAME,
            }
        ),
        invalid=frozenset({findings.Invalid.API_NUMBER, findings.Invalid.STACK_BOUNDS}),
    )
    assert wording.thread_notes(notes).split("; ") == [
        "mismatch: KTHREAD.Process 0xffff1000 is not a listed process",
        "kernel stack not resident",
        "KTHREAD.TrapFrame differs: 0x0",
        "kernel callout levels: 1, CallbackNestingLevel: 2",
        "callback frames found: 0, CallbackNestingLevel: 2",
        "return address 0x10 not in KiUserCallbackDispatcher",
        "return address 0x20 not in KiUserCallbackDispatcher",
        "unreadable: trap frame",
        "unreadable: TEB",
        "unreadable: kernel stack",
        "invalid: TEB stack bounds",
        "invalid: ApiNumber",
    ]
    level = findings.LevelNotes(None, frozenset({findings.Unreadable.CALLBACK_TABLE}))
    assert wording.level_notes(level) == "unreadable: KernelCallbackTable"
    foreign = findings.ThreadNotes(foreign=findings.ForeignThread(1232, 0), no_user_trap_frame=True)
    assert wording.thread_notes(foreign) == (
        "mismatch: KTHREAD.Process is PID 1232; no user-mode trap frame"
    )


@pytest.mark.parametrize(
    "reason, all_threads, at_return_only, listed",
    [
        (findings.Reason(), False, False, False),
        (findings.Reason(in_callback=True), False, False, True),
        (findings.Reason(), True, False, True),
        (findings.Reason(in_callback=True), False, True, False),
        (findings.Reason(True, True), False, True, True),
        (findings.Reason(), True, True, False),
    ],
)
def test_listing_modes(reason, all_threads, at_return_only, listed):
    mode = findings.ListingMode.from_options(all_threads, at_return_only)
    assert mode.lists(reason) is listed


def test_dispatcher_return_check_uses_the_kernels_return_address_too():
    facts = ntdll_exports.build_facts(
        None, 0, None, None, DISPATCHER[0], kernel_dispatcher_return=DISPATCHER[0] + 0x1000
    )
    assert ntdll_exports.is_dispatcher_return(facts, DISPATCHER[0] + 0x24)
    assert ntdll_exports.is_dispatcher_return(facts, DISPATCHER[0] + 0x1000)
    assert ntdll_exports.is_dispatcher_return(facts, DISPATCHER[0] - 8) is False
    unknown = ntdll_exports.build_facts(None, 0, None, None, None)
    assert ntdll_exports.is_dispatcher_return(unknown, DISPATCHER[0]) is None


def test_32bit_kernel_layer_is_refused():
    from volatility3.framework.layers import intel
    from volatility3.plugins.windows.kcbwait_analysis import kernel_facts

    layer32 = object.__new__(intel.WindowsIntelPAE)
    context = SimpleNamespace(layers={"layer": layer32})
    kernel = SimpleNamespace(layer_name="layer", symbol_table_name="nt")
    assert not kernel_facts.is_64bit_kernel(context, kernel)
