"""Every ``module!name+0xN`` of every truth file lies in the function of its name.

The modules are read back from the built raw image (page walks of tests/support/readback.py)
and parsed with pefile: their .pdata, each UNWIND_INFO (entries with UNW_FLAG_CHAININFO
followed to their primary entry), their export tables, and the PDB symbol tables the builder
wrote beside the image.  Nothing of the builder's own bookkeeping is used, so a builder
mistake in laying out functions or in applying the contract's rule shows here
(docs/output-contract.md, "Symbols": "Function-accurate offsets").
"""

from __future__ import annotations

import bisect
import json
import lzma
import re
import struct
from pathlib import Path
from typing import Any

import pefile
import pytest

from imagebuilder.isf import SymbolTable
from tests.conftest import SCENARIOS
from tests.support.readback import RawImage, Reader

PROFILE = "lab"
LEAF_SPAN = 0x20
UNW_FLAG_CHAININFO = 4
MAX_CHAIN = 32
SYMBOL = re.compile(
    r"^(?P<module>.+?)(?:!(?P<name>[^!+]+)(?:\+(?P<offset>0x[0-9a-f]+))?|\+(?P<rva>0x[0-9a-f]+))$"
)
ALL_SCENARIOS = sorted(p.stem for p in SCENARIOS.glob("*.json"))


