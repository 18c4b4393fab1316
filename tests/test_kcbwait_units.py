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
    callback_stack,
    kernel_callout,
    memory,
    ntdll_exports,
    pe_exports,
    reason,
    symbolizer,
    trap_frame,
    user_callout,
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


def user32_exports():
    return pe_exports.ModuleExports.from_pairs(
        USER32.base, [("DispatchMessageW", USER32.base + 0x1000)]
    )


@pytest.mark.parametrize(
    "offset, expected",
    [
        (0x1000, "USER32.dll!DispatchMessageW"),
        (0x1014, "USER32.dll!DispatchMessageW+0x14"),
        (0x10FF, "USER32.dll!DispatchMessageW+0xff"),
        (0x1100, "USER32.dll+0x1100"),
        (0x0800, "USER32.dll+0x800"),
    ],
)
def test_format_symbol(offset, expected):
    assert symbolizer.format_symbol(USER32, user32_exports(), USER32.base + offset) == expected


def test_symbolizer_without_exports_or_module():
    assert symbolizer.format_symbol(USER32, None, USER32.base + 0x1014) == "USER32.dll+0x1014"
    requested = []

    def provider(module):
        requested.append(module.name)
        return user32_exports()

    sym = symbolizer.Symbolizer([USER32], provider)
    assert sym.symbolize(0x1000) is None
    assert sym.symbolize(None) is None
    assert requested == []  # exports are parsed only for a module that contains the address
    assert sym.symbolize(USER32.base + 0x1002) == "USER32.dll!DispatchMessageW+0x2"


# ----------------------------------------------------------------------------- user stack

DISPATCHER = (BASE + 0x9000, BASE + 0x9060)
STACK_LOW, STACK_HIGH = 0x5000_0000, 0x5001_0000


class FakeStack:
    """A user stack: writable bytes over [STACK_LOW, STACK_HIGH), some pages unreadable."""

    def __init__(self):
        self.data = bytearray(STACK_HIGH - STACK_LOW)
        self.unreadable_pages: set[int] = set()

    def qword(self, address, value):
        struct.pack_into("<Q", self.data, address - STACK_LOW, value)

    def frame(self, address, *, rip, rsp, length, api, return_address=DISPATCHER[0] + 0x20):
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

    def reader(self):
        return memory.PagedReader(self.page)


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
    bounds = user_callout.StackBounds(STACK_LOW, STACK_HIGH)
    result = user_callout.scan_callout_frames(stack.reader(), current_rsp, bounds, DISPATCHER)
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
    assert (inner.seg_cs, inner.return_address) == (0x33, DISPATCHER[0] + 0x20)


def test_scan_ignores_stale_frames_below_rsp_and_implausible_candidates():
    stack, current_rsp, frame1, frame2 = nested_stack()
    # A stale frame below the current Rsp (already popped) must not be found.
    stale = current_rsp - 0x100
    stack.frame(stale, rip=1, rsp=current_rsp + 0x40, length=8, api=1)
    # A dispatcher-looking qword whose "frame" would hold input past its Rsp: rejected.
    bogus = current_rsp + 0x40
    stack.frame(bogus, rip=1, rsp=bogus + 0x60, length=0x100, api=1)
    # A misaligned candidate: rejected.
    stack.qword(current_rsp + 0x10, DISPATCHER[0] + 4)
    bounds = user_callout.StackBounds(STACK_LOW, STACK_HIGH)
    result = user_callout.scan_callout_frames(stack.reader(), current_rsp, bounds, DISPATCHER)
    assert [f.address for f in result.frames] == [frame1, frame2]


def test_frame_plausibility_rules():
    bounds = user_callout.StackBounds(STACK_LOW, STACK_HIGH)

    def frame(address, length, rsp):
        return user_callout.UcalloutFrame(address, DISPATCHER[0], 0, length, 0, 0, 0, 0, rsp, 0)

    assert user_callout.frame_is_plausible(frame(0x5000_1000, 0x10, 0x5000_1068), bounds)
    assert not user_callout.frame_is_plausible(frame(0x5000_1008, 0x10, 0x5000_1068), bounds)
    assert not user_callout.frame_is_plausible(frame(0x5000_1000, 0x11, 0x5000_1068), bounds)
    assert not user_callout.frame_is_plausible(frame(0x5000_1000, 0, STACK_HIGH + 8), bounds)
    assert not user_callout.frame_is_plausible(frame(STACK_LOW, 0, STACK_LOW + 0x100), bounds)


