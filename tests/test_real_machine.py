"""The conditions of real machines (testdata/scenarios/real-machine.json), every profile.

- windows.kcbwait's rows equal the truth file, raw and crash dump, in each listing mode
  (tests/test_kcbwait_truth.py runs the scenario with the others);
- the truth says what docs/output-contract.md ("Conditions of real machines") words, spelled
  out for each condition, so a builder mistake shared with the plugin shows;
- stock Volatility plugins still accept the images and list every process and thread, the
  ones whose kernel stacks are swapped out included;
- the image bytes, read back with plain struct reads (tests/support/readback.py), say what the
  truth says: each level's Frame is T(k-1).Rsp, swapped kernel stacks are not present, stale
  frames lie where the truth says no level is, the hook jumps out of the dispatcher.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest

from imagebuilder.isf import SymbolTable
from tests.conftest import ALL_PROFILES
from tests.support.readback import RawImage, Reader, ucallout_frame
from tests.support.volrun import run_plugin
from tests.test_builder_stock_plugins import ADDRESS_MASK

SCENARIO = "real-machine"
NOT_RESIDENT = "unreadable: kernel stack not resident"


def _by_tid(truth: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {t["tid"]: t for t in truth["threads"]}


# -- the truth, spelled out ------------------------------------------------------------------
@pytest.mark.parametrize("profile", ALL_PROFILES)
def test_conditions_outcomes_as_the_contract_words_them(images, profile):
    threads = _by_tid(images.truth(SCENARIO, profile))
    # Stale frames in live stack: the idle thread stays "none", the nested one has 2 levels.
    idle = threads[4104]
    assert (idle["reason"], idle["kernel_side"], idle["notes"], idle["frames"]) == (
        "none",
        None,
        "",
        [],
    )
    nested = threads[4108]
    assert [f["level"] for f in nested["frames"]] == [1, 2]
    assert (nested["kernel_side"], nested["notes"]) == ("agrees", "")
    # Kernel stacks swapped out: the fallback scan, levels 1..N when N frames are found.
    for tid, levels in ((4112, 1), (4116, 2)):
        swapped = threads[tid]
        assert (swapped["rip"], swapped["symbol"], swapped["rsp"]) == (None, None, None)
        assert swapped["notes"] == "kernel stack not resident"
        assert swapped["kernel_side"] == NOT_RESIDENT
        assert swapped["reason"] == "in-callback"
        assert [f["level"] for f in swapped["frames"]] == list(range(1, levels + 1))
        assert {f["kernel_side"] for f in swapped["frames"]} == {NOT_RESIDENT}
    # ... and N + 1 frames (a stale one below the innermost): no frame has a level.
    stale = threads[4120]
    assert stale["notes"] == (
        "kernel stack not resident; callback frames found: 3, CallbackNestingLevel: 2"
    )
    assert [f["level"] for f in stale["frames"]] == [None, None, None]
    frames = [f["frame"] for f in stale["frames"]]
    assert frames == sorted(frames, reverse=True)  # outermost first; the stale one innermost
    idle_swapped = threads[4136]
    assert (idle_swapped["reason"], idle_swapped["kernel_side"]) == ("none", None)
    assert idle_swapped["notes"] == "kernel stack not resident"
    # A level's user-stack page paged out: that level's user side null, Rip from T(k-1).
    for tid, level, levels in ((4124, 3, 3), (4128, 1, 2)):
        paged = threads[tid]
        assert paged["notes"] == (
            f"callback frames found: {levels - 1}, CallbackNestingLevel: {levels};"
            " unreadable: user stack"
        )
        assert paged["kernel_side"] == "unreadable: user stack"
        row = paged["frames"][level - 1]
        assert row["kernel_side"] == "unreadable: user stack"
        assert row["notes"] == "unreadable: user stack"
        assert [row[k] for k in ("api_number", "handler", "buffer", "length", "rsp")] == [None] * 5
        assert row["frame"] is not None and row["symbol"].startswith("win32u.dll!NtUser")
        others = [f for f in paged["frames"] if f["level"] != level]
        assert all(f["kernel_side"] == "agrees" and f["notes"] == "" for f in others)
    # A handler stack deeper than 256 KiB between two levels: as healthy.
    deep = threads[4132]
    assert (deep["kernel_side"], deep["notes"]) == ("agrees", "")
    assert deep["frames"][0]["frame"] - deep["frames"][1]["frame"] > 0x40000
    # Forged kernel sides.
    callout = threads[4204]
    assert callout["kernel_side"] == "mismatch" and callout["notes"] == ""
    assert callout["frames"][0]["kernel_side"].startswith("mismatch: KCALLOUT_FRAME.TrapFrame 0x")
    assert callout["frames"][1]["kernel_side"] == "agrees"
    rip = threads[4208]
    outer, inner = rip["frames"]
    assert outer["kernel_side"] == "agrees"
    assert inner["kernel_side"] == (
        f"mismatch: trap frame Rip {inner['rip'] + 0x20:#x} != MachineFrame.Rip {inner['rip']:#x}"
    )
    rsp = threads[4212]
    (row,) = rsp["frames"]
    assert rsp["notes"].startswith("callback frames found: 0, CallbackNestingLevel: 1; ")
    assert row["kernel_side"].startswith(
        f"mismatch: Frame {row['frame']:#x} is not a UCALLOUT_FRAME, trap frame Rip 0x"
    )
    # A Running thread with a stale KTHREAD.TrapFrame: values from T(K).
    running = threads[4216]
    assert running["state"] == "Running"
    assert running["notes"].startswith("KTHREAD.TrapFrame differs: 0xffff")
    assert running["symbol"] == "ntdll.dll!NtCallbackReturn+0x14"
    assert running["kernel_side"] == "agrees"
    # A hooked KiUserCallbackDispatcher: every level agrees, each notes its return address.
    for tid in (4304, 4308):
        hooked = threads[tid]
        assert hooked["kernel_side"] == "agrees"
        assert hooked["notes"].startswith("return address 0x")
        assert hooked["notes"].endswith(" not in KiUserCallbackDispatcher")
        assert "; " not in hooked["notes"]  # the same address: noted once
        assert all(f["notes"] == hooked["notes"] for f in hooked["frames"])
        assert all(f["kernel_side"] == "agrees" for f in hooked["frames"])
    assert threads[4140]["notes"] == "" and threads[4140]["kernel_side"] == "agrees"


# -- stock plugins ---------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["raw", "dmp"])
@pytest.mark.parametrize("profile", ALL_PROFILES)
def test_stock_plugins_list_every_process_and_thread(images, profile, fmt):
    paths = images.get(SCENARIO, profile)
    truth = images.truth(SCENARIO, profile)
    rows = run_plugin(paths[fmt], "windows.pslist.PsList", [paths["symbols"]])
    assert [(r["PID"], r["ImageFileName"], r["Threads"]) for r in rows] == [
        (p["pid"], p["name"], len(p["threads"])) for p in truth["processes"]
    ]
    rows = run_plugin(paths[fmt], "windows.threads.Threads", [paths["symbols"]])
    assert [(r["PID"], r["TID"], r["StartAddress"]) for r in rows] == [
        (p["pid"], t["tid"], t["start"] & ADDRESS_MASK)
        for p in truth["processes"]
        for t in p["threads"]
    ]


# -- the bytes say what the truth says -------------------------------------------------------
def _reader(images, profile: str) -> tuple[Reader, dict[str, Any]]:
    paths = images.get(SCENARIO, profile)
    truth = images.truth(SCENARIO, profile)
    symbols = SymbolTable.load(images.profile(profile).isf_path)
    reader = Reader(RawImage(paths["raw"]), symbols, truth["dtb"], truth["kernel_base"])
    return reader, truth


SWAPPED = (4112, 4116, 4120, 4136)


@pytest.mark.parametrize("profile", ALL_PROFILES)
def test_image_bytes_agree_with_the_truth(images, profile):
    reader, truth = _reader(images, profile)
    image, threads = reader.image, reader.threads()
    records = {(t["pid"], t["tid"]): t for t in truth["threads"]}
    assert set(threads) == set(records)
    for key, where in threads.items():
        record, ethread, dtb = records[key], where["ethread"], where["dtb"]
        resident = reader.kthread(ethread, "KernelStackResident")
        assert resident == (0 if key[1] in SWAPPED else 1), key
        if not resident:
            # Every page of the current kernel stack segment is not present, as a page-file
            # entry (non-zero), and the process's own frames are still on its user stack.
            base = reader.kthread(ethread, "StackBase")
            limit = reader.kthread(ethread, "StackLimit")
            for page in range(limit, base, 0x1000):
                pte = image.pte(reader.dtb, page)
                assert pte and not pte & 1, (key, hex(page))
            for row in record["frames"]:
                frame = ucallout_frame(image, dtb, row["frame"])
                assert frame is not None
                assert {k: frame[k] for k in ("api_number", "rip", "rsp", "length")} == {
                    k: row[k] for k in ("api_number", "rip", "rsp", "length")
                }
            continue
        if record["pid"] == 4 or not record["frames"]:
            continue
        # Resident: K callout segments, Frame(k) = T(k-1).Rsp, Rip from T(K).
        traps = reader.trap_frames(ethread)
        assert len(traps) == len(record["frames"]) + 1, key
        assert (reader.trap(traps[-1], "Rip"), reader.trap(traps[-1], "Rsp")) == (
            record["rip"],
            record["rsp"],
        )
        for k, row in enumerate(record["frames"], start=1):
            assert row["frame"] == reader.trap(traps[k - 1], "Rsp"), (key, k)
            frame = ucallout_frame(image, dtb, row["frame"])
            if frame is None:  # paged out: the truth shows the kernel's Rip
                assert row["rip"] == reader.trap(traps[k - 1], "Rip")
                assert image.pte(dtb, row["frame"]), "a page-file entry, not a hole"
            else:
                assert {n: frame[n] for n in ("api_number", "buffer", "length", "rip", "rsp")} == {
                    n: row[n] for n in ("api_number", "buffer", "length", "rip", "rsp")
                }, (key, k)


def _dispatcher_slots(image: RawImage, dtb: int, stack: tuple[int, int], slot: int) -> list[int]:
    """Addresses F (16-aligned) inside ``stack`` whose qword F - 8 equals ``slot``."""
    limit, base = stack
    found = []
    for page in range(limit, base, 0x1000):
        data = image.read(dtb, page, 0x1000)
        if data is None:
            continue
        for offset in range(8, 0x1000, 16):  # F - 8 = page + offset, F 16-aligned
            if struct.unpack_from("<Q", data, offset)[0] == slot:
                found.append(page + offset + 8)
    return found


@pytest.mark.parametrize("profile", ["lab", *[p for p in ALL_PROFILES if p.id == "22000"]])
def test_stale_frames_lie_where_no_level_is(images, profile):
    reader, truth = _reader(images, profile)
    image, threads = reader.image, reader.threads()
    records = {t["tid"]: t for t in truth["threads"]}

    def stack(tid: int) -> tuple[int, int, int]:
        where = threads[(records[tid]["pid"], tid)]
        teb = reader.kthread(where["ethread"], "Teb")
        limit = reader.field(teb, "_TEB", "NtTib.StackLimit", where["dtb"])
        base = reader.field(teb, "_TEB", "NtTib.StackBase", where["dtb"])
        return where["dtb"], limit, base

    dtb, *_ = stack(4108)
    slot = ucallout_frame(image, dtb, records[4108]["frames"][0]["frame"])["return_address"]
    # The nested thread: its two levels and one stale frame between them.
    dtb, limit, base = stack(4108)
    found = _dispatcher_slots(image, dtb, (limit, base), slot)
    outer, inner = (f["frame"] for f in records[4108]["frames"])
    assert outer in found and inner in found and len(found) == 3
    (stale,) = set(found) - {outer, inner}
    assert inner < stale < outer
    decoded = ucallout_frame(image, dtb, stale)
    assert stale + 0x58 + decoded["length"] <= decoded["rsp"] <= base
    # The idle thread: one stale frame in live stack above its Rsp, no level.
    dtb, limit, base = stack(4104)
    (stale,) = _dispatcher_slots(image, dtb, (limit, base), slot)
    assert records[4104]["rsp"] < stale - 8 and records[4104]["frames"] == []
    # The swapped thread with a stale frame below its innermost one: the truth's 3 frames.
    dtb, limit, base = stack(4120)
    found = _dispatcher_slots(image, dtb, (limit, base), slot)
    assert sorted(found, reverse=True) == [f["frame"] for f in records[4120]["frames"]]


@pytest.mark.parametrize("profile", ALL_PROFILES)
def test_hook_and_deep_stack_in_the_bytes(images, profile):
    reader, truth = _reader(images, profile)
    image, threads = reader.image, reader.threads()
    records = {t["tid"]: t for t in truth["threads"]}
    processes = {p["pid"]: p for p in truth["processes"]}
    hooked = processes[4300]
    dispatcher = hooked["exports"]["ntdll.dll"]["KiUserCallbackDispatcher"]
    hook = next(m for m in hooked["modules"] if m["name"] == "edrhook.dll")
    dtb = threads[(4300, 4304)]["dtb"]
    code = image.read(dtb, dispatcher, 14)
    assert code[:6] == b"\xff\x25\x00\x00\x00\x00"  # jmp qword ptr [rip+0]
    target = struct.unpack("<Q", code[6:])[0]
    assert hook["base"] <= target < hook["base"] + hook["size"]
    note = records[4304]["notes"]
    returns = int(note.split()[2], 16)
    assert hook["base"] <= returns < hook["base"] + hook["size"]
    for row in records[4304]["frames"]:
        assert ucallout_frame(image, dtb, row["frame"])["return_address"] == returns
    # Another process keeps the clean dispatcher.
    clean = image.read(threads[(4100, 4140)]["dtb"], dispatcher, 6)
    assert clean != code[:6]
    # The deep handler stack: TEB bounds cover it, only the pages written are present.
    where = threads[(4100, 4132)]
    teb = reader.kthread(where["ethread"], "Teb")
    limit = reader.field(teb, "_TEB", "NtTib.StackLimit", where["dtb"])
    outer, inner = (f["frame"] for f in records[4132]["frames"])
    assert limit <= inner - 8 and outer - inner > 0x40000
    present = sum(
        image.translate(where["dtb"], page) is not None
        for page in range(inner & ~0xFFF, outer, 0x1000)
    )
    assert present <= 8


def test_generated_scenarios_have_resident_kernel_stacks(images, tmp_path):
    """imagebuilder/generate.py's benchmark scenarios: every thread's KernelStackResident 1."""
    from imagebuilder.build import build_image
    from imagebuilder.generate import generate_scenario
    from imagebuilder.scenario import parse_scenario

    profile = images.profile("lab")
    symbols = SymbolTable.load(profile.isf_path)
    data = generate_scenario(processes=3, threads_per_process=6, callback_share=0.5, seed=2)
    image = build_image(parse_scenario(data), symbols, profile.build)
    raw = image.write(tmp_path, "generated", ("raw",))["raw"]
    reader = Reader(RawImage(raw), symbols, image.truth["dtb"], image.truth["kernel_base"])
    threads = reader.threads()
    assert len(threads) == 3 * 6 + 2  # and the System process's two
    assert {reader.kthread(t["ethread"], "KernelStackResident") for t in threads.values()} == {1}
