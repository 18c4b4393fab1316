"""The image builder as a tool: scenario validation, determinism, CLI, generator, formats."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest

from imagebuilder import cli
from imagebuilder.build import build_image
from imagebuilder.crashdump import physical_runs
from imagebuilder.generate import generate_scenario
from imagebuilder.isf import SymbolTable
from imagebuilder.profiles import lab_profile
from imagebuilder.scenario import ScenarioError, parse_scenario

SCENARIOS = Path(__file__).resolve().parents[1] / "testdata" / "scenarios"


def _basic() -> dict:
    return json.loads((SCENARIOS / "basic.json").read_text())


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    profile = lab_profile(tmp_path_factory.mktemp("symbols"))
    return profile, SymbolTable.load(profile.isf_path)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s["processes"][0].pop("pid"), r"scenario\.processes\[0\]\.pid: missing"),
        (
            lambda s: s["processes"][0].update(pid=1233),
            r"processes\[0\]\.pid: 1233 is not a multiple",
        ),
        (
            lambda s: s["processes"][0]["threads"][1]["callbacks"][0].update(api=999),
            r"threads\[1\]\.callbacks\[0\]\.api: 999 is outside 0\.\.127",
        ),
        (
            lambda s: s["processes"][0]["threads"][0].update(wait="NtBogus"),
            r"threads\[0\]: unknown system call 'NtBogus'",
        ),
        (
            lambda s: s["processes"][1].update(callback_overrides={"3": "absent.dll"}),
            r"processes\[1\]\.callback_overrides\[3\]: 'absent\.dll' is not private,"
            r" private_rwx or one of the process's modules",
        ),
        (
            lambda s: s["processes"][0]["threads"][0].update(colour="red"),
            r"threads\[0\]: unknown field 'colour'",
        ),
        (
            lambda s: s["processes"][1]["threads"][0].update(tid=1236),
            r"processes\[1\]\.threads\[0\]\.tid: 1236 is used twice",
        ),
        (
            lambda s: s["processes"][0].update(modules=["ntdll.dll"]),
            r"NtUserGetMessage lives in win32u\.dll, which the process lacks",
        ),
        (lambda s: s.update(memory_mb="lots"), r"scenario\.memory_mb: expected an integer"),
        (
            lambda s: s["processes"][0].update(name="a-very-long-process-name.exe"),
            r"processes\[0\]\.name: 1 to 14 characters",
        ),
    ],
)
def test_malformed_scenarios_name_the_bad_field(mutate, message):
    data = _basic()
    mutate(data)
    with pytest.raises(ScenarioError, match=message):
        parse_scenario(data)


def test_cli_reports_scenario_errors_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x", "processes": [{"pid": 8, "name": "a.exe"}]}')
    assert cli.main(["build", str(bad), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kcbwait-build-image: error: scenario.processes[0].threads: missing")
    assert "Traceback" not in err
    bad.write_text("{not json")
    assert cli.main(["build", str(bad), "--out", str(tmp_path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_cli_rejects_unknown_profile(tmp_path, capsys):
    assert (
        cli.main(
            ["build", str(SCENARIOS / "basic.json"), "--profile", "7600", "--out", str(tmp_path)]
        )
        == 2
    )
    assert "unknown profile '7600'" in capsys.readouterr().err


def test_too_little_memory_is_a_clear_error(lab):
    profile, symbols = lab
    data = generate_scenario(processes=20, threads_per_process=40, seed=3)
    data["memory_mb"] = 32
    with pytest.raises(ValueError, match="needs more than 32 MiB"):
        build_image(parse_scenario(data), symbols, profile.build)


def test_same_scenario_table_and_seed_give_the_same_bytes(lab, tmp_path):
    profile, symbols = lab
    digests = []
    for run in range(2):
        image = build_image(parse_scenario(_basic()), symbols, profile.build)
        paths = image.write(tmp_path / str(run), "basic", ("raw", "dmp"))
        digests.append(
            {k: hashlib.sha256(paths[k].read_bytes()).hexdigest() for k in ("raw", "dmp", "truth")}
        )
    assert digests[0] == digests[1]
    other = _basic()
    other["seed"] = 8
    image = build_image(parse_scenario(other), symbols, profile.build)
    paths = image.write(tmp_path / "other", "basic", ("raw",))
    assert hashlib.sha256(paths["raw"].read_bytes()).hexdigest() != digests[0]["raw"]


def test_raw_image_is_sparse_and_sized_by_the_scenario(lab, tmp_path):
    profile, symbols = lab
    image = build_image(parse_scenario(_basic()), symbols, profile.build)
    raw = image.write(tmp_path, "basic", ("raw",))["raw"]
    assert raw.stat().st_size == 64 * 1024 * 1024
    assert raw.stat().st_blocks * 512 < 8 * 1024 * 1024  # only used pages hit the disk


def test_crash_dump_header_describes_the_physical_runs(lab, tmp_path):
    profile, symbols = lab
    image = build_image(parse_scenario(_basic()), symbols, profile.build)
    dmp = image.write(tmp_path, "basic", ("dmp",))["dmp"].read_bytes()
    assert dmp[:8] == b"PAGEDU64"
    assert struct.unpack_from("<Q", dmp, 0x10)[0] == image.kernel.space.pml4
    runs = struct.unpack_from("<I", dmp, 0x88)[0]
    pages = struct.unpack_from("<Q", dmp, 0x90)[0]
    listed = [struct.unpack_from("<QQ", dmp, 0x98 + 16 * i) for i in range(runs)]
    assert sum(c for _, c in listed) == pages
    assert len(dmp) == 0x2000 + pages * 0x1000
    assert struct.unpack_from("<I", dmp, 0xF98)[0] == 1  # DumpType: full
    assert all(count > 0 for _, count in listed)
    used = set(image.memory.pages)
    covered = {b + i for b, c in listed for i in range(c)}
    assert used <= covered


def test_physical_runs_merge_smallest_gaps_when_too_many():
    pfns = [0, 1, 2, 10, 11, 13, 40]
    assert physical_runs(pfns) == [(0, 3), (10, 2), (13, 1), (40, 1)]
    assert physical_runs(pfns, max_runs=2) == [(0, 14), (40, 1)]


def test_generator_scales_and_is_deterministic(lab):
    profile, symbols = lab
    data = generate_scenario(processes=12, threads_per_process=25, callback_share=0.3, seed=5)
    assert data == generate_scenario(
        processes=12, threads_per_process=25, callback_share=0.3, seed=5
    )
    image = build_image(parse_scenario(data), symbols, profile.build)
    threads = [t for t in image.truth["threads"] if t["pid"] != 4]
    assert len(threads) == 300
    in_callback = [t for t in threads if t["frames"]]
    assert 0.15 < len(in_callback) / len(threads) < 0.45
    assert any(t["reason"] == "at-return+in-callback" for t in in_callback)
    assert all(len(t["frames"]) == t["nesting_level"] for t in threads)