def test_unreadable_page_is_reported_and_skipped():
    stack, current_rsp, frame1, _frame2 = nested_stack()
    stack.unreadable_pages.add(0x5000_E000)  # hides level 2's frame
    bounds = user_callout.StackBounds(STACK_LOW, STACK_HIGH)
    result = user_callout.scan_callout_frames(stack.reader(), current_rsp, bounds, DISPATCHER)
    assert result.unreadable
    assert [f.address for f in result.frames] == [frame1]


def test_without_teb_bounds_an_unreadable_page_ends_the_stack_silently():
    stack, current_rsp, frame1, frame2 = nested_stack()
    bounds = user_callout.stack_bounds(current_rsp, None)
    assert not bounds.from_teb and bounds.low == current_rsp
    result = user_callout.scan_callout_frames(stack.reader(), current_rsp, bounds, DISPATCHER)
    assert [f.address for f in result.frames] == [frame1, frame2]
    assert not result.unreadable
    assert user_callout.stack_bounds(current_rsp, (STACK_LOW, STACK_HIGH)).from_teb
    # TEB limits that do not contain the Rsp are not used.
    assert not user_callout.stack_bounds(current_rsp, (STACK_HIGH, STACK_HIGH + PAGE)).from_teb


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


def stack_control(previous_initial, previous_kernel_stack=0, expansion=False):
    return SimpleNamespace(
        StackExpansion=int(expansion),
        has_member=lambda name: name == "StackExpansion",
        Previous=SimpleNamespace(InitialStack=previous_initial, KernelStack=previous_kernel_stack),
    )


def kernel_with_two_callouts(kcallout2_trap=None):
    base, level1, expansion, level2 = 0xFFFF_A000, 0xFFFF_B000, 0xFFFF_C000, 0xFFFF_D000
    objects = {
        ("_KSTACK_CONTROL", level2): stack_control(expansion, 0xFFFF_CE00),
        ("_KSTACK_CONTROL", expansion): stack_control(level1, 0, expansion=True),
        ("_KSTACK_CONTROL", level1): stack_control(base, 0xFFFF_AD00),
        ("_KSTACK_CONTROL", base): stack_control(0),
        ("_KTRAP_FRAME", base - 0x190): SimpleNamespace(Rip=0x7FF0_1014, Rsp=0x100, SegCs=0x33),
        ("_KTRAP_FRAME", level1 - 0x190): SimpleNamespace(Rip=0x7FF0_2014, Rsp=0x200, SegCs=0x33),
        ("_KEXCEPTION_FRAME", 0xFFFF_AD00): SimpleNamespace(TrapFrame=base - 0x190),
        ("_KEXCEPTION_FRAME", 0xFFFF_CE00): SimpleNamespace(
            TrapFrame=kcallout2_trap if kcallout2_trap is not None else level1 - 0x190
        ),
    }
    return FakeKernel(objects), level2


def user_frame(address, rip):
    return user_callout.UcalloutFrame(address, 0, address + 0x58, 0, 0, rip, 0x33, 0, 0, 0)


def test_segment_walk_skips_expansions_and_pairs_levels():
    kernel, current = kernel_with_two_callouts()
    chain = kernel_callout.walk_segments(kernel, current)
    assert chain.complete and chain.callout_count == 2
    levels = kernel_callout.kernel_levels(kernel, chain)
    assert [lv.level for lv in levels] == [1, 2]
    assert levels[0].caller_trap_frame == 0xFFFF_A000 - 0x190
    assert levels[1].caller_trap_frame == 0xFFFF_B000 - 0x190
    frames = [user_frame(0x100, 0x7FF0_1014), user_frame(0x200, 0x7FF0_2014)]
    verdicts = callback_stack.compare_levels(frames, chain, levels)
    assert verdicts == ["agrees", "agrees"]
    assert callback_stack.thread_kernel_side(verdicts) == "agrees"


