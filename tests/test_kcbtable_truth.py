"""windows.kcbtable against the builder's ground truth (truth file ``tables``), every profile,
raw and crash dump.

One row per process and table (pslist order; a WoW64 process's 32-bit table as a second row,
Bits 32), one child row per hijacked entry; docs/output-contract.md, "windows.kcbtable".
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import ALL_PROFILES
from tests.support.volrun import run_plugin

PLUGIN = "windows.kcbtable.KcbTable"
SCENARIOS = ["basic", "tables"]
ROW_COLUMNS = {"PID": "pid", "Process": "process", "Wow64": "wow64", "Bits": "bits",
               "Table": "table", "Owner": "owner", "Section": "section", "Entries": "entries",
               "Outside": "outside", "InstrumentationCallback": "instrumentation_callback",
               "InstrumentationTarget": "instrumentation_target", "Verdict": "verdict"}
ENTRY_COLUMNS = {"Index": "index", "Target": "target", "TargetSymbol": "target_symbol"}
REPEATED = ("PID", "Process", "Wow64", "Bits")  # child rows repeat the process's columns


def as_truth(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Plugin rows in the truth file's shape."""
    records = []
    for row in rows:
        assert all(row[c] is None for c in ENTRY_COLUMNS), row
        record = {key: row[col] for col, key in ROW_COLUMNS.items()}
        record["entries_outside"] = []
        for child in row["__children"]:
            assert all(child[c] == row[c] for c in REPEATED), child
            assert child["__children"] == []
            record["entries_outside"].append({key: child[c] for c, key in ENTRY_COLUMNS.items()})
        records.append(record)
    return records


@pytest.mark.parametrize("fmt", ["raw", "dmp"])
@pytest.mark.parametrize("profile", ALL_PROFILES)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_output_equals_truth(images, scenario, profile, fmt):
    paths = images.get(scenario, profile)
    truth = images.truth(scenario, profile)
    rows = run_plugin(paths[fmt], PLUGIN, [paths["symbols"]], {})
    assert as_truth(rows) == truth["tables"]
