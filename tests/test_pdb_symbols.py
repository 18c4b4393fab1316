"""CodeView records and PDB symbol tables of the builder's modules.

- every user module carries a debug directory with an RSDS record that pefile reads back
  (GUID, age >= 1, the PDB file name: Microsoft's modules and EXEs the bare name, a third-party
  DLL its full build path);
- the ISFs the scenario field ``pdb_symbols`` asks for pass Volatility's own schema, carry the
  RSDS identity in their metadata, and name every routine the builder laid out;
- Volatility itself finds and uses them offline: stock ``windows.pe_symbols`` resolves
  user32's unexported ``__fnDWORD`` and ``apfnDispatch`` through the table (it has no other
  source for those names).
"""

from __future__ import annotations

import json
import lzma
import struct

import pefile
import pytest

from imagebuilder.build import build_image
from imagebuilder.isf import SymbolTable
from imagebuilder.ntdll_image import build_ntdll
from imagebuilder.pdb_isf import module_isf
from imagebuilder.scenario import load_scenario
from imagebuilder.user32_image import build_user32
from imagebuilder.user_modules import EXE_BASE, OTHER_DLL_BASE, build_plain
from imagebuilder.win32u_image import build_win32u
from tests.conftest import SCENARIOS
from tests.support.volrun import run_plugin

GUID_HEX = set("0123456789ABCDEF")


@pytest.fixture(scope="module")
def modules():
    ntdll = build_ntdll(zw_alias=True)
    win32u = build_win32u()
    return {
        "ntdll.dll": ntdll,
        "win32u.dll": win32u,
        "user32.dll": build_user32(128, ntdll, win32u),
        "kernel32.dll": build_plain("kernel32.dll", 0x7FFB_9E80_0000, r"\W\kernel32.dll"),
        "hook.dll": build_plain("hook.dll", OTHER_DLL_BASE, r"\W\hook.dll"),
        "notepad.exe": build_plain("notepad.exe", EXE_BASE, r"\W\notepad.exe", dll=False),
    }


EXPECTED_PDB = {
    "ntdll.dll": "ntdll.pdb",
    "win32u.dll": "win32u.pdb",
    "user32.dll": "user32.pdb",
    "kernel32.dll": "kernel32.pdb",
    "hook.dll": r"C:\build\hook\x64\hook.pdb",
    "notepad.exe": "notepad.pdb",
}


@pytest.mark.parametrize("name", list(EXPECTED_PDB))
def test_pefile_reads_the_rsds_record_back(modules, name):
    module = modules[name]
    pe = pefile.PE(data=module.data)
    debug = [d for d in pe.DIRECTORY_ENTRY_DEBUG if d.struct.Type == 2]  # CODEVIEW
    assert len(debug) == 1
    entry = debug[0].entry
    assert entry.CvSignature == b"RSDS"
    assert entry.PdbFileName.rstrip(b"\0").decode() == EXPECTED_PDB[name]
    assert entry.Age >= 1
    guid = entry.Signature_String[:32]
    assert len(guid) == 32 and set(guid) <= GUID_HEX
    assert (guid, entry.Age) == (module.codeview.guid, module.codeview.age)
    # The record lies where the directory says, inside the image, in a read-only section.
    rva = debug[0].struct.AddressOfRawData
    assert module.data[rva : rva + 4] == b"RSDS"
    section = next(s for s in pe.sections if s.contains_rva(rva))
    assert not section.Characteristics & pefile.SECTION_CHARACTERISTICS["IMAGE_SCN_MEM_WRITE"]


def test_guids_identify_the_layout(modules):
    """The same build gives the same GUID; a different layout another."""
    assert build_ntdll(zw_alias=True).codeview == modules["ntdll.dll"].codeview
    assert build_ntdll(zw_alias=False).codeview.guid != modules["ntdll.dll"].codeview.guid
    other = build_user32(143, modules["ntdll.dll"], modules["win32u.dll"])
    assert other.codeview.guid != modules["user32.dll"].codeview.guid
    guids = {m.codeview.guid for m in modules.values()}
    assert len(guids) == len(modules)


