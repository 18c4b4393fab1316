"""Unit tests of windows.kcbwait's defences against damaged and hostile input.

Bytes and addresses in, verdicts out, as in test_kcbwait_units.py (whose stand-ins these reuse):
escaped names, hostile export directories, TEB bounds, level numbering, notes, and the
thread-list walks over cycles, holes, smeared headers and foreign memory.
"""

from __future__ import annotations

import json
import struct

import pytest

from tests.test_kcbwait_units import (
    BASE,
    STACK_HIGH,
    STACK_LOW,
    build_pe,
    parse_exports,
)

from volatility3.plugins.windows.kcbwait_analysis import (  # isort: skip (after the path fix)
    findings,
    ntdll_exports,
    pe_exports,
    text,
    thread_list,
    user_callout,
    wording,
)


def test_names_are_escaped_for_terminals_and_exact_for_json():
    raw = "h\x1b[31mook\ud800\u202e\\x\x9b.dll"
    shown = text.DisplayText(raw)
    assert str(shown) == raw and shown == raw
    assert f"{shown}" == "h\\x1b[31mook\\ud800\\u202e\\\\x\\x9b.dll"
    assert json.loads(json.dumps(shown)) == raw
    assert text.escape("plain.dll") == "plain.dll"
    assert text.latin1(b"t\xe9st\x9b.exe\0junk") == "t\xe9st\x9b.exe"
    assert text.utf16("a\ud800".encode("utf-16-le", "surrogatepass") + b"\x00") == "a\ud800"
    assert text.display(None) is None


def export_image(names_count=None, functions_rva=None, terminate=True, rva_of=None):
    """A PE whose export directory is edited after the fact, like a hostile image."""
    image = bytearray(build_pe({"NtCallbackReturn": 0x1100, "NtClose": 0x1120}))
    if names_count is not None:
        struct.pack_into("<I", image, 0x2000 + 0x18, names_count)
    if functions_rva is not None:
        struct.pack_into("<I", image, 0x2000 + 0x1C, functions_rva)
    if not terminate:
        end = image.index(b"NtClose\0", 0x2200) + len("NtClose")
        image[0x2200 : end + 1] = image[0x2200 : end + 1].replace(b"\0", b"#")
    if rva_of is not None:
        struct.pack_into("<I", image, 0x2040, rva_of)  # first function's RVA
    return bytes(image)


def test_export_directory_with_absurd_counts_or_arrays_is_corrupt():
    with pytest.raises(pe_exports.CorruptExports):
        parse_exports(export_image(names_count=0x7FFFFFFF))
    with pytest.raises(pe_exports.CorruptExports):
        parse_exports(export_image(names_count=1000))  # arrays run past the directory
    with pytest.raises(pe_exports.CorruptExports):
        parse_exports(export_image(functions_rva=0xFFFFFF00))


def test_unusable_export_entries_are_dropped_not_fatal():
    unterminated = parse_exports(export_image(terminate=False))
    assert unterminated.names == ()
    absurd = parse_exports(export_image(rva_of=0xFFFFFF00))
    assert absurd.address_of("NtCallbackReturn") is None
    assert absurd.address_of("NtClose") == BASE + 0x1120


def test_header_sizes_are_checked_against_the_image():
    headers = pe_exports.ImageHeaders(
        0x5000, pe_exports.DataDirectory(0x2000, 0x100), pe_exports.DataDirectory(0, 0)
    )
    assert pe_exports.directory_in_image(headers, headers.export, 0x1000)
    lying = pe_exports.DataDirectory(0x2000, 0x7FFFFFF0)
    assert not pe_exports.directory_in_image(headers, lying, pe_exports.MAX_EXPORT_DIRECTORY)
    outside = pe_exports.DataDirectory(0x4F00, 0x200)
    assert not pe_exports.directory_in_image(headers, outside, 0x1000)


def test_ntdll_without_a_callback_return_export_is_invalid():
    empty = pe_exports.ModuleExports.from_pairs(BASE, [])
    facts = ntdll_exports.build_facts(BASE, 0x10000, empty, None, BASE + 0x500)
    assert facts.exports_problem == pe_exports.INVALID and facts.callback_return_ranges == ()
    assert facts.dispatcher == BASE + 0x500  # the kernel still names the dispatcher
    unread = ntdll_exports.build_facts(BASE, 0x10000, None, None, BASE + 0x500)
    assert unread.exports_problem == pe_exports.UNREADABLE


