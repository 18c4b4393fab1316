"""windows.kcbwait through the `vol` command line: every renderer, and the installed layout."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VOL = Path(sys.executable).with_name("vol")


def _vol(images, tmp_path, *args: str) -> subprocess.CompletedProcess:
    paths = images.get("basic", "lab")
    cache = tmp_path / "cache"
    cache.mkdir(exist_ok=True)
    return subprocess.run(
        [str(VOL), "-q", "--offline", "--cache-path", str(cache), "-s", str(paths["symbols"]),
         "-p", str(ROOT / "volatility_plugins"), "-f", str(paths["raw"]), *args],
        capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def truth(images):
    return images.truth("basic", "lab")


def test_json_renderer_carries_numbers_as_numbers(images, tmp_path, truth):
    result = _vol(images, tmp_path, "-r", "json", "windows.kcbwait")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    listed = [t for t in truth["threads"] if t["reason"] != "none"]
    assert [(r["PID"], r["TID"], r["Rip"]) for r in rows] == [
        (t["pid"], t["tid"], t["rip"]) for t in listed]
    frame = rows[0]["__children"][0]
    assert isinstance(frame["Handler"], int) and isinstance(frame["Length"], int)
    assert rows[0]["Frame"] is None


def test_jsonl_renderer_one_thread_per_line(images, tmp_path, truth):
    result = _vol(images, tmp_path, "-r", "jsonl", "windows.kcbwait")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["TID"] for r in lines] == [t["tid"] for t in truth["threads"]
                                         if t["reason"] != "none"]


def test_csv_renderer_has_thread_and_frame_rows(images, tmp_path, truth):
    result = _vol(images, tmp_path, "-r", "csv", "windows.kcbwait", "--all-threads")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout[result.stdout.index("TreeDepth"):])))
    threads = [r for r in rows if r["TreeDepth"] == "0"]
    frames = [r for r in rows if r["TreeDepth"] == "1"]
    assert [int(r["TID"]) for r in threads] == [t["tid"] for t in truth["threads"]]
    assert len(frames) == sum(len(t["frames"]) for t in truth["threads"])
    assert {r["Reason"] for r in frames} == {"callback"}


@pytest.mark.parametrize("renderer", ["pretty", "quick"])
def test_text_renderers(images, tmp_path, truth, renderer):
    result = _vol(images, tmp_path, "-r", renderer, "windows.kcbwait", "--at-return-only")
    assert result.returncode == 0, result.stderr
    for t in truth["threads"]:
        listed = "at-return" in t["reason"]
        assert (f"{t['symbol']}" in result.stdout) or not listed
    assert "ntdll.dll!NtCallbackReturn+0x14" in result.stdout
    assert "NtUserGetMessage+0x14\t" not in result.stdout  # in-callback only: not listed


def test_wheel_installs_the_plugin_into_volatility_namespace(tmp_path):
    """`pip install .` must make `vol windows.kcbwait` work without -p."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    wheel = next(tmp_path.glob("kcbwait-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for plugin in ("kcbwait", "kcbtable", "kcbstack"):
        assert f"volatility3/plugins/windows/{plugin}.py" in names
    assert "volatility3/plugins/windows/kcbwait_analysis/__init__.py" in names
    # Volatility's own package files must never be shadowed.
    assert "volatility3/plugins/windows/__init__.py" not in names
    assert "volatility3/__init__.py" not in names
    assert "imagebuilder/cli.py" in names


@pytest.mark.parametrize("renderer", ["json", "csv", "pretty"])
def test_kcbstack_renderers(images, tmp_path, truth, renderer):
    """windows.kcbstack's frames through each renderer: every frame of every listed thread."""
    result = _vol(images, tmp_path, "-r", renderer, "windows.kcbstack")
    assert result.returncode == 0, result.stderr
    listed = [t for t in truth["threads"] if t["reason"] != "none"]
    frames = [(t["tid"], f["frame"], f["rip"], f["how"]) for t in listed for f in t["stack"]]
    if renderer == "json":
        rows = json.loads(result.stdout)
        assert [(r["TID"], r["Frame"], r["Rip"], r["How"]) for r in rows] == frames
    elif renderer == "csv":
        text = result.stdout[result.stdout.index("TreeDepth"):]
        rows = list(csv.DictReader(io.StringIO(text)))
        assert [
            (int(r["TID"]), int(r["Frame"]), int(r["Rip"], 16), r["How"]) for r in rows
        ] == frames
    else:
        for _tid, _frame, rip, how in frames:
            assert f"{rip:#x}" in result.stdout and how in result.stdout
