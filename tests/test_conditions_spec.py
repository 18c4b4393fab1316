"""The builder's ``conditions`` fields: validated like every other field, exact messages.

No Volatility run: a wrong condition is an error naming the field path, and a few builder
facts behind the conditions (stack plan, per-thread generator) hold.
"""

from __future__ import annotations

import json
import re

import pytest

from imagebuilder import conditions
from imagebuilder.conditions_spec import ThreadCondition
from imagebuilder.scenario import ScenarioError, parse_scenario
from tests.conftest import SCENARIOS


def _load() -> dict:
    return json.loads((SCENARIOS / "real-machine.json").read_text())


def _thread(data: dict, tid: int) -> dict:
    return next(t for p in data["processes"] for t in p["threads"] if t["tid"] == tid)


def _process(data: dict, pid: int) -> dict:
    return next(p for p in data["processes"] if p["pid"] == pid)


T0 = "scenario.processes[0].threads[0].conditions"  # 4104: idle
T1 = "scenario.processes[0].threads[1].conditions"  # 4108: 2 callbacks
T2 = "scenario.processes[0].threads[2].conditions"  # 4112: 1 callback
P2 = "scenario.processes[2].conditions"  # hooked.exe
CASES = [
    (lambda d: _thread(d, 4104).update(conditions="stale"), f"{T0}: expected a list, got str"),
    (
        lambda d: _thread(d, 4104).update(conditions=["swapped"]),
        f"{T0}[0]: 'swapped' is not one of kernel_stack_swapped, stale_trap_frame",
    ),
    (
        lambda d: _thread(d, 4104).update(conditions=["stale_frame"]),
        f'{T0}[0]: stale_frame takes parameters: {{"kind": "stale_frame", "at": ...}}',
    ),
    (
        lambda d: _thread(d, 4104).update(conditions=[5]),
        f"{T0}[0]: expected a kind name or an object, got 5",
    ),
    (
        lambda d: _thread(d, 4104).update(conditions=[{"kind": "stale"}]),
        f"{T0}[0].kind: 'stale' is not one of stale_frame, user_frame_paged_out,"
        " deep_handler_stack, forged_callout_trap_frame, forged_trap_rip, forged_trap_rsp",
    ),
    (
        lambda d: _thread(d, 4104).update(
            conditions=[{"kind": "stale_frame", "at": "below_rsp", "depth": 3}]
        ),
        f"{T0}[0]: unknown field 'depth' (known: at, kind, level)",
    ),
    (
        lambda d: _thread(d, 4104).update(conditions=[{"kind": "stale_frame", "at": "middle"}]),
        f"{T0}[0].at: 'middle' is not one of above_rsp, below_rsp, handler_locals",
    ),
    (
        lambda d: _thread(d, 4104).update(
            conditions=[{"kind": "stale_frame", "at": "above_rsp", "level": 1}]
        ),
        f"{T0}[0].level: only a stale frame in handler_locals has one",
    ),
    (
        lambda d: _thread(d, 4104).update(
            conditions=[{"kind": "stale_frame", "at": "handler_locals", "level": 1}]
        ),
        f"{T0}[0]: handler_locals needs a thread with callbacks",
    ),
    (
        lambda d: _thread(d, 4108).update(
            conditions=[{"kind": "stale_frame", "at": "handler_locals"}]
        ),
        f"{T1}[0].level: missing",
    ),
    (
        lambda d: _thread(d, 4108).update(conditions=[{"kind": "user_frame_paged_out"}]),
        f"{T1}[0].level: missing",
    ),
    (
        lambda d: _thread(d, 4108).update(
            conditions=[{"kind": "user_frame_paged_out", "level": 3}]
        ),
        f"{T1}[0].level: 3 is outside 1..2",
    ),
    (
        lambda d: _thread(d, 4108).update(
            conditions=[{"kind": "forged_trap_rip", "level": "inner"}]
        ),
        f"{T1}[0].level: expected an integer, got 'inner'",
    ),
    (
        lambda d: _thread(d, 4104).update(conditions=[{"kind": "forged_trap_rip", "level": 1}]),
        f"{T0}[0]: forged_trap_rip needs a thread with callbacks",
    ),
    (
        lambda d: _thread(d, 4112).update(conditions=[{"kind": "deep_handler_stack", "level": 1}]),
        f"{T2}[0]: deep_handler_stack lies between two levels; the thread has 1",
    ),
    (
        lambda d: _thread(d, 4108).update(conditions=[{"kind": "deep_handler_stack", "level": 2}]),
        f"{T1}[0].level: 2 is outside 1..1",
    ),
    (
        lambda d: _thread(d, 4108).update(
            conditions=[{"kind": "deep_handler_stack", "level": 1, "size": 4096}]
        ),
        f"{T1}[0].size: 4096 is outside 262145..786432",
    ),
    (
        lambda d: _thread(d, 4108).update(
            conditions=["kernel_stack_swapped", {"kind": "forged_trap_rsp", "level": 1}]
        ),
        f"{T1}: kernel_stack_swapped cannot be combined with forged_trap_rsp"
        " (its outcome needs a resident kernel stack)",
    ),
    (
        lambda d: _thread(d, 4108).update(conditions=["kernel_stack_swapped", "stale_trap_frame"]),
        f"{T1}: kernel_stack_swapped cannot be combined with stale_trap_frame"
        " (its outcome needs a resident kernel stack)",
    ),
    (
        lambda d: _thread(d, 4108).update(
            conditions=[
                {"kind": "stale_frame", "at": "below_rsp"},
                {"kind": "stale_frame", "at": "below_rsp"},
            ]
        ),
        f"{T1}: a condition is listed twice",
    ),
    (
        lambda d: _thread(d, 4108).update(
            conditions=[
                {"kind": "forged_trap_rsp", "level": 1},
                {"kind": "stale_frame", "at": "handler_locals", "level": 1},
            ]
        ),
        f"{T1}: forged_trap_rsp on level 1 points into the handler locals that hold its"
        " stale frame; use another level",
    ),
    (
        lambda d: _thread(d, 4108).update(damage=["teb_paged_out"]),
        f"{T1}: a thread declares conditions or damage, not both (use two threads)",
    ),
    (
        lambda d: _process(d, 4200)["threads"].append(
            {"tid": 4224, "kind": "system", "conditions": ["stale_trap_frame"]}
        ),
        "scenario.processes[1].threads[5].conditions: only user threads have these conditions",
    ),
    (
        lambda d: _process(d, 4300).update(conditions=[{"kind": "patched", "module": "x"}]),
        f"{P2}[0].kind: 'patched' is not one of hooked_dispatcher",
    ),
    (
        lambda d: _process(d, 4300).update(conditions=[{"kind": "hooked_dispatcher"}]),
        f"{P2}[0].module: missing",
    ),
    (
        lambda d: _process(d, 4300).update(
            conditions=[{"kind": "hooked_dispatcher", "module": "absent.dll"}]
        ),
        f"{P2}[0].module: 'absent.dll' must be one of the process's modules other than"
        " ntdll.dll, win32u.dll, user32.dll",
    ),
    (
        lambda d: _process(d, 4300).update(
            conditions=[{"kind": "hooked_dispatcher", "module": "user32.dll"}]
        ),
        f"{P2}[0].module: 'user32.dll' must be one of the process's modules other than"
        " ntdll.dll, win32u.dll, user32.dll",
    ),
    (
        lambda d: _process(d, 4300).update(conditions=["hooked_dispatcher"]),
        f"{P2}[0]: expected an object, got str",
    ),
    (
        lambda d: _process(d, 4300).update(
            conditions=[{"kind": "hooked_dispatcher", "module": "edrhook.dll", "jmp": 1}]
        ),
        f"{P2}[0]: unknown field 'jmp' (known: kind, module)",
    ),
]