def test_isf_passes_volatility_schema_and_carries_the_rsds_identity(modules):
    from volatility3 import schemas

    for name in ("user32.dll", "ntdll.dll", "hook.dll"):
        module = modules[name]
        isf = module_isf(module)
        assert schemas.validate(isf), name
        pdb = isf["metadata"]["windows"]["pdb"]
        assert pdb == {
            "GUID": module.codeview.guid,
            "age": module.codeview.age,
            "database": EXPECTED_PDB[name].rsplit("\\", 1)[-1],
            "machine_type": 34404,
        }
        assert isf["metadata"]["format"] == "6.1.0"
        assert (isf["base_types"], isf["user_types"], isf["enums"]) == ({}, {}, {})


def test_user32_pdb_names_the_callback_table_and_its_routines(modules):
    user32 = modules["user32.dll"]
    symbols = {n: v["address"] for n, v in module_isf(user32)["symbols"].items()}
    table = symbols["apfnDispatch"]
    assert table == user32.extras["callback_table"]
    entries = [
        struct.unpack_from("<Q", user32.data, table + 8 * i)[0] - user32.base for i in range(128)
    ]
    by_address: dict[int, list[str]] = {}
    for name, rva in symbols.items():
        by_address.setdefault(rva, []).append(name)
    names = [by_address[e] for e in entries]
    assert all(len(n) == 1 for n in names)  # one name per routine
    routines = {n[0] for n in names}
    assert len(routines) == len(set(entries))  # ~120 of 143 distinct in 19041: 107 of 128 here
    assert all(n.startswith(("__fn", "__Client", "__xxx")) for n in routines)
    assert names[2] == ["__fnDWORD"] and names[3] == ["__fnNCDESTROY"]
    # None of them is an export (real-binaries.md): only the PDB names them.
    assert not routines & set(user32.exports)


def test_ntdll_pdb_names_the_unexported_routines(modules):
    ntdll = modules["ntdll.dll"]
    symbols = {n: v["address"] for n, v in module_isf(ntdll)["symbols"].items()}
    assert symbols["LdrpDispatchUserCallTarget"] == ntdll.extras["cfg_thunk"]
    assert "LdrpDispatchUserCallTarget" not in ntdll.exports
    for name in ("KiUserCallbackDispatcher", "NtCallbackReturn", "ZwCallbackReturn"):
        assert symbols[name] == ntdll.exports[name]
    assert symbols.keys() >= ntdll.exports.keys()


def test_scenario_writes_isfs_for_the_listed_modules_only(tmp_path, images):
    profile = images.profile("lab")
    image = build_image(
        load_scenario(SCENARIOS / "symbols.json"), SymbolTable.load(profile.isf_path), profile.build
    )
    paths = image.write(tmp_path, "symbols")
    written = sorted(
        p.relative_to(paths["pdb_symbols"]) for p in paths["pdb_symbols"].rglob("*.xz")
    )
    by_name = {m.name: m for m in image.pdb_modules}
    assert sorted(by_name) == ["hook.dll", "ntdll.dll", "user32.dll"]
    assert [str(p.parent) for p in written] == [
        "windows/hook.pdb",
        "windows/ntdll.pdb",
        "windows/user32.pdb",
    ]
    for path in written:
        module = next(m for m in image.pdb_modules if m.codeview.pdb_name == path.parent.name)
        assert path.name == f"{module.codeview.guid}-{module.codeview.age}.json.xz"
        with lzma.open(paths["pdb_symbols"] / path) as data:
            assert json.load(data) == module_isf(module)


def test_volatility_resolves_pdb_names_offline(images):
    """Stock pe_symbols finds user32's RSDS record in memory, looks the table up in its
    identifier cache (built from the -s directories) and resolves names no export has."""
    paths = images.get("symbols", "lab")
    truth = images.truth("symbols", "lab")
    rows = run_plugin(
        paths["raw"],
        "windows.pe_symbols.PESymbols",
        [paths["symbols"], paths["pdb_symbols"]],
        {
            "source": "processes",
            "module": "user32.dll",
            "symbols": ["__fnDWORD", "apfnDispatch"],
        },
    )
    explorer = next(p for p in truth["processes"] if p["name"] == "explorer.exe")
    user32 = next(m for m in explorer["modules"] if m["name"] == "user32.dll")
    handler = next(
        f["handler"] for t in truth["threads"] for f in t["frames"] if f["callback"] == "__fnDWORD"
    )
    found = {(r["Symbol"], r["Address"]) for r in rows}
    assert ("__fnDWORD", handler) in found
    assert any(
        s == "apfnDispatch" and user32["base"] < a < user32["base"] + user32["size"]
        for s, a in found
    )
