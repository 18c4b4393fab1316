"""A second engine agrees: MemProcFS reads the population image of every real-table profile.

MemProcFS 5.19 (tests/support/memprocfs_peer.py runs it in a child process, offline) must
list exactly the builder's processes and threads, and for every thread with a user-mode trap
frame report the Rip/Rsp that windows.kcbwait reports and the truth file holds.  Where it
disagrees with the truth, the test names the case and says who is wrong and why; it is never
skipped: without memprocfs or libusb the tests fail and say what to install.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from imagebuilder.profiles import REAL_TABLES
from tests.conftest import profile_param
from tests.support import memprocfs_peer
from tests.support.volrun import run_plugin

pytestmark = pytest.mark.peer

SCENARIO = "population"
# Builds whose kernel PDB MemProcFS's bundled info.db has structure offsets for: with
# -disable-symbolserver it reads nothing else (20348: see test_20348_is_not_in_info_db).
READABLE = [b for b in REAL_TABLES if b != 20348]
FORMATS = ["raw", "dmp"]


def _peer_or_fail() -> None:
    try:
        memprocfs_peer.environment()
    except memprocfs_peer.PeerUnavailable as exc:
        pytest.fail(f"MemProcFS peer tests cannot run: {exc}", pytrace=False)


class PeerCache:
    """MemProcFS and windows.kcbwait output per (profile, format), computed once."""

    def __init__(self, images: Any) -> None:
        self.images = images
        self._peer: dict[tuple[str, str], dict[str, Any]] = {}
        self._kcbwait: dict[tuple[str, str], list[dict[str, Any]]] = {}

    def truth(self, profile: str) -> dict[str, Any]:
        return self.images.truth(SCENARIO, profile)

    def peer(self, profile: str, fmt: str) -> dict[str, Any]:
        key = (profile, fmt)
        if key not in self._peer:
            _peer_or_fail()
            paths = self.images.get(SCENARIO, profile)
            callbacks = [t["tid"] for t in self.truth(profile)["threads"] if t["nesting_level"]]
            self._peer[key] = memprocfs_peer.read_image(paths[fmt], callbacks)
        return self._peer[key]

    def kcbwait(self, profile: str, fmt: str) -> list[dict[str, Any]]:
        key = (profile, fmt)
        if key not in self._kcbwait:
            paths = self.images.get(SCENARIO, profile)
            self._kcbwait[key] = run_plugin(
                paths[fmt], "windows.kcbwait.KcbWait", [paths["symbols"]], {"all-threads": True}
            )
        return self._kcbwait[key]


@pytest.fixture(scope="module")
def peers(images: Any) -> PeerCache:
    return PeerCache(images)


def _params() -> list[Any]:
    return [
        pytest.param(str(b), fmt, marks=profile_param(str(b)).marks, id=f"{b}-{fmt}")
        for b in READABLE
        for fmt in FORMATS
    ]


def _threads(peer: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {t["tid"]: t | {"pid": p["pid"]} for p in peer["processes"] for t in p["threads"]}


@pytest.mark.parametrize(("profile", "fmt"), _params())
def test_memprocfs_lists_exactly_our_processes_and_threads(peers, profile, fmt):
    peer, truth = peers.peer(profile, fmt), peers.truth(profile)
    assert "error" not in peer, peer
    assert len(truth["processes"]) > 10  # MemProcFS gives up on fewer
    listed = {(p["pid"], p["ppid"], p["name"]) for p in peer["processes"]}
    assert listed == {(p["pid"], p["ppid"], p["name"]) for p in truth["processes"]}
    for process in peer["processes"]:
        ours = next(p for p in truth["processes"] if p["pid"] == process["pid"])
        assert sorted(t["tid"] for t in process["threads"]) == sorted(
            t["tid"] for t in ours["threads"]
        ), process["name"]
    # smss.exe's PEB (OSMajorVersion 10, OSBuildNumber) is where MemProcFS reads the build.
    assert peer["build"] == int(profile)


# The one case where MemProcFS and the truth disagree, and why MemProcFS is wrong:
# stale_trap_frame is a Running thread whose KTHREAD.TrapFrame still names the trap frame of a
# callout segment it has left (Windows updates the field on entry from user mode only; see
# docs/output-contract.md, "Conditions of real machines").  MemProcFS reads the trap frame at
# KTHREAD.TrapFrame and, as that frame's Rsp lies inside the thread's user stack, reports the
# stale Rip/Rsp; windows.kcbwait reads the live frame at InitialStack - sizeof(_KTRAP_FRAME),
# which the truth holds.
STALE_NOTE = re.compile(r"KTHREAD\.TrapFrame differs: (0x[0-9a-f]+)")


@pytest.mark.parametrize(("profile", "fmt"), _params())
def test_trap_frames_agree_with_kcbwait_and_truth(peers, profile, fmt):
    peer = _threads(peers.peer(profile, fmt))
    rows = {row["TID"]: row for row in peers.kcbwait(profile, fmt)}
    stale = 0
    for record in peers.truth(profile)["threads"]:
        theirs, ours = peer[record["tid"]], rows[record["tid"]]
        where = f"PID {record['pid']} TID {record['tid']}"
        # kcbwait against the truth, as tests/test_kcbwait_truth.py checks it in full.
        assert (ours["Rip"], ours["Rsp"]) == (record["rip"], record["rsp"]), where
        mpfs = (theirs["rip"] or None, theirs["rsp"] or None)  # MemProcFS: 0 for "none"
        stale_frame = STALE_NOTE.search(record["notes"])
        if stale_frame:
            stale += 1
            assert theirs["trap_frame"] == int(stale_frame.group(1), 16), where
            assert record["state"] == "Running" and mpfs != (record["rip"], record["rsp"]), where
            assert theirs["stack_limit"] < theirs["rsp"] < theirs["stack_base"], where
            continue
        assert mpfs == (record["rip"], record["rsp"]), where
    assert stale == 1  # the population scenario's one stale_trap_frame thread


@pytest.mark.parametrize(("profile", "fmt"), _params())
def test_callback_thread_call_stacks_start_at_the_trap_frame(peers, profile, fmt):
    """MemProcFS's call stack of every callback thread starts at the trap frame's Rip."""
    peer = peers.peer(profile, fmt)
    threads = _threads(peer)
    checked = 0
    for record in peers.truth(profile)["threads"]:
        if not record["nesting_level"] or record["rip"] is None:
            continue
        if STALE_NOTE.search(record["notes"]):
            continue  # MemProcFS starts from the stale frame (see above)
        frames = peer["callstacks"][str(record["tid"])]
        assert isinstance(frames, list) and frames, record["tid"]
        assert frames[0]["ret"] == threads[record["tid"]]["rip"] == record["rip"]
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize(("profile", "fmt"), _params())
def test_memprocfs_call_stacks_end_at_the_dispatcher_where_kcbstack_goes_on(
    peers, profile, fmt
):
    """MemProcFS treats UWOP_PUSH_MACHFRAME as a fixed Rsp adjustment (it does not reload Rip
    and Rsp from the machine frame, ../shared/docs/memprocfs.md), so its stack of a callback
    thread agrees with windows.kcbstack's (the truth's) up to KiUserCallbackDispatcher and never
    reaches the system call the callback interrupted; kcbstack crosses every level down to
    RtlUserThreadStart.  MemProcFS is the one that stops short."""
    peer = peers.peer(profile, fmt)
    compared = stopped_early = astray = 0
    for record in peers.truth(profile)["threads"]:
        if not record["nesting_level"] or record["rip"] is None:
            continue
        if STALE_NOTE.search(record["notes"]):
            continue
        ours = record["stack"]
        assert ours[-1]["symbol"].startswith("ntdll.dll!RtlUserThreadStart"), record["tid"]
        assert ours[-1]["callback_level"] == 0
        dispatcher = next(
            i
            for i, f in enumerate(ours)
            if (f["symbol"] or "").startswith("ntdll.dll!KiUserCallbackDispatcher")
        )
        theirs = [f["ret"] for f in peer["callstacks"][str(record["tid"])] if f["ret"]]
        # Where MemProcFS has frames up to the dispatcher, they are ours (it may stop earlier).
        agreed = min(len(theirs), dispatcher + 1)
        assert theirs[:agreed] == [f["rip"] for f in ours[:agreed]], record["tid"]
        # The next frame is the interrupted system call (How "machine frame"): MemProcFS never
        # has it, and whatever it lists after the dispatcher (a return address found further
        # up, if any) skips the frames kcbstack lists.
        interrupted = ours[dispatcher + 1]
        assert interrupted["how"] == "machine frame", record["tid"]
        assert interrupted["rip"] not in theirs, record["tid"]
        assert theirs[dispatcher + 1 :] != [f["rip"] for f in ours[dispatcher + 1 :]]
        stopped_early += len(theirs) <= dispatcher
        astray += len(theirs) > dispatcher + 1
        compared += 1
    assert compared >= 5
    # Both ways of falling short are seen on this image: stopping before the dispatcher and
    # jumping past the machine frame to a return address further up.
    assert stopped_early and astray


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("profile", [profile_param("20348")])
def test_20348_is_not_in_info_db(peers, profile, fmt):
    """MemProcFS 5.19 cannot read a 20348 image offline: its info.db has no structure offsets
    for that kernel (PDB C2EADB24...-1) and its EPROCESS heuristics do not find the offsets
    either, so it stops at 'Unable to walk EPROCESS'.  A limitation of MemProcFS, not of the
    image: Volatility reads the same image with the same real symbol table."""
    _peer_or_fail()
    guid, age = REAL_TABLES[int(profile)]
    assert not memprocfs_peer.info_db_has(guid, age)
    assert memprocfs_peer.info_db_has(*REAL_TABLES[19041])
    peer = peers.peer(profile, fmt)
    assert "error" in peer
    paths = peers.images.get(SCENARIO, profile)
    rows = run_plugin(paths[fmt], "windows.pslist.PsList", [paths["symbols"]])
    assert {r["PID"] for r in rows} == {p["pid"] for p in peers.truth(profile)["processes"]}
