"""windows.kcbwait against the builder's ground truth, every profile, raw and crash dump.

The plugin's JSON-shaped output must equal the truth file exactly: rows, order, every
column and every callback frame, for the default mode and each option.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import ALL_PROFILES
from tests.support.volrun import run_plugin

PLUGIN = "windows.kcbwait.KcbWait"
# real-machine: tests/test_real_machine.py; tables: tests/test_kcbtable_truth.py;
# symbols: tests/test_symbols_scenario.py
SCENARIOS = ["basic", "nt-only", "real-machine", "tables", "symbols", "population", "stacks"]
THREAD_COLUMNS = {"PID": "pid", "TID": "tid", "Process": "process", "Wow64": "wow64",
                  "Reason": "reason", "State": "state", "WaitReason": "wait_reason",
                  "NestingLevel": "nesting_level", "Rip": "rip", "Symbol": "symbol",
                  "Rsp": "rsp", "Table": "table", "KernelSide": "kernel_side",
                  "Notes": "notes"}
FRAME_COLUMNS = {"Level": "level", "Rip": "rip", "Symbol": "symbol", "Rsp": "rsp",
                 "Frame": "frame", "ApiNumber": "api_number", "Handler": "handler",
                 "HandlerSymbol": "handler_symbol", "Callback": "callback", "Table": "table",
                 "Buffer": "buffer", "Length": "length", "KernelSide": "kernel_side",
                 "Notes": "notes"}
THREAD_ONLY_NULL = ("Frame", "ApiNumber", "Handler", "HandlerSymbol", "Callback", "Buffer",
                    "Length")



def kcbwait_view(truth: dict[str, Any]) -> list[dict[str, Any]]:
    """The truth file's thread records without what windows.kcbstack reports (``stack``)."""
    return [{k: v for k, v in t.items() if k != "stack"} for t in truth["threads"]]

def as_truth(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Plugin rows in the truth file's shape, checking the columns each row kind leaves empty."""
    records = []
    for row in rows:
        assert row["Level"] == 0
        assert all(row[c] is None for c in THREAD_ONLY_NULL), row
        record = {key: row[col] for col, key in THREAD_COLUMNS.items()}
        record["frames"] = []
        for child in row["__children"]:
            assert child["Reason"] == "callback"
            assert (child["PID"], child["TID"]) == (row["PID"], row["TID"])
            assert child["State"] is None and child["WaitReason"] is None
            assert child["__children"] == []
            record["frames"].append({key: child[col] for col, key in FRAME_COLUMNS.items()})
        records.append(record)
    return records


MODES = {
    "default": ({}, lambda t: t["reason"] != "none"),
    "at-return-only": ({"at-return-only": True}, lambda t: "at-return" in t["reason"]),
    "all-threads": ({"all-threads": True}, lambda t: True),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("fmt", ["raw", "dmp"])
@pytest.mark.parametrize("profile", ALL_PROFILES)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_output_equals_truth(images, scenario, profile, fmt, mode):
    paths = images.get(scenario, profile)
    truth = images.truth(scenario, profile)
    options, listed = MODES[mode]
    # The modules' PDB symbol tables the scenario asked for: Volatility finds them offline only
    # through its identifier cache, which indexes every ISF under the -s directories.
    rows = run_plugin(paths[fmt], PLUGIN, [paths["symbols"], paths["pdb_symbols"]], options)
    assert as_truth(rows) == [t for t in kcbwait_view(truth) if listed(t)]


@pytest.mark.parametrize("profile", ALL_PROFILES)
def test_pid_and_tid_filters(images, profile):
    paths = images.get("basic", profile)
    truth = images.truth("basic", profile)
    rows = run_plugin(paths["raw"], PLUGIN, [paths["symbols"]], {"pid": [2468, 3580]})
    assert as_truth(rows) == [t for t in kcbwait_view(truth)
                              if t["pid"] in (2468, 3580) and t["reason"] != "none"]
    rows = run_plugin(paths["raw"], PLUGIN, [paths["symbols"]],
                      {"tid": [1236, 1248], "all-threads": True})
    assert as_truth(rows) == [t for t in kcbwait_view(truth) if t["tid"] in (1236, 1248)]