@pytest.mark.parametrize(("mutate", "message"), CASES)
def test_malformed_conditions_name_the_bad_field(mutate, message):
    data = _load()
    mutate(data)
    with pytest.raises(ScenarioError, match=f"^{re.escape(message)}$"):
        parse_scenario(data)


def test_the_real_machine_scenario_parses_as_declared():
    scenario = parse_scenario(_load())
    threads = {t.tid: t for p in scenario.processes for t in p.threads}
    assert threads[4120].conditions == (
        ThreadCondition("kernel_stack_swapped"),
        ThreadCondition("stale_frame", at="below_rsp"),
    )
    assert threads[4132].conditions == (
        ThreadCondition("deep_handler_stack", level=1, size=0x48000),
    )
    hooked = next(p for p in scenario.processes if p.pid == 4300)
    assert [(c.kind, c.module) for c in hooked.conditions] == [("hooked_dispatcher", "edrhook.dll")]


def test_stack_plan_follows_the_conditions():
    plan = conditions.stack_plan(
        (
            ThreadCondition("user_frame_paged_out", level=2),
            ThreadCondition("deep_handler_stack", level=1, size=0x50000),
            ThreadCondition("stale_frame", at="below_rsp"),
        ),
        levels=3,
    )
    # Level 2's frame gets pages of its own: the locals above it (level 1's) and below it.
    assert plan.min_gaps == {1: 0x50000, 2: conditions.SEPARATE_PAGES}
    assert plan.hollow == frozenset({1})
    assert plan.below_rsp == conditions.BELOW_RSP_ROOM


def test_conditions_draw_from_a_generator_of_their_own():
    """A thread's conditions never shift the bytes of the threads laid out after it."""
    first = conditions.condition_rng(31, 4100, 4104).random()
    assert first == conditions.condition_rng(31, 4100, 4104).random()
    assert first != conditions.condition_rng(31, 4100, 4108).random()