class ModuleView:
    """One module as a process maps it, parsed by pefile (raw offsets equal RVAs)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        pe = pefile.PE(data=data, fast_load=True)
        pe.parse_data_directories(
            directories=[
                pefile.DIRECTORY_ENTRY["IMAGE_DIRECTORY_ENTRY_EXCEPTION"],
                pefile.DIRECTORY_ENTRY["IMAGE_DIRECTORY_ENTRY_DEBUG"],
            ]
        )
        self.entries = sorted(
            (f.struct.BeginAddress, f.struct.EndAddress, f.struct.UnwindData)
            for f in getattr(pe, "DIRECTORY_ENTRY_EXCEPTION", [])
        )
        self.by_begin = {e[0]: e for e in self.entries}
        debug = [d for d in getattr(pe, "DIRECTORY_ENTRY_DEBUG", []) if d.struct.Type == 2]
        self.codeview = debug[0].entry if debug and debug[0].entry else None
        self.names: dict[str, int] = {}
        self._starts = [e[0] for e in self.entries]

    def primary(self, rva: int) -> int | None:
        """Begin of the primary RUNTIME_FUNCTION of the function holding ``rva``."""
        index = bisect.bisect_right(self._starts, rva) - 1
        entry = self.entries[index] if index >= 0 and rva < self.entries[index][1] else None
        for _ in range(MAX_CHAIN):
            if entry is None:
                return None
            unwind = entry[2]
            flags, count = self.data[unwind] >> 3, self.data[unwind + 2]
            if not flags & UNW_FLAG_CHAININFO:
                return entry[0]
            parent = struct.unpack_from("<III", self.data, unwind + 4 + 2 * (count + count % 2))
            entry = self.by_begin.get(parent[0])
        raise AssertionError("chain too long")


def _module_bytes(image: RawImage, dtbs: list[int], base: int, size: int) -> bytes:
    """The module's pages, each from the first process that has it present (zeros where none
    does: a page-out everywhere)."""
    out = bytearray()
    for offset in range(0, size, 0x1000):
        page = next(
            (d for d in (image.read(dtb, base + offset, 0x1000) for dtb in dtbs) if d), None
        )
        out += page if page is not None else bytes(0x1000)
    return bytes(out)


def _pdb_names(paths: dict[str, Path], codeview: Any) -> dict[str, int]:
    if codeview is None:
        return {}
    guid = codeview.Signature_String[:32].upper()
    pdb = codeview.PdbFileName.rstrip(b"\0").decode("latin-1").rsplit("\\", 1)[-1]
    isf = paths["pdb_symbols"] / "windows" / pdb / f"{guid}-{codeview.Age}.json.xz"
    if not isf.exists():
        return {}
    with lzma.open(isf) as data:
        symbols = json.load(data)["symbols"]
    return {name: value["address"] for name, value in symbols.items()}


def _exports(data: bytes) -> dict[str, int]:
    pe = pefile.PE(data=data, fast_load=True)
    try:
        pe.parse_data_directories(
            directories=[pefile.DIRECTORY_ENTRY["IMAGE_DIRECTORY_ENTRY_EXPORT"]]
        )
    except pefile.PEFormatError:
        return {}
    exports = getattr(pe, "DIRECTORY_ENTRY_EXPORT", None)
    if exports is None:
        return {}
    return {e.name.decode("latin-1"): e.address for e in exports.symbols if e.name}


def _process_dtbs(reader: Reader) -> dict[int, int]:
    """PID -> DTB of every process reachable from PsActiveProcessHead either way (a damaged
    list may loop or break: each EPROCESS once, unreadable links end a walk)."""
    sym = reader.symbols
    head = reader.kernel_base + sym.symbol_rva("PsActiveProcessHead")
    links = sym.offset("_EPROCESS", "ActiveProcessLinks")
    found: dict[int, int] = {}
    for step in (0, 8):  # Flink, then Blink
        seen: set[int] = set()
        node = reader.image.qword(reader.dtb, head + step)
        while node is not None and node != head and node not in seen and len(seen) < 0x1000:
            seen.add(node)
            eproc = node - links
            try:
                pid = reader.field(eproc, "_EPROCESS", "UniqueProcessId")
                found[pid] = reader.field(eproc, "_EPROCESS", "Pcb.DirectoryTableBase")
            except AssertionError:
                break
            node = reader.image.qword(reader.dtb, node + step)
    return found


def _addresses(record: dict[str, Any]) -> list[tuple[int, str]]:
    """(address, symbol) of every symbolized column of a thread record and its frames."""
    pairs = [(record["rip"], record["symbol"])]
    for frame in record["frames"]:
        pairs += [(frame["rip"], frame["symbol"]), (frame["handler"], frame["handler_symbol"])]
    return [(a, s) for a, s in pairs if s is not None]


@pytest.mark.parametrize("scenario", ALL_SCENARIOS)
def test_every_offset_lies_in_the_function_of_its_name(images, scenario):
    paths = images.get(scenario, PROFILE)
    truth = images.truth(scenario, PROFILE)
    profile = images.profile(PROFILE)
    image = RawImage(paths["raw"])
    reader = Reader(image, SymbolTable.load(profile.isf_path), truth["dtb"], truth["kernel_base"])
    dtb_of = _process_dtbs(reader)
    layouts: dict[int, tuple[str, int, int]] = {}
    mapped_by: dict[int, list[int]] = {}
    for proc in truth["processes"]:
        for m in proc["modules"]:
            layouts[m["base"]] = (m["name"], m["base"], m["size"])
            if proc["pid"] in dtb_of:
                mapped_by.setdefault(m["base"], []).append(dtb_of[proc["pid"]])
    views: dict[int, ModuleView] = {}
    checked = 0
    for record in truth["threads"]:
        for address, symbol in _addresses(record):
            match = SYMBOL.match(symbol)
            assert match, symbol
            base = next(b for b, (_n, _b, size) in layouts.items() if b <= address < b + size)
            name, _base, size = layouts[base]
            assert match["module"] == name, (symbol, name)
            rva = address - base
            if match["rva"] is not None:
                assert int(match["rva"], 16) == rva, symbol
                continue
            if base not in views:
                views[base] = ModuleView(_module_bytes(image, mapped_by[base], base, size))
                views[base].names = {
                    **_exports(views[base].data),
                    **_pdb_names(paths, views[base].codeview),
                }
            view = views[base]
            offset = int(match["offset"] or "0x0", 16)
            at = rva - offset
            # The name is one the module's export table or its PDB table puts at that address.
            assert view.names.get(match["name"]) == at, symbol
            if offset == 0:
                continue
            primary, name_primary = view.primary(rva), view.primary(at)
            if primary is not None or name_primary is not None:
                assert primary == name_primary, (
                    f"{symbol}: {rva:#x} and {at:#x} in different functions"
                )
            else:
                assert offset < LEAF_SPAN, f"{symbol}: a leaf offset beyond {LEAF_SPAN:#x}"
            checked += 1
    assert checked > 0 or scenario in ("fuzz-deep",), "no module!name+0xN in the truth file"
