"""Damaged images from the builder: windows.kcbwait reports exactly what the truth file says.

Each scenario under testdata/scenarios/damaged-*.json and hostile-names.json declares its damage
(per thread, per process, per image); the builder applies it through its own address spaces and
writes what the plugin must then print: damaged threads keep their rows with null columns and
the contract's notes, undamaged threads are untouched, no thread is lost and none is invented.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from imagebuilder import damage
from imagebuilder.build import build_image
from imagebuilder.isf import SymbolTable
from imagebuilder.scenario import parse_scenario
from tests.conftest import ALL_PROFILES, SCENARIOS
from tests.support.volrun import run_plugin
from tests.test_kcbwait_truth import as_truth

PLUGIN = "windows.kcbwait.KcbWait"
DAMAGED = ["damaged-threads", "damaged-lists", "hostile-names"]
# ntdll damage varies the image, not the kernel: the lab table plus one build per way the
# kernel records KiUserCallbackDispatcher (KeUserCallbackDispatcher, PsNtdllExports) suffice.
NTDLL_PROFILES = [p for p in ALL_PROFILES if p.id in ("lab", "19041", "22000")]



def kcbwait_view(truth: dict[str, Any]) -> list[dict[str, Any]]:
    """The truth file's thread records without what windows.kcbstack reports (``stack``)."""
    return [{k: v for k, v in t.items() if k != "stack"} for t in truth["threads"]]

def _by_tid(truth: dict[str, Any]) -> dict[tuple[int, int], dict[str, Any]]:
    return {(t["pid"], t["tid"]): t for t in truth["threads"]}


@pytest.mark.parametrize("profile", ALL_PROFILES)
@pytest.mark.parametrize("scenario", DAMAGED)
def test_damaged_image_equals_truth(images, scenario, profile):
    paths = images.get(scenario, profile)
    truth = images.truth(scenario, profile)
    rows = run_plugin(paths["raw"], PLUGIN, [paths["symbols"]], {"all-threads": True})
    assert as_truth(rows) == kcbwait_view(truth)


@pytest.mark.parametrize("fmt", ["raw", "dmp"])
def test_default_mode_lists_damaged_threads_in_callbacks(images, fmt):
    paths = images.get("damaged-threads", "lab")
    truth = images.truth("damaged-threads", "lab")
    rows = run_plugin(paths[fmt], PLUGIN, [paths["symbols"]])
    assert as_truth(rows) == [t for t in kcbwait_view(truth) if t["reason"] != "none"]


