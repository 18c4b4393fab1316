"""windows.kcbstack against the builder's ground truth: every frame of every thread, on every
profile, raw and crash dump (docs/output-contract.md, "windows.kcbstack")."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import ALL_PROFILES
from tests.support.volrun import run_plugin

PLUGIN = "windows.kcbstack.KcbStack"
SCENARIOS = ["basic", "nt-only", "real-machine", "tables", "symbols", "population", "stacks"]
COLUMNS = {
    "Frame": "frame",
    "CallbackLevel": "callback_level",
    "Rip": "rip",
    "Symbol": "symbol",
    "Rsp": "rsp",
    "How": "how",
    "Notes": "notes",
}


def threads_of(rows: list[dict[str, Any]]) -> list[tuple[int, int, str, list[dict[str, Any]]]]:
    """Rows grouped per thread: a thread's rows start at Frame 0 (or its single null row)."""
    threads: list[tuple[int, int, str, list[dict[str, Any]]]] = []
    for row in rows:
        assert row["__children"] == []
        if row["Frame"] in (0, None) or not threads:
            threads.append((row["PID"], row["TID"], row["Process"], []))
        pid, tid, process, frames = threads[-1]
        assert (row["PID"], row["TID"], row["Process"]) == (pid, tid, process)
        frames.append({key: row[column] for column, key in COLUMNS.items()})
    return threads


def expected(truth: dict[str, Any], listed) -> list[tuple[int, int, str, list[dict[str, Any]]]]:
    return [
        (t["pid"], t["tid"], t["process"], t["stack"]) for t in truth["threads"] if listed(t)
    ]


@pytest.mark.parametrize("fmt", ["raw", "dmp"])
@pytest.mark.parametrize("profile", ALL_PROFILES)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_frame_of_every_thread(images, scenario, profile, fmt):
    paths = images.get(scenario, profile)
    truth = images.truth(scenario, profile)
    rows = run_plugin(
        paths[fmt], PLUGIN, [paths["symbols"], paths["pdb_symbols"]], {"all-threads": True}
    )
    assert threads_of(rows) == expected(truth, lambda t: True)


@pytest.mark.parametrize("profile", ["lab", "22000"])
def test_default_mode_lists_kcbwaits_threads(images, profile):
    paths = images.get("stacks", profile)
    truth = images.truth("stacks", profile)
    rows = run_plugin(paths["raw"], PLUGIN, [paths["symbols"], paths["pdb_symbols"]], {})
    assert threads_of(rows) == expected(truth, lambda t: t["reason"] != "none")


DAMAGE_SCENARIOS = ["damaged-threads", "damaged-lists", "hostile-names", "fuzz-deep"]


@pytest.mark.parametrize("profile", ALL_PROFILES)
@pytest.mark.parametrize("scenario", DAMAGE_SCENARIOS)
def test_damaged_images_every_frame(images, scenario, profile):
    """Damaged kernel and user structures (tests/test_damage_truth.py for kcbwait's rows):
    the stacks of every thread still equal the truth, notes included."""
    paths = images.get(scenario, profile)
    truth = images.truth(scenario, profile)
    rows = run_plugin(paths["raw"], PLUGIN, [paths["symbols"]], {"all-threads": True})
    assert threads_of(rows) == expected(truth, lambda t: True)
