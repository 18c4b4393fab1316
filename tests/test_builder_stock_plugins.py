"""Volatility's own plugins accept builder images and see exactly the scenario.

Each image is checked by the stock plugins before our plugin is trusted with it: every
process, thread, module, VAD and the ntdll exports, nothing missing and nothing extra.
"""

from __future__ import annotations

import pytest

from tests.conftest import ALL_PROFILES
from tests.support.volrun import run_plugin

FORMATS = ["raw", "dmp"]
# tables: hijacked callback tables, WoW64 processes, instrumentation callbacks.
# population: the standard image, a real machine's process population (MemProcFS reads it).
SCENARIOS = ["basic", "tables", "population", "stacks"]
# Volatility reports kernel addresses masked to the 48 bits the x64 layer translates.
ADDRESS_MASK = (1 << 48) - 1


def _run(images, profile: str, fmt: str, plugin: str, scenario: str = "basic", **options):
    paths = images.get(scenario, profile)
    return run_plugin(paths[fmt], plugin, [paths["symbols"]], options)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("profile", ALL_PROFILES)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pslist_lists_every_process(images, scenario, profile, fmt):
    truth = images.truth(scenario, profile)
    rows = _run(images, profile, fmt, "windows.pslist.PsList", scenario)
    assert [(r["PID"], r["PPID"], r["ImageFileName"], r["Wow64"], r["Threads"]) for r in rows] == [
        (p["pid"], p["ppid"], p["name"], p["wow64"], len(p["threads"])) for p in truth["processes"]
    ]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("profile", ALL_PROFILES)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_threads_lists_every_thread(images, scenario, profile, fmt):
    truth = images.truth(scenario, profile)
    rows = _run(images, profile, fmt, "windows.threads.Threads", scenario)
    assert [(r["PID"], r["TID"], r["StartAddress"]) for r in rows] == [
        (p["pid"], t["tid"], t["start"] & ADDRESS_MASK)
        for p in truth["processes"]
        for t in p["threads"]
    ]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("profile", ALL_PROFILES)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_dlllist_and_ldrmodules_see_every_module(images, scenario, profile, fmt):
    truth = images.truth(scenario, profile)
    dlls = _run(images, profile, fmt, "windows.dlllist.DllList", scenario)
    assert [(r["PID"], r["Name"], r["Base"], r["Size"], r["Path"]) for r in dlls] == [
        (p["pid"], m["name"], m["base"], m["size"], m["path"])
        for p in truth["processes"]
        for m in p["modules"]
    ]
    ldr = _run(images, profile, fmt, "windows.malware.ldrmodules.LdrModules", scenario)
    assert sorted(
        (r["Pid"], r["Base"], r["InLoad"], r["InInit"], r["InMem"], r["MappedPath"]) for r in ldr
    ) == sorted(
        [
            (p["pid"], m["base"], True, m["init_order"], True, m["path"][2:])
            for p in truth["processes"]
            for m in p["modules"]
        ]
        # a WoW64 process's 32-bit images are mapped but in no 64-bit loader list
        + [
            (p["pid"], m["base"], False, False, False, m["path"][2:])
            for p in truth["processes"]
            for m in p.get("modules32", [])
        ]
    )


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("profile", ALL_PROFILES)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_vadinfo_sees_every_region(images, scenario, profile, fmt):
    truth = images.truth(scenario, profile)
    rows = _run(images, profile, fmt, "windows.vadinfo.VadInfo", scenario)
    assert sorted((r["PID"], r["Start VPN"], r["End VPN"], r["File"]) for r in rows) == sorted(
        (p["pid"], v["start"], v["end"], v["file"]) for p in truth["processes"] for v in p["vads"]
    )


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("profile", ALL_PROFILES)
def test_pe_symbols_resolves_the_callback_return_stub(images, profile, fmt):
    truth = images.truth("basic", profile)
    rows = _run(
        images,
        profile,
        fmt,
        "windows.pe_symbols.PESymbols",
        source="processes",
        module="ntdll.dll",
        symbols=["NtCallbackReturn", "ZwCallbackReturn"],
    )
    exports = next(p for p in truth["processes"] if p["pid"] != 4)["exports"]["ntdll.dll"]
    assert {(r["Symbol"], r["Address"]) for r in rows} == {
        ("NtCallbackReturn", exports["NtCallbackReturn"]),
        ("ZwCallbackReturn", exports["ZwCallbackReturn"]),
    }
    assert exports["NtCallbackReturn"] == exports["ZwCallbackReturn"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("profile", ALL_PROFILES)
def test_info_reads_version_globals(images, profile, fmt):
    truth = images.truth("basic", profile)
    rows = {r["Variable"]: r["Value"] for r in _run(images, profile, fmt, "windows.info.Info")}
    assert rows["Kernel Base"] == hex(truth["kernel_base"] & ADDRESS_MASK)
    assert rows["DTB"] == hex(truth["dtb"])
    assert rows["Major/Minor"] == f"15.{truth['profile']['build']}"
    assert rows["KeNumberProcessors"] == "2"
    assert (rows["NtMajorVersion"], rows["NtMinorVersion"]) == ("10", "0")
    assert rows["NtProductType"] == "NtProductWinNt"