@pytest.mark.parametrize(
    "limits, rsp, problem, usable",
    [
        ((STACK_LOW, STACK_HIGH), STACK_LOW + 0x100, None, True),
        ((STACK_HIGH, STACK_LOW), STACK_LOW + 0x100, findings.Invalid.STACK_BOUNDS, False),
        ((0x10000, 0x7FFF_FFFF_0000), STACK_LOW + 0x100, findings.Invalid.STACK_BOUNDS, False),
        ((STACK_LOW, 0x8000_0000_1000), STACK_LOW + 0x100, findings.Invalid.STACK_BOUNDS, False),
        ((STACK_LOW, STACK_HIGH), STACK_HIGH + 0x100, findings.Invalid.RSP_OUTSIDE_STACK, True),
        (None, STACK_LOW + 0x100, findings.Unreadable.TEB, False),
    ],
)
def test_teb_limits_are_validated(limits, rsp, problem, usable):
    unreadable, invalid = user_callout.teb_problems(limits, rsp)
    assert (unreadable or invalid) == problem
    # Bounds that can be true still check the frames even when the trap frame's Rsp is off.
    assert (user_callout.usable_bounds(limits) is not None) is usable


def test_foreign_notes_follow_the_contract_order():
    notes = findings.ThreadNotes(
        foreign=findings.ForeignThread(1232, 0xFFFF_B00F_0000_0620),
        frames_found=findings.CountDiffers(1, 2),
        unreadable=frozenset({findings.Unreadable.USER_STACK}),
        invalid=frozenset({findings.Invalid.API_NUMBER, findings.Invalid.STACK_BOUNDS}),
    )
    assert wording.thread_notes(notes) == (
        "mismatch: KTHREAD.Process is PID 1232; callback frames found: 1, "
        "CallbackNestingLevel: 2; unreadable: user stack; invalid: TEB stack bounds; "
        "invalid: ApiNumber"
    )
    level = findings.LevelNotes(invalid=frozenset({findings.Invalid.CALLBACK_TABLE}))
    assert wording.level_notes(level) == "invalid: KernelCallbackTable"


class FakeLister:
    """thread_list.ThreadLister's walk over a dict of list entries (no Volatility)."""

    def __new__(cls, links, types):
        lister = object.__new__(thread_list.ThreadLister)
        lister._mask = (1 << 48) - 1
        lister._links = links.get
        lister._is_thread = lambda address: types.get(address)
        lister._shapes = [thread_list.ListShape("ETHREAD", 0x10, 0)]
        return lister


def ring(head, entries):
    nodes = [head, *entries]
    return {n: (nodes[(i + 1) % len(nodes)], nodes[i - 1]) for i, n in enumerate(nodes)}


def test_thread_list_walks_recover_from_cycles_holes_and_non_threads():
    head, entries = 0x1010, [0x2000, 0x3000, 0x4000, 0x5000]
    types = {e: True for e in entries}
    links = ring(head, entries)
    assert FakeLister(links, types).list(0x1000).addresses == entries
    cycle = {**links, 0x3000: (0x2000, 0x2000)}  # third entry links back to the first
    listing = FakeLister(cycle, types).list(0x1000)
    assert listing.addresses == entries
    assert listing.problems == [
        f"ETHREAD list, Flink walk: {thread_list.STOP_CYCLE} after 2 entries"
    ]
    hole = {**links, 0x2000: (0xDEAD000, head)}  # Flink into unmapped memory
    assert FakeLister(hole, types).list(0x1000).addresses == entries
    stranger = {**links, 0x4000: (0x9000, 0x3000)}
    listing = FakeLister(stranger, {**types, 0x9000: False}).list(0x1000)
    assert listing.addresses == entries
    assert listing.problems[0] == (
        "ETHREAD list, Flink walk: passed over 1 entries that are not threads"
    )
    assert thread_list.STOP_UNREADABLE in listing.problems[1]
    self_loop = {**links, 0x2000: (0x2000, head)}
    assert FakeLister(self_loop, types).list(0x1000).addresses == entries
    both = {**links, 0x3000: (0xDEAD000, 0xDEAD000)}  # one entry's links both broken
    assert FakeLister(both, types).list(0x1000).addresses == entries


def test_smeared_thread_headers_hide_no_other_thread():
    """Found by the fuzzer: two threads whose dispatcher-header Type was zeroed stopped both
    walks of both lists, losing the intact thread between them."""
    head, entries = 0x1010, [0x2000, 0x3000, 0x4000, 0x5000]
    types = {0x2000: False, 0x3000: True, 0x4000: False, 0x5000: True}
    listing = FakeLister(ring(head, entries), types).list(0x1000)
    assert listing.addresses == [0x3000, 0x5000]
    garbage = {head: (0x2000, 0x2000), 0x2000: (0x2000 + 0x10, head)}
    for n in range(thread_list.MAX_NOT_THREADS + 2):
        garbage[0x2000 + 0x10 * n] = (0x2000 + 0x10 * (n + 1), 0)
    not_threads = {address: False for address in garbage}
    listing = FakeLister(garbage, not_threads).list(0x1000)
    assert listing.addresses == []
    assert any(thread_list.STOP_NOT_THREAD in p for p in listing.problems)
