"""The scenario fields of the symbols part: ``pdb_symbols``, ``page_out`` of a CodeView record,
callback overrides into a module's own code; their validation (errors name the field) and the
truth they lead to (docs/output-contract.md, "Symbols")."""

from __future__ import annotations

import copy
import json
import re

import pytest

from imagebuilder.build import build_image
from imagebuilder.isf import SymbolTable
from imagebuilder.scenario import ScenarioError, parse_scenario
from tests.conftest import SCENARIOS


def _symbols() -> dict:
    return json.loads((SCENARIOS / "symbols.json").read_text())


def _edit(edit) -> dict:
    data = copy.deepcopy(_symbols())
    edit(data)
    return data


OVERRIDES = "scenario.processes[1].callback_overrides"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda s: s.update(pdb_symbols="user32.dll"),
            "scenario.pdb_symbols: expected a list, got str",
        ),
        (
            lambda s: s.update(pdb_symbols=["user32.dll", 7]),
            "scenario.pdb_symbols[1]: expected a non-empty string, got 7",
        ),
        (
            lambda s: s.update(pdb_symbols=["user32.dll", "absent.dll"]),
            "scenario.pdb_symbols[1]: absent.dll is not a module of any process",
        ),
        (
            lambda s: s.update(pdb_symbols=["ntdll.dll", "ntdll.dll"]),
            "scenario.pdb_symbols[1]: ntdll.dll is listed twice",
        ),
        (
            lambda s: s["processes"][0].update(page_out=["user32_codeview", "kernel32_codeview"]),
            "scenario.processes[0].page_out: unknown target 'kernel32_codeview'; known: "
            "ntdll_exports, ntdll_codeview, user32_codeview",
        ),
        (
            lambda s: s["processes"][0].update(
                modules=["ntdll.dll", "win32u.dll"],
                threads=[{"tid": 1236}],
                page_out=["user32_codeview"],
            ),
            "scenario.processes[0].page_out[0]: user32_codeview needs user32.dll, which the "
            "process lacks",
        ),
        (
            lambda s: s["processes"][1]["callback_overrides"].update(
                {"7": {"module": "user32.dll"}}
            ),
            f"{OVERRIDES}[7].function: expected a non-empty string, got None",
        ),
        (
            lambda s: s["processes"][1]["callback_overrides"].update(
                {"7": {"module": "absent.dll", "function": "x"}}
            ),
            f"{OVERRIDES}[7].module: absent.dll is not one of the process's modules",
        ),
        (
            lambda s: s["processes"][1]["callback_overrides"].update(
                {"7": {"module": "user32.dll", "function": "x", "part": "cold"}}
            ),
            f"{OVERRIDES}[7].part: 'cold' is not 'chained'",
        ),
        (
            lambda s: s["processes"][1]["callback_overrides"].update(
                {"7": {"module": "user32.dll", "function": "x", "offset": -1}}
            ),
            f"{OVERRIDES}[7].offset: -1 is outside 0..65535",
        ),
        (
            lambda s: s["processes"][1]["callback_overrides"].update(
                {"7": {"module": "user32.dll", "function": "x", "colour": 1}}
            ),
            f"{OVERRIDES}[7]: unknown field 'colour'",
        ),
    ],
)
def test_scenario_errors_name_the_field(edit, message):
    with pytest.raises(ScenarioError, match=re.escape(message)):
        parse_scenario(_edit(edit))


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (
            {"module": "user32.dll", "function": "NoSuchRoutine"},
            f"{OVERRIDES}[7].function: 'NoSuchRoutine' is not a function of user32.dll",
        ),
        (
            {"module": "user32.dll", "function": "__fnDWORD", "part": "chained"},
            f"{OVERRIDES}[7].part: __fnDWORD has no chained part in user32.dll",
        ),
        (
            {"module": "hook.dll", "function": "hookPayload", "offset": 0xFFFF},
            f"{OVERRIDES}[7].offset: 0xffff is beyond hook.dll",
        ),
    ],
)
def test_code_targets_are_checked_against_the_built_module(images, target, message):
    data = _edit(lambda s: s["processes"][1]["callback_overrides"].update({"7": target}))
    profile = images.profile("lab")
    with pytest.raises(ScenarioError, match=re.escape(message)):
        build_image(parse_scenario(data), SymbolTable.load(profile.isf_path), profile.build)


def _frames(truth: dict) -> dict[tuple[int, int], dict]:
    return {(t["tid"], f["level"]): f for t in truth["threads"] for f in t["frames"]}


def test_symbols_truth_as_the_contract_words_it(images):
    truth = images.truth("symbols", "lab")
    frames = _frames(truth)
    user32 = next(m for p in truth["processes"] for m in p["modules"] if m["name"] == "user32.dll")

    def cells(tid: int, level: int) -> tuple:
        f = frames[(tid, level)]
        return f["handler_symbol"], f["callback"]

    # PDB names at the routines; two ApiNumbers sharing one routine get the same name.
    assert cells(1244, 1) == ("user32.dll!__fnDWORD", "__fnDWORD")
    assert cells(1244, 2) == ("user32.dll!__fnDWORD", "__fnDWORD")
    assert frames[(1244, 1)]["handler"] == frames[(1244, 2)]["handler"]
    assert (
        cells(1244, 3)
        == cells(1244, 4)
        == (
            "user32.dll!__fnINLPCREATESTRUCT",
            "__fnINLPCREATESTRUCT",
        )
    )
    # Entries rewritten in place: the original table now holds the hijack's target, which no
    # PDB symbol names exactly, so Callback is null.
    assert cells(2472, 1) == ("hook.dll!hookPayload", None)  # hook.dll's own PDB
    assert cells(2472, 2) == ("hook.dll!hookPayload+0x4", None)  # leaf rule: within 0x20
    assert cells(2472, 3) == ("hook.dll+0x2040", None)  # leaf rule: beyond 0x20
    # Inside the chained secondary part: resolved to the primary entry, named by the routine.
    assert cells(2476, 1) == ("user32.dll!__fnINLPCREATESTRUCT+0x26", None)
    assert cells(2476, 2) == ("user32.dll!__fnDWORD+0x8", None)
    # ntdll's separated cold fragment: in LdrLoadDll's function, but the nearest name below it
    # is another routine's, so the address is module+RVA.
    assert cells(2480, 1)[0].startswith("ntdll.dll+0x")
    assert cells(2480, 2) == ("ntdll.dll!LdrpDispatchUserCallTarget", None)
    # mspaint cannot read ntdll's CodeView record: export names (the CFG thunk has none).
    assert cells(3584, 1)[0] == f"ntdll.dll+{frames[(3584, 1)]['handler'] - 0x7FFBA1C00000:#x}"
    assert cells(3584, 2) == ("user32.dll!__fnDWORD", "__fnDWORD")
    # calc cannot read user32's: exports name nothing there, and there is no Callback.
    handler = frames[(4104, 1)]["handler"]
    assert cells(4104, 1) == (f"user32.dll+{handler - user32['base']:#x}", None)
    # System-call stubs keep their export names with or without PDB.
    assert frames[(1244, 1)]["symbol"] == "win32u.dll!NtUserDispatchMessage+0x14"
    resting = next(t for t in truth["threads"] if t["tid"] == 1240)
    assert resting["symbol"] == "ntdll.dll!NtCallbackReturn+0x14"