def test_thread_damage_outcomes_as_the_contract_words_them(images):
    """A few outcomes spelled out, so that a builder mistake shared with the plugin shows."""
    threads = _by_tid(images.truth("damaged-threads", "lab"))
    pid = 5000
    # KTHREAD.TrapFrame null: T(K) (the current segment's trap frame) still gives the values.
    null = threads[(pid, 5008)]
    assert null["notes"] == "KTHREAD.TrapFrame differs: 0x0"
    assert null["symbol"] == "ntdll.dll!NtCallbackReturn+0x14"
    assert null["reason"] == "at-return+in-callback" and len(null["frames"]) == 1
    unmapped = threads[(pid, 5012)]
    assert unmapped["notes"] == f"KTHREAD.TrapFrame differs: {damage.UNMAPPED_KERNEL:#x}"
    kernel_mode = threads[(pid, 5016)]
    assert (kernel_mode["rip"], kernel_mode["notes"]) == (None, "no user-mode trap frame")
    assert [f["kernel_side"] for f in kernel_mode["frames"]] == ["agrees"]
    teb = threads[(pid, 5020)]
    assert teb["notes"] == "unreadable: TEB" and len(teb["frames"]) == 2
    paged = threads[(pid, 5024)]
    assert paged["notes"] == (
        "callback frames found: 0, CallbackNestingLevel: 1; unreadable: user stack"
    )
    assert paged["kernel_side"] == "unreadable: user stack"
    (level,) = paged["frames"]
    assert (level["level"], level["api_number"], level["rsp"], level["notes"]) == (
        1,
        None,
        None,
        "unreadable: user stack",
    )
    assert level["rip"] is not None and level["frame"] is not None
    assert threads[(pid, 5028)]["notes"] == "invalid: TEB stack bounds"
    assert threads[(pid, 5036)]["notes"] == "invalid: Rsp outside the TEB stack"
    loop = threads[(pid, 5040)]
    assert loop["notes"] == "callback frames found: 1, CallbackNestingLevel: 2"
    assert loop["kernel_side"] == "mismatch"
    outer, inner = loop["frames"]
    assert outer["kernel_side"] == f"mismatch: Frame {outer['frame']:#x} is not a UCALLOUT_FRAME"
    assert outer["rsp"] == outer["frame"]  # MachineFrame.Rsp as read: the frame itself
    assert (inner["level"], inner["kernel_side"]) == (2, "agrees")
    assert [f["level"] for f in threads[(pid, 5048)]["frames"]] == [1, 2, 3]
    assert threads[(pid, 5052)]["frames"][0]["length"] == 0xFFFFFFFF
    api = threads[(pid, 5056)]["frames"][1]
    assert (api["api_number"], api["handler"], api["notes"]) == (65536, None, "invalid: ApiNumber")
    near = threads[(pid, 5060)]["frames"][0]
    assert (near["api_number"], near["handler"], near["notes"]) == (200, 0, "")
    assert threads[(pid, 5064)]["notes"] == (
        "kernel callout levels: 2, CallbackNestingLevel: 255; "
        "callback frames found: 2, CallbackNestingLevel: 255"
    )
    # No callout level: the TEB is not read, so its damage does not show.
    no_levels = threads[(pid, 5068)]
    assert no_levels["notes"] == (
        "kernel callout levels: 0, CallbackNestingLevel: 2; "
        "callback frames found: 0, CallbackNestingLevel: 2"
    )
    assert (no_levels["reason"], no_levels["kernel_side"]) == ("in-callback", None)
    assert threads[(6000, 6004)]["frames"][0]["notes"] == "invalid: KernelCallbackTable"
    assert threads[(6100, 6104)]["notes"] == "unreadable: KernelCallbackTable"
    for healthy in ((pid, 5004), (pid, 5072), (6200, 6204)):
        assert threads[healthy]["notes"] == ""
        assert threads[healthy]["kernel_side"] == "agrees"


def test_list_damage_keeps_every_thread_and_warns(images, caplog):
    paths = images.get("damaged-lists", "lab")
    truth = images.truth("damaged-lists", "lab")
    # PsActiveProcessHead walk: forward stops at 7100's unmapped Flink, backward adds the rest.
    assert [p["pid"] for p in truth["processes"]] == [4, 7000, 7100, 7400, 7300, 7200]
    with caplog.at_level(logging.WARNING, logger="volatility3.plugins.windows.kcbwait"):
        rows = run_plugin(paths["raw"], PLUGIN, [paths["symbols"]], {"all-threads": True})
    assert as_truth(rows) == kcbwait_view(truth)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("PID 7000" in w and "link back to an earlier entry" in w for w in warnings)
    assert any("PID 7100" in w and "KTHREAD list" in w for w in warnings)
    assert any("PID 7200" in w and "unreadable link" in w for w in warnings)
    assert any(
        "PID 7300" in w and "passed over 1 entries that are not threads" in w for w in warnings
    )
    # The forged copy of thread 7004 in process 7300 is reported, marked, with its own values.
    clone = [t for t in truth["threads"] if (t["pid"], t["tid"]) == (7400, 7004)]
    original = [t for t in truth["threads"] if (t["pid"], t["tid"]) == (7000, 7004)]
    assert clone[0]["notes"] == "mismatch: KTHREAD.Process is PID 7000"
    assert clone[0]["frames"] == original[0]["frames"]


def _variant(base: str, edit) -> dict[str, Any]:
    data = json.loads((SCENARIOS / f"{base}.json").read_text())
    edit(data)
    return data


