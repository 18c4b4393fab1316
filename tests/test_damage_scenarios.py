"""The builder's ``damage`` fields: validated like every other field, modelled in the truth.

These tests need no Volatility run: they check that a wrong damage declaration is an error
naming the field, and what the builder's truth says for damage whose outcome is fixed by
docs/output-contract.md ("Damaged images").
"""

from __future__ import annotations

import json

import pytest

from imagebuilder import damage
from imagebuilder.build import build_image
from imagebuilder.isf import SymbolTable
from imagebuilder.profiles import lab_profile
from imagebuilder.scenario import ScenarioError, parse_scenario
from tests.conftest import SCENARIOS


def _load(name: str) -> dict:
    return json.loads((SCENARIOS / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    profile = lab_profile(tmp_path_factory.mktemp("symbols"))
    return profile, SymbolTable.load(profile.isf_path)


def _thread(data: dict, pid: int, tid: int) -> dict:
    proc = next(p for p in data["processes"] if p["pid"] == pid)
    return next(t for t in proc["threads"] if t["tid"] == tid)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda s: _thread(s, 1232, 1236).update(damage=["teb_vanished"]),
            r"threads\[0\]\.damage\[0\]: 'teb_vanished' is not one of trap_frame_null",
        ),
        (
            lambda s: _thread(s, 1232, 1236).update(damage="teb_paged_out"),
            r"threads\[0\]\.damage: expected a list",
        ),
        (
            lambda s: _thread(s, 1232, 1236).update(damage=["ucallout_loop"]),
            r"threads\[0\]\.damage: ucallout_loop needs a thread with callbacks",
        ),
        (
            lambda s: _thread(s, 1232, 1256).update(damage=["teb_paged_out"]),
            r"threads\[5\]\.damage: only user threads can be damaged",
        ),
        (
            lambda s: _thread(s, 1232, 1244).update(damage=["teb_paged_out", "rsp_outside_stack"]),
            r"threads\[2\]\.damage: teb_paged_out cannot be combined with rsp_outside_stack",
        ),
        (
            lambda s: _thread(s, 1232, 1244).update(
                damage=["trap_frame_null", "trap_frame_kernel"]
            ),
            r"threads\[2\]\.damage: at most one of trap_frame_null",
        ),
        (
            lambda s: _thread(s, 1232, 1244).update(
                damage=[{"kind": "api_number", "level": 3, "value": 1}]
            ),
            r"threads\[2\]\.damage\[0\]\.level: 3 is outside 1\.\.2",
        ),
        (
            lambda s: _thread(s, 1232, 1244).update(damage=[{"kind": "nesting_level"}]),
            r"threads\[2\]\.damage\[0\]\.value: missing",
        ),
        (
            lambda s: _thread(s, 1232, 1244).update(
                damage=[{"kind": "nesting_level", "value": 256}]
            ),
            r"damage\[0\]\.value: 256 is outside 0\.\.255",
        ),
        (
            lambda s: s["processes"][0].update(damage={"thread_list": {"at": 9, "kind": "cycle"}}),
            r"processes\[0\]\.damage\.thread_list\.at: 9 is not a thread of this process",
        ),
        (
            lambda s: s["processes"][0].update(
                damage={"thread_list": {"at": 1240, "kind": "cycle", "to": 1248}}
            ),
            r"thread_list\.to: 1248 must be a thread of this process listed at or before 'at'",
        ),
        (
            lambda s: s["processes"][0].update(damage={"kernel_callback_table": "gone"}),
            r"processes\[0\]\.damage\.kernel_callback_table: 'gone' is not one of null, unmapped",
        ),
        (
            lambda s: s.update(damage={"ntdll_exports": "shredded"}),
            r"scenario\.damage\.ntdll_exports: 'shredded' is not one of lying_header",
        ),
        (
            lambda s: s.update(
                damage={"process_list": {"at": 2468, "kind": "revisit", "to": 3580}}
            ),
            r"process_list\.to: 3580 must be a process listed at or before 'at'",
        ),
        (
            lambda s: s.update(damage={"foreign_threads": [{"tid": 1240, "into": 1232}]}),
            r"foreign_threads\[0\]\.into: 1232 must be another process's PID",
        ),
        (
            lambda s: s.update(damage={"colour": "red"}),
            r"scenario\.damage: unknown field 'colour'",
        ),
        (
            lambda s: s["processes"][0].update(name="\u202eevil.exe"),
            r"processes\[0\]\.name: EPROCESS\.ImageFileName holds bytes",
        ),
    ],
)
def test_malformed_damage_names_the_bad_field(mutate, message):
    data = _load("basic")
    mutate(data)
    with pytest.raises(ScenarioError, match=message):
        parse_scenario(data)


def test_every_process_may_page_out_ntdll_exports(lab):
    profile, symbols = lab
    data = _load("basic")
    for proc in data["processes"]:
        proc["page_out"] = ["ntdll_exports"]
    truth = build_image(parse_scenario(data), symbols, profile.build).truth
    user = [t for t in truth["threads"] if t["rip"] is not None]
    assert user and all(t["notes"].endswith("unreadable: ntdll exports") for t in user)
    assert all("at-return" not in t["reason"] for t in truth["threads"])
    assert all(t["symbol"].startswith(("ntdll.dll+0x", "win32u.dll!")) for t in user)


def test_walk_orders_follow_the_contract():
    # A Flink from entry 2 back to entry 0: forward 0,1,2; backward adds 3,4 in list order.
    assert damage.walk_order(5, {2: 0}) == [0, 1, 2, 3, 4]
    # A Flink from entry 1 into unmapped memory: same, nothing lost.
    assert damage.walk_order(4, {1: "stop"}) == [0, 1, 2, 3]
    # Volatility's pslist yields what its backward walk adds in the order it meets them.
    spec = parse_scenario(
        {**_load("damaged-lists"), "damage": {"process_list": {"at": 7000, "kind": "unmapped"}}}
    ).damage.process_list
    assert damage.process_list_order([4, 7000, 7100, 7200], spec) == [4, 7000, 7200, 7100]


def test_builder_records_regions_for_every_thread(lab):
    profile, symbols = lab
    image = build_image(parse_scenario(_load("basic")), symbols, profile.build)
    owners = set(image.regions.ranges)
    for record in image.truth["threads"]:
        assert ("thread", record["pid"], record["tid"]) in owners
        assert ("process", record["pid"]) in owners
        assert ("link", f"threads:{record['pid']}", record["tid"]) in owners
    assert ("link", "processes", "head") in owners and ("global",) in owners
    assert {"trap_frame", "ucallout_frame", "teb", "kthread", "ntdll_exports"} <= set(
        image.regions.targets
    )