def test_kernel_side_mismatches_are_named():
    kernel, current = kernel_with_two_callouts(kcallout2_trap=0xDEAD)
    chain = kernel_callout.walk_segments(kernel, current)
    levels = kernel_callout.kernel_levels(kernel, chain)
    frames = [user_frame(0x100, 0x7FF0_1014), user_frame(0x208, 0x1)]
    verdicts = callback_stack.compare_levels(frames, chain, levels)
    assert verdicts[0] == "agrees"
    assert verdicts[1].startswith("mismatch: ")
    assert "Rsp 0x200 != Frame 0x208" in verdicts[1]
    assert "MachineFrame.Rip 0x1" in verdicts[1]
    assert "KCALLOUT_FRAME.TrapFrame 0xdead" in verdicts[1]
    assert callback_stack.thread_kernel_side(verdicts) == "mismatch"
    extra = callback_stack.compare_levels(frames + [user_frame(0x300, 0)], chain, levels)
    assert extra[2] == callback_stack.NO_KERNEL_LEVEL


def test_broken_segment_chain_is_unreadable():
    kernel, _current = kernel_with_two_callouts()
    chain = kernel_callout.walk_segments(kernel, 0xFFFF_E000)  # unmapped
    assert not chain.complete
    assert kernel_callout.kernel_levels(kernel, chain) == []
    verdicts = callback_stack.compare_levels([user_frame(0x100, 0)], chain, [])
    assert verdicts == ["unreadable: kernel stack"]
    assert callback_stack.thread_kernel_side([]) is None


def test_trap_frame_user_mode_and_reading():
    assert trap_frame.is_user_mode(0x33) and not trap_frame.is_user_mode(0x10)
    kernel, _current = kernel_with_two_callouts()
    frame = trap_frame.read_trap_frame(kernel, 0xFFFF_A000 - 0x190)
    assert frame is not None and frame.user_mode and frame.rip == 0x7FF0_1014
    assert trap_frame.read_trap_frame(kernel, 0) is None
    assert trap_frame.read_trap_frame(kernel, 0x1234) is None


# ----------------------------------------------------------------------------- reason and notes


def test_reason_texts():
    assert reason.thread_reason(True, True) == "at-return+in-callback"
    assert reason.thread_reason(True, False) == "at-return"
    assert reason.thread_reason(False, True) == "in-callback"
    assert reason.thread_reason(False, False) == "none"
    assert reason.is_in_callback(2, 0) and reason.is_in_callback(0, 1)
    assert not reason.is_in_callback(0, 0) and not reason.is_in_callback(None, 0)


def test_notes_order_and_texts():
    assert reason.thread_notes(True, 2, 2, []) == ""
    assert (
        reason.thread_notes(False, 0, 3, ["kernel stack", "TEB", "trap frame"])
        == "no user-mode trap frame; callback frames found: 0, CallbackNestingLevel: 3; "
        "unreadable: trap frame; unreadable: TEB; unreadable: kernel stack"
    )
    assert reason.callback_notes(["KernelCallbackTable"]) == "unreadable: KernelCallbackTable"


@pytest.mark.parametrize(
    "thread_reason, all_threads, at_return_only, listed",
    [
        ("none", False, False, False),
        ("in-callback", False, False, True),
        ("none", True, False, True),
        ("in-callback", False, True, False),
        ("at-return+in-callback", False, True, True),
        ("none", True, True, False),
    ],
)
def test_listing_modes(thread_reason, all_threads, at_return_only, listed):
    assert reason.is_listed(thread_reason, all_threads, at_return_only) is listed


def test_32bit_kernel_layer_is_refused():
    from volatility3.framework.layers import intel
    from volatility3.plugins.windows.kcbwait_analysis import kernel_facts

    layer32 = object.__new__(intel.WindowsIntelPAE)
    context = SimpleNamespace(layers={"layer": layer32})
    kernel = SimpleNamespace(layer_name="layer", symbol_table_name="nt")
    assert not kernel_facts.is_64bit_kernel(context, kernel)