def _build(tmp_path: Path, images, data: dict[str, Any], profile: str) -> dict[str, Path]:
    prof = images.profile(profile)
    image = build_image(parse_scenario(data), SymbolTable.load(prof.isf_path), prof.build)
    paths = image.write(tmp_path, data["name"], ("raw",))
    paths["symbols"] = prof.symbols_dir
    return paths


def test_process_list_that_revisits_a_process(images, tmp_path):
    data = _variant(
        "damaged-lists",
        lambda d: d["damage"].update(process_list={"at": 7200, "kind": "revisit", "to": 7000}),
    )
    paths = _build(tmp_path, images, data, "lab")
    truth = json.loads(paths["truth"].read_text())
    rows = run_plugin(paths["raw"], PLUGIN, [paths["symbols"]], {"all-threads": True})
    assert as_truth(rows) == kcbwait_view(truth)
    assert sorted({t["pid"] for t in truth["threads"]}) == [4, 7000, 7100, 7200, 7300, 7400]


NTDLL_CASES = {
    "paged-out-everywhere": lambda d: [
        p.update(page_out=["ntdll_exports"]) for p in d["processes"]
    ],
    "lying_header": lambda d: d.update(damage={"ntdll_exports": "lying_header"}),
    "absurd_counts": lambda d: d.update(damage={"ntdll_exports": "absurd_counts"}),
    "absurd_rvas": lambda d: d.update(damage={"ntdll_exports": "absurd_rvas"}),
    "unterminated_names": lambda d: d.update(damage={"ntdll_exports": "unterminated_names"}),
    "decoy_alias": lambda d: d.update(damage={"ntdll_exports": "decoy_alias"}),
}


@pytest.mark.parametrize("profile", NTDLL_PROFILES)
@pytest.mark.parametrize("case", list(NTDLL_CASES))
def test_ntdll_export_damage(images, tmp_path, case, profile):
    data = _variant("basic", NTDLL_CASES[case])
    data["name"] = f"ntdll-{case}"
    paths = _build(tmp_path, images, data, profile)
    truth = json.loads(paths["truth"].read_text())
    rows = run_plugin(paths["raw"], PLUGIN, [paths["symbols"]], {"all-threads": True})
    assert as_truth(rows) == kcbwait_view(truth)
    resting = _by_tid(truth)[(1232, 1248)]
    if case in ("paged-out-everywhere", "lying_header", "absurd_counts", "unterminated_names"):
        word = "unreadable" if case == "paged-out-everywhere" else "invalid"
        assert resting["notes"] == f"{word}: ntdll exports"
        assert resting["reason"] == "in-callback"  # at-return cannot be decided
        inventory = next(p for p in truth["processes"] if p["pid"] == 1232)
        ntdll = next(m for m in inventory["modules"] if m["name"] == "ntdll.dll")
        stub = inventory["exports"]["ntdll.dll"]["NtCallbackReturn"] + 0x14
        assert resting["symbol"] == f"ntdll.dll+{stub - ntdll['base']:#x}"
        assert len(resting["frames"]) == 3  # the kernel still names the dispatcher
    elif case == "decoy_alias":
        assert resting["symbol"] == "ntdll.dll!KiCallbackReturnDecoy+0x14"
        assert resting["reason"] == "at-return+in-callback"
    else:
        assert resting["symbol"] == "ntdll.dll!NtCallbackReturn+0x14"


def test_damage_does_not_change_the_undamaged_threads(images):
    """The control threads of the damaged image equal the same threads built undamaged."""
    data = json.loads((SCENARIOS / "damaged-threads.json").read_text())
    clean = copy.deepcopy(data)
    for proc in clean["processes"]:
        proc.pop("damage", None)
        for thread in proc["threads"]:
            thread.pop("damage", None)
    prof = images.profile("lab")
    table = SymbolTable.load(prof.isf_path)
    damaged = _by_tid(build_image(parse_scenario(data), table, prof.build).truth)
    healthy = _by_tid(build_image(parse_scenario(clean), table, prof.build).truth)
    for key in ((5000, 5004), (5000, 5072), (6200, 6204), (6200, 6208)):
        assert damaged[key] == healthy[key]
