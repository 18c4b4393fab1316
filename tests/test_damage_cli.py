"""Whole-image damage through the `vol` command line: one clear message, never a traceback.

Truncated, empty and non-Windows files, a Windows image whose kernel has no symbol table, a
32-bit kernel; and names with control characters, ANSI escapes and invalid UTF-16, which text
renderers must show escaped and JSON exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imagebuilder.build import build_image
from imagebuilder.isf import SymbolTable
from imagebuilder.profiles import lab_profile
from imagebuilder.scenario import load_scenario
from imagebuilder.x86_image import X86_GUID, write_x86_image
from tests.conftest import SCENARIOS
from tests.test_fuzz_harness import region_index
from tests.test_kcbwait_truth import as_truth

ROOT = Path(__file__).resolve().parents[1]
VOL = Path(sys.executable).with_name("vol")
# The helper lives in the tools package, outside the plugin directory Volatility imports.
HELPER = [sys.executable, "-m", "kcbwait_batch.kernel_symbols"]
LAB_GUID = "4B43425741495400000000000000AB01"
LAYER_MESSAGE = "A translation layer requirement was not fulfilled"


def vol(
    image: Path,
    symbols: Path,
    cache: Path,
    *args: str,
    renderer: str = "quick",
    plugin: str = "windows.kcbwait",
) -> subprocess.CompletedProcess:
    cache.mkdir(exist_ok=True)
    return subprocess.run(
        [str(VOL), "-q", "--offline", "--cache-path", str(cache), "-s", str(symbols),
         "-p", str(ROOT / "volatility_plugins"), "-r", renderer, "-f", str(image),
         plugin, *args],
        capture_output=True, text=True, encoding="utf-8", errors="strict", timeout=300,
        check=False,
    )  # fmt: skip


def assert_no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stdout + result.stderr


@pytest.fixture(scope="module")
def basic(tmp_path_factory):
    """The basic scenario built here, with its region map (for the truncation test)."""
    root = tmp_path_factory.mktemp("whole")
    profile = lab_profile(root / "symbols")
    image = build_image(
        load_scenario(SCENARIOS / "basic.json"), SymbolTable.load(profile.isf_path), profile.build
    )
    paths = image.write(root, "basic", ("raw", "dmp"))
    paths["symbols"] = profile.symbols_dir
    paths["index"] = region_index(image.regions, image.truth, (p << 12 for p in image.memory.pages))
    paths["truth_doc"] = image.truth
    paths["root"] = root
    return paths


@pytest.mark.parametrize(
    "content",
    [b"", os.urandom(3 * 1024 * 1024), b"\x7fELF\x02\x01\x01" + bytes(0x200000), b"hello\n" * 1000],
    ids=["empty", "random", "elf", "text"],
)
def test_not_a_windows_image_is_one_clear_message(basic, tmp_path, content):
    image = tmp_path / "image.raw"
    image.write_bytes(content)
    result = vol(image, basic["symbols"], tmp_path / "cache")
    assert result.returncode == 1
    assert_no_traceback(result)
    assert LAYER_MESSAGE in result.stdout
    assert "The file is a valid memory image" in result.stdout


def test_truncated_before_the_kernel_is_one_clear_message(basic, tmp_path):
    image = tmp_path / "short.raw"
    image.write_bytes(basic["raw"].read_bytes()[: 4 * 1024 * 1024])
    result = vol(image, basic["symbols"], tmp_path / "cache")
    assert result.returncode == 1
    assert_no_traceback(result)
    assert LAYER_MESSAGE in result.stdout


def test_truncated_image_keeps_every_thread_below_the_cut(basic, tmp_path):
    """Everything past the cut is unreadable: threads that need none of it stay exact."""
    index, truth = basic["index"], basic["truth_doc"]
    size = basic["raw"].stat().st_size
    pages = index.used_pages
    cut = pages[len(pages) * 3 // 4]
    touched = index.touched_threads([(cut, size)])
    kept = [
        {k: v for k, v in t.items() if k != "stack"}  # windows.kcbwait's part of the record
        for t in truth["threads"]
        if (t["pid"], t["tid"]) not in touched
    ]
    assert kept, "the cut should leave some threads whole"
    image = tmp_path / "cut.raw"
    image.write_bytes(basic["raw"].read_bytes()[:cut])
    result = vol(image, basic["symbols"], tmp_path / "cache", "--all-threads", renderer="json")
    assert result.returncode == 0, result.stderr
    assert_no_traceback(result)
    reported = as_truth(json.loads(result.stdout))
    assert all(record in reported for record in kept)


@pytest.mark.parametrize("fraction", [0.2, 0.6, 0.9])
def test_truncated_crash_dump_never_fails_badly(basic, tmp_path, fraction):
    data = basic["dmp"].read_bytes()
    image = tmp_path / "cut.dmp"
    image.write_bytes(data[: int(len(data) * fraction)])
    result = vol(image, basic["symbols"], tmp_path / "cache", "--all-threads")
    assert_no_traceback(result)
    assert result.returncode in (0, 1)
    if result.returncode == 1:
        assert "requirement was not fulfilled" in result.stdout


def test_missing_symbol_table_names_guid_and_age(basic, tmp_path):
    empty = tmp_path / "no-symbols"
    empty.mkdir()
    result = vol(basic["raw"], empty, tmp_path / "cache")
    assert result.returncode == 1
    assert_no_traceback(result)
    # Volatility's own words, offline: the download URL it could not reach (GUID + age).
    assert f"ntkrnlmp.pdb/{LAB_GUID}1/ntkrnlmp.pdb" in result.stdout + result.stderr
    assert "A symbol table requirement was not fulfilled" in result.stdout


def test_kernel_symbols_helper_says_how_to_supply_the_table(basic, tmp_path):
    empty = tmp_path / "no-symbols"
    empty.mkdir()
    missing = subprocess.run(
        [*HELPER, str(basic["raw"]), "-s", str(empty)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert missing.returncode == 2
    assert_no_traceback(missing)
    text = missing.stderr
    assert f"kernel ntkrnlmp.pdb GUID {LAB_GUID} age 1" in text
    assert "Online: run vol without --offline" in text
    assert f"https://msdl.microsoft.com/download/symbols/ntkrnlmp.pdb/{LAB_GUID}1/" in text
    assert f"DIR/windows/ntkrnlmp.pdb/{LAB_GUID}-1.json" in text
    assert "vol --offline -s DIR" in text
    present = subprocess.run(
        [*HELPER, str(basic["raw"]), "-s", str(basic["symbols"])],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert present.returncode == 0 and "symbol table present" in present.stdout
    noise = tmp_path / "noise.raw"
    noise.write_bytes(os.urandom(1024 * 1024))
    other = subprocess.run(
        [*HELPER, str(noise)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert other.returncode == 1 and "not a Windows memory image" in other.stderr


def test_32bit_kernel_is_refused_in_one_line(tmp_path):
    paths = write_x86_image(tmp_path / "x86")
    assert (paths["symbols"] / "windows" / "ntkrnlmp.pdb" / f"{X86_GUID}-1.json.xz").is_file()
    result = vol(paths["raw"], paths["symbols"], tmp_path / "cache")
    assert_no_traceback(result)
    assert result.returncode == 0
    errors = [line for line in result.stderr.splitlines() if "64-bit" in line]
    assert len(errors) == 1
    assert "supports only 64-bit (x64) Windows kernels" in errors[0]
    assert "this image's kernel is 32-bit" in errors[0]
    assert result.stdout.strip().splitlines()[-1].startswith("PID")  # header, no rows


# ----------------------------------------------------------------------------- hostile names

EVIL = "\x1b[2Jevil\x07.exe"
HOOK = "h\x1b[31mook\ud800.dll"


@pytest.fixture(scope="module")
def hostile(images):
    return images.get("hostile-names", "lab")


@pytest.mark.parametrize("renderer", ["quick", "pretty", "csv"])
def test_text_renderers_escape_names(hostile, tmp_path, renderer):
    result = vol(hostile["raw"], hostile["symbols"], tmp_path / "cache", "--all-threads",
                 renderer=renderer)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert_no_traceback(result)
    out = result.stdout
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out and "\x9b" not in out
    if renderer == "csv":  # Volatility's CSV writer escapes backslashes with a backslash
        out = out.replace("\\\\", "\\")
    assert "\\x1b[2Jevil\\x07.exe" in out
    assert "h\\x1b[31mook\\ud800.dll+0x2000" in out
    assert "t\u00e9st\\x9b.exe" in out
    assert "plain\\u202egpj.dll+0x2000" in out


@pytest.mark.parametrize("renderer", ["quick", "pretty", "csv"])
def test_kcbtable_escapes_module_names_in_verdicts(hostile, tmp_path, renderer):
    """A hijacked entry's target names its module: a string from the image."""
    result = vol(hostile["raw"], hostile["symbols"], tmp_path / "cache", renderer=renderer,
                 plugin="windows.kcbtable")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert_no_traceback(result)
    out = result.stdout
    assert "\x1b" not in out and "\u202e" not in out and "\ud800" not in out
    if renderer == "csv":
        out = out.replace("\\\\", "\\")
    assert "hijacked: entry" in out and "h\\x1b[31mook\\ud800.dll+0x2000" in out


@pytest.mark.parametrize("renderer", ["json", "jsonl"])
def test_json_renderers_keep_names_exact(hostile, tmp_path, renderer):
    result = vol(hostile["raw"], hostile["symbols"], tmp_path / "cache", "--all-threads",
                 renderer=renderer)  # fmt: skip
    assert result.returncode == 0, result.stderr
    text = result.stdout
    rows = (
        json.loads(text)
        if renderer == "json"
        else [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    )
    names = {row["Process"] for row in rows}
    assert {EVIL, "t\u00e9st\x9b.exe"} <= names
    handlers = {child["HandlerSymbol"] for row in rows for child in row["__children"]}
    assert f"{HOOK}+0x2000" in handlers
    assert "plain\u202egpj.dll+0x2000" in handlers
