"""The builder's callback tables, WoW64 layout and instrumentation callbacks, checked without
the plugin (testdata/scenarios/tables.json):

- the scenario fields are validated, errors naming the field path;
- the truth says what docs/output-contract.md ("Table", "windows.kcbtable") words for each case;
- the image bytes, read back with plain struct reads (tests/support/readback.py) and pefile,
  say what the truth says: PEB and _PEB32 table pointers, KPROCESS.InstrumentationCallback,
  VAD flags of the private memory, the owners' sections and the entries checked.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pefile
import pytest

from imagebuilder.isf import SymbolTable
from imagebuilder.scenario import ScenarioError, parse_scenario
from tests.conftest import ALL_PROFILES, SCENARIOS
from tests.support.readback import RawImage, Reader

SCENARIO = "tables"
PAGE_EXECUTE_READWRITE, PAGE_READWRITE = 0x40, 0x04
USER_LIMIT = {64: 0x8000_0000_0000, 32: 0x1_0000_0000}


def _threads(truth: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {t["tid"]: t for t in truth["threads"]}


def _rows(truth: dict[str, Any]) -> dict[tuple[int, int], dict[str, Any]]:
    return {(r["pid"], r["bits"]): r for r in truth["tables"]}


# -- scenario fields --------------------------------------------------------------------------
def _base() -> dict[str, Any]:
    return json.loads((SCENARIOS / f"{SCENARIO}.json").read_text())


def _process(pid: int, data: dict[str, Any]) -> dict[str, Any]:
    return next(p for p in data["processes"] if p["pid"] == pid)


@pytest.mark.parametrize(
    ("pid", "change", "message"),
    [
        (1300, {"callback_table": "heap"},
         "scenario.processes[0].callback_table: 'heap' is not one of owner, private, private_rwx,"
         " writable_section or another module of the process"),
        (1300, {"callback_table": "user32.dll"},
         "scenario.processes[0].callback_table: 'user32.dll' is not one of owner, private,"
         " private_rwx, writable_section or another module of the process"),
        (2300, {"callback_table": "private_rwx"},
         "scenario.processes[10].callback_table: the process has no callback table (it maps"
         " neither user32.dll nor, in WoW64, wow64win.dll)"),
        (2300, {"callback_overrides": {"3": "private"}},
         "scenario.processes[10].callback_overrides: the process has no callback table (it maps"
         " neither user32.dll nor, in WoW64, wow64win.dll)"),
        (1500, {"callback_overrides": {"3": "heap"}},
         "scenario.processes[2].callback_overrides[3]: 'heap' is not private, private_rwx or"
         " one of the process's modules"),
        (1300, {"callback_overrides32": {"9": "private"}},
         "scenario.processes[0].callback_overrides32: only a WoW64 process has a 32-bit table"),
        (2000, {"callback_overrides32": {"9": "hook.dll"}},
         "scenario.processes[7].callback_overrides32[9]: 'hook.dll' is not private or"
         " private_rwx"),
        (2000, {"callback_overrides32": {"128": "private"}},
         "scenario.processes[7].callback_overrides32 key: 128 is outside 0..127"),
        (2000, {"callback_overrides32": {"x": "private"}},
         "scenario.processes[7].callback_overrides32 key: 'x' is not a number"),
        (2100, {"instrumentation_callback": "other.dll"},
         "scenario.processes[8].instrumentation_callback: 'other.dll' is not private,"
         " private_rwx or one of the process's modules"),
        (1900, {"modules": ["ntdll.dll", "wow64.dll", "win32u.dll"]},
         "scenario.processes[6].modules: a WoW64 process maps wow64win.dll, wow64cpu.dll"),
        (1900, {"modules": ["ntdll.dll", "wow64.dll", "wow64win.dll", "wow64cpu.dll",
                            "user32.dll"]},
         "scenario.processes[6].modules: a WoW64 process maps no 64-bit user32.dll (its 32-bit"
         " user32.dll comes from SysWOW64 by itself)"),
    ],
)
def test_fields_are_validated(pid, change, message):
    data = _base()
    _process(pid, data).update(change)
    with pytest.raises(ScenarioError) as error:
        parse_scenario(data)
    assert str(error.value) == message


def test_writable_section_copy_must_fit_the_page():
    data = _base()
    data["callback_table_size"] = 600
    with pytest.raises(ScenarioError) as error:
        parse_scenario(data)
    assert str(error.value) == (
        "scenario.processes[4].callback_table: writable_section holds at most 511 entries;"
        " callback_table_size is 600"
    )


def test_the_scenario_parses_with_its_fields():
    scenario = parse_scenario(_base())
    by_pid = {p.pid: p for p in scenario.processes}
    assert by_pid[1400].tables.location == "private_rwx"
    assert by_pid[1400].callback_overrides == {7: "private_rwx"}
    assert by_pid[2000].tables.overrides32 == {9: "private_rwx", 12: "private"}
    assert by_pid[2100].tables.instrumentation == "edrhook.dll"
    assert by_pid[1300].tables == type(by_pid[1300].tables)()  # defaults: the owner's table


# -- the truth, spelled out ------------------------------------------------------------------
@pytest.mark.parametrize("profile", ALL_PROFILES)
def test_table_verdicts_as_the_contract_words_them(images, profile):
    truth = images.truth(SCENARIO, profile)
    threads, rows = _threads(truth), _rows(truth)
    # untouched native table
    assert threads[1304]["table"] == "ok"
    assert [f["table"] for f in threads[1304]["frames"]] == ["ok"]
    assert rows[(1300, 64)]["verdict"] == "ok" and rows[(1300, 64)]["section"] == ".rdata"
    # a private copy in private RWX memory, one entry of the copy redirected
    copy_row = rows[(1400, 64)]
    table = copy_row["table"]
    table_item = f"hijacked: table at {table:#x} in private RWX memory {table:#x}"
    entry7 = copy_row["entries_outside"][0]
    assert entry7["index"] == 7
    assert entry7["target_symbol"] == f"private RWX memory {entry7['target']:#x}"
    entry_item = f"hijacked: entry 7 -> private RWX memory {entry7['target']:#x}"
    assert threads[1404]["table"] == f"{table_item}; {entry_item}"
    assert threads[1404]["frames"][0]["table"] == entry_item
    assert threads[1408]["table"] == table_item  # its ApiNumber 2 is intact in the copy
    assert threads[1408]["frames"][0]["table"] == "ok"
    assert threads[1412]["table"] == table_item  # no level: the table item alone
    assert (copy_row["section"], copy_row["entries"], copy_row["outside"]) == (None, 128, 1)
    assert copy_row["verdict"] == f"{table_item}; {entry_item}"
    # a single entry into another module; a level that does not hit it
    assert threads[1504]["table"] == "hijacked: entry 3 -> hook.dll+0x2000"
    assert threads[1508]["table"] == "ok"
    # entries into private RWX and private read/write memory, each ApiNumber once
    inject = threads[1604]
    rwx, rw = (e["target"] for e in rows[(1600, 64)]["entries_outside"])
    assert inject["table"] == (
        f"hijacked: entry 5 -> private RWX memory {rwx:#x};"
        f" hijacked: entry 6 -> private memory {rw:#x}"
    )
    assert [f["table"] for f in inject["frames"]] == [
        f"hijacked: entry 5 -> private RWX memory {rwx:#x}",
        f"hijacked: entry 6 -> private memory {rw:#x}",
        f"hijacked: entry 5 -> private RWX memory {rwx:#x}",
    ]
    assert threads[1608]["table"] == "ok"
    # the table in a writable section of its owner
    data_row = rows[(1700, 64)]
    assert data_row["section"] == ".data"
    assert threads[1704]["table"] == (
        f"hijacked: table at {data_row['table']:#x} in writable section .data of user32.dll"
    )
    # WoW64: the 64-bit table is wow64win.dll's (no verdict); the 32-bit row is separate
    for pid in (1900, 2000):
        assert rows[(pid, 64)]["owner"] == "wow64win.dll"
        assert rows[(pid, 64)]["verdict"] == "ok"
        assert rows[(pid, 32)]["owner"] == "user32.dll"
        assert rows[(pid, 32)]["instrumentation_callback"] is None
    assert threads[1904]["frames"][0]["handler_symbol"].startswith("wow64win.dll+")
    assert threads[2004]["table"] == "ok"  # only windows.kcbtable sees the 32-bit hijack
    assert rows[(1900, 32)]["verdict"] == "ok"
    wow = rows[(2000, 32)]
    assert [e["index"] for e in wow["entries_outside"]] == [9, 12]
    assert wow["verdict"].startswith("hijacked: entry 9 -> private RWX memory 0x")
    assert all(e["target"] < USER_LIMIT[32] for e in wow["entries_outside"])
    # instrumentation callbacks: a note on every thread, a row even without user32
    edr = rows[(2100, 64)]
    assert edr["instrumentation_target"] == "edrhook.dll+0x2000"
    note = f"instrumentation callback {edr['instrumentation_callback']:#x} in edrhook.dll+0x2000"
    assert [threads[t]["notes"] for t in (2104, 2108, 2112)] == [
        note,
        note,
        f"{note}; no user-mode trap frame",
    ]
    lone = rows[(2200, 64)]
    assert (lone["table"], lone["owner"], lone["verdict"], lone["entries"]) == (None, None, None, 0)
    assert lone["instrumentation_target"].startswith("private RWX memory 0x")
    assert threads[2204]["table"] is None
    # no user32, no instrumentation callback: no row, Table null
    assert not [r for r in truth["tables"] if r["pid"] == 2300]
    assert threads[2304]["table"] is None and threads[2308]["table"] is None
    # every hijack text starts with "hijacked", and nothing else does
    texts = [t["table"] for t in truth["threads"] if t["table"]]
    assert all(part == "ok" or part.startswith("hijacked: ") for t in texts for part in
               t.split("; "))


# -- the bytes say the same ----------------------------------------------------------------
class _Process:
    def __init__(self, reader: Reader, eproc: int) -> None:
        self.reader, self.eproc = reader, eproc
        self.dtb = reader.field(eproc, "_EPROCESS", "Pcb.DirectoryTableBase")

    def field(self, name: str) -> int:
        return self.reader.field(self.eproc, "_EPROCESS", name)

    def read(self, address: int, size: int) -> bytes | None:
        return self.reader.image.read(self.dtb, address, size)

    def vads(self) -> list[dict[str, int]]:
        """Every VAD node of the tree, in order: start, end (inclusive), flags."""
        out: list[dict[str, int]] = []

        def walk(node: int) -> None:
            if not node:
                return
            f = lambda name: self.reader.field(node, "_MMVAD_SHORT", name)  # noqa: E731
            walk(f("VadNode.Left"))
            start = f("StartingVpn") | f("StartingVpnHigh") << 32
            end = f("EndingVpn") | f("EndingVpnHigh") << 32
            out.append(
                {
                    "start": start << 12,
                    "end": (end << 12) | 0xFFF,
                    "private": f("u.VadFlags.PrivateMemory"),
                    "protection": f("u.VadFlags.Protection"),
                }
            )
            walk(f("VadNode.Right"))

        walk(self.field("VadRoot.Root"))
        return out

    def image(self, base: int, size: int) -> pefile.PE:
        data = self.read(base, size)
        assert data is not None
        return pefile.PE(data=data, fast_load=True)


def _processes(reader: Reader) -> dict[int, _Process]:
    return {pid: _Process(reader, v["eprocess"]) for (pid, _t), v in reader.threads().items()}


def _protect_to_value(reader: Reader, index: int) -> int:
    address = reader.kernel_base + reader.symbols.symbol_rva("MmProtectToValue") + 4 * index
    return struct.unpack("<I", reader.image.read(reader.dtb, address, 4))[0]


def _entries(proc: _Process, table: int, bits: int, end: int | None) -> list[int]:
    size, values = bits // 8, []
    for index in range(0x400):
        address = table + size * index
        if end is not None and address + size > end:
            break
        data = proc.read(address, size)
        value = None if data is None else int.from_bytes(data, "little")
        if not value or value >= USER_LIMIT[bits]:
            break
        values.append(value)
    return values


@pytest.mark.parametrize("profile", ALL_PROFILES)
def test_image_bytes_say_what_the_truth_says(images, profile):
    paths, truth = images.get(SCENARIO, profile), images.truth(SCENARIO, profile)
    symbols = SymbolTable.load(images.profile(profile).isf_path)
    reader = Reader(RawImage(Path(paths["raw"])), symbols, truth["dtb"], truth["kernel_base"])
    procs = _processes(reader)
    inventory = {p["pid"]: p for p in truth["processes"]}
    peb32_table = symbols.offset("_PEB32", "KernelCallbackTable")
    assert peb32_table == 0x2C
    checked = 0
    for row in truth["tables"]:
        proc = procs[row["pid"]]
        modules = {m["name"]: m for m in inventory[row["pid"]]["modules"]}
        if row["bits"] == 64:
            peb = proc.field("Peb")
            table = reader.field(peb, "_PEB", "KernelCallbackTable", proc.dtb)
            assert table == (row["table"] or 0)
            assert proc.field("Pcb.InstrumentationCallback") == (
                row["instrumentation_callback"] or 0
            )
            owner = modules.get(row["owner"]) if row["owner"] else None
        else:
            ewow = proc.field("WoW64Process")
            peb32 = reader.field(ewow, "_EWOW64PROCESS", "Peb")
            assert peb32 < USER_LIMIT[32]
            raw = proc.read(peb32 + peb32_table, 4)
            table = struct.unpack("<I", raw)[0]
            assert table == row["table"]
            owner = next(m for m in inventory[row["pid"]]["modules32"]
                         if m["path"].endswith("\\SysWOW64\\user32.dll"))
        end, executable = None, []
        if owner is not None:
            pe = proc.image(owner["base"], owner["size"])
            assert pe.FILE_HEADER.Machine == (0x8664 if row["bits"] == 64 else 0x14C)
            assert pe.OPTIONAL_HEADER.Magic == (0x20B if row["bits"] == 64 else 0x10B)
            for section in pe.sections:
                start = owner["base"] + section.VirtualAddress
                span = (start, start + section.Misc_VirtualSize)
                if span[0] <= table < span[1]:
                    assert section.Name.rstrip(b"\0").decode() == row["section"]
                    assert bool(section.Characteristics & 0x80000000) == (
                        row["section"] == ".data"
                    )
                    end = span[1]
                if section.Characteristics & 0x20000000:
                    executable.append(span)
        if row["section"] is None:
            assert end is None
        values = _entries(proc, table, row["bits"], end) if table else []
        assert len(values) == row["entries"]
        outside = [
            {"index": i, "target": v}
            for i, v in enumerate(values)
            if not any(a <= v < b for a, b in executable)
        ]
        assert outside == [
            {"index": e["index"], "target": e["target"]} for e in row["entries_outside"]
        ]
        # private targets: the VAD flags say private, and RWX exactly where the truth says so
        vads = proc.vads()
        for item in row["entries_outside"] + (
            [{"target": row["instrumentation_callback"],
              "target_symbol": row["instrumentation_target"]}]
            if row["instrumentation_callback"] else []
        ):
            if not item["target_symbol"].startswith("private"):
                continue
            vad = next(v for v in vads if v["start"] <= item["target"] <= v["end"])
            assert vad["private"] == 1
            protect = _protect_to_value(reader, vad["protection"])
            rwx = item["target_symbol"].startswith("private RWX memory")
            assert protect == (PAGE_EXECUTE_READWRITE if rwx else PAGE_READWRITE)
            checked += 1
    assert checked >= 5


@pytest.mark.parametrize("profile", ALL_PROFILES)
def test_wow64_process_maps_what_a_real_one_does(images, profile):
    truth = images.truth("basic", profile)
    legacy = next(p for p in truth["processes"] if p["name"] == "legacy32.exe")
    names = [m["name"] for m in legacy["modules"]]
    assert "user32.dll" not in names
    assert {"ntdll.dll", "wow64.dll", "wow64win.dll", "wow64cpu.dll"} <= set(names)
    assert [m["path"] for m in legacy["modules32"]] == [
        "C:\\Windows\\SysWOW64\\ntdll.dll",
        "C:\\Windows\\SysWOW64\\user32.dll",
    ]
    vad_files = {v["file"] for v in legacy["vads"] if v["file"]}
    assert "\\Windows\\SysWOW64\\user32.dll" in vad_files
    thread = next(t for t in truth["threads"] if t["tid"] == 3584)
    assert thread["frames"][0]["handler_symbol"].startswith("wow64win.dll+")
    assert thread["table"] == "ok"

