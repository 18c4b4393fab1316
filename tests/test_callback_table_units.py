"""Unit tests of the callback-table integrity rules (docs/output-contract.md, "Table"):
addresses and section headers in, verdicts and their exact words out."""

from __future__ import annotations

import struct

from tests.test_kcbwait_units import BASE  # noqa: F401  (puts the checkout's plugin first)

from volatility3.plugins.windows.kcbwait_analysis import (  # isort: skip (after the path fix)
    callback_table as ct,
    pe_exports,
    wording,
)

USER32 = ct.Region("user32.dll", 0x7FFB_0000_0000, 0x20000)
HOOK = ct.Region("hook.dll", 0x7FFB_4000_0000, 0x10000)
SECTIONS = (
    pe_exports.Section(".text", 0x1000, 0x8000, 0x60000020),
    pe_exports.Section(".rdata", 0x9000, 0x3000, 0x40000040),
    pe_exports.Section(".data", 0xC000, 0x1000, 0xC0000040),
)
OWNER = ct.Owner(USER32, SECTIONS)
MODULES = (USER32, HOOK)
RWX = ct.Region(None, 0x2000_0000, 0x1000, private=True, rwx=True)
RW = ct.Region(None, 0x3000_0000, 0x1000, private=True)


def vads():
    return (RWX, RW)


def text(verdict):
    return wording.table_verdict(verdict)


def test_an_untouched_table_and_entry_are_ok():
    assert text(ct.check_table(USER32.base + 0x9000, OWNER, MODULES, vads)) == "ok"
    assert text(ct.check_entry(3, USER32.base + 0x1234, OWNER, MODULES, vads)) == "ok"


def test_the_table_pointer_outside_its_owner_or_in_writable_memory():
    assert text(ct.check_table(RWX.base + 0x10, OWNER, MODULES, vads)) == (
        "hijacked: table at 0x20000010 in private RWX memory 0x20000010"
    )
    assert text(ct.check_table(RW.base, OWNER, MODULES, vads)) == (
        "hijacked: table at 0x30000000 in private memory 0x30000000"
    )
    assert text(ct.check_table(HOOK.base + 0x3000, OWNER, MODULES, vads)) == (
        f"hijacked: table at {HOOK.base + 0x3000:#x} in hook.dll+0x3000"
    )
    assert text(ct.check_table(USER32.base + 0xC100, OWNER, MODULES, vads)) == (
        f"hijacked: table at {USER32.base + 0xC100:#x} in writable section .data of user32.dll"
    )
    assert text(ct.check_table(USER32.base + 0x1F000, OWNER, MODULES, vads)) == (
        f"hijacked: table at {USER32.base + 0x1F000:#x} outside the sections of user32.dll"
    )
    # No owner loaded at all (a WoW64 process without wow64win.dll, say).
    assert text(ct.check_table(USER32.base + 0x9000, None, MODULES, vads)).startswith(
        "hijacked: table at"
    )


def test_entries_outside_the_owners_code():
    assert text(ct.check_entry(3, HOOK.base + 0x2000, OWNER, MODULES, vads)) == (
        "hijacked: entry 3 -> hook.dll+0x2000"
    )
    assert text(ct.check_entry(5, RWX.base + 8, OWNER, MODULES, vads)) == (
        "hijacked: entry 5 -> private RWX memory 0x20000008"
    )
    assert text(ct.check_entry(7, 0x5000_0000, OWNER, MODULES, vads)) == (
        "hijacked: entry 7 -> private memory 0x50000000"
    )
    # Inside user32 but not in its code (.rdata): not a handler.
    assert text(ct.check_entry(8, USER32.base + 0x9010, OWNER, MODULES, vads)) == (
        "hijacked: entry 8 -> user32.dll+0x9010"
    )


def test_unreadable_parts_are_unreadable_not_hijacked():
    blind = ct.Owner(USER32, None)
    assert text(ct.check_table(USER32.base + 0x9000, blind, MODULES, vads)) == (
        "unreadable: KernelCallbackTable"
    )
    assert text(ct.check_entry(2, None, OWNER, MODULES, vads)) == (
        "unreadable: KernelCallbackTable"
    )
    combined = ct.combine(
        [
            ct.check_entry(2, None, OWNER, MODULES, vads),
            ct.check_entry(3, HOOK.base, OWNER, MODULES, vads),
            ct.check_entry(3, HOOK.base, OWNER, MODULES, vads),
        ]
    )
    # Each hijack once, and what could not be read is still said.
    assert text(combined) == "hijacked: entry 3 -> hook.dll+0x0; unreadable: KernelCallbackTable"


def test_entries_checked_stop_at_the_first_non_pointer_and_the_section_end():
    table = USER32.base + 0x9000
    values = [USER32.base + 0x1000 + 0x10 * i for i in range(5)] + [0, USER32.base + 0x1000]
    memory = {table + 8 * i: struct.pack("<Q", v) for i, v in enumerate(values)}

    def read(address, length):
        return memory.get(address)

    assert ct.read_entries(read, table, 8, OWNER) == values[:5]
    # A table near its section's end is never read past it.
    end = USER32.base + 0x9000 + 0x3000 - 16
    full = {end + 8 * i: struct.pack("<Q", USER32.base + 0x1000) for i in range(8)}
    assert len(ct.read_entries(lambda a, n: full.get(a), end, 8, OWNER)) == 2
    # 32-bit tables: 4-byte entries below 4 GiB; an unreadable entry ends the count.
    small = {0x1000 + 4 * i: struct.pack("<I", 0x7000_0000 + i) for i in range(3)}
    assert ct.read_entries(lambda a, n: small.get(a), 0x1000, 4, None) == [
        0x7000_0000,
        0x7000_0001,
        0x7000_0002,
    ]


def test_hijack_texts_are_all_found_by_grep():
    items = [
        ct.TableOutsideOwner(1, ct.InPrivate(1, True)),
        ct.TableInWritableSection(1, ".data", "user32.dll"),
        ct.TableOutsideSections(1, "user32.dll"),
        ct.EntryHijacked(1, ct.InModule("hook.dll", 0)),
    ]
    assert all(wording.hijack(item).lower().startswith("hijacked") for item in items)
    assert "hijack" not in text(ct.TableVerdict()) and "hijack" not in text(
        ct.TableVerdict((), True)
    )
