"""kcbwait-batch in local mode: the output equals windows.kcbwait's own result per image.

The batch runs as a real command (``python -m kcbwait_batch``) on a directory of builder
images plus a truncated raw image, a truncated crash dump and a file that is no memory image;
every image's records are compared with the plugin's rows from an in-process run
(tests/support/volrun.py) and its error, if any.  Also: resume after a killed run, per-image
timeout and worker crash isolation, CSV, progress output and the output's parsing helpers.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from volatility3.framework import exceptions

from kcbwait_batch import discovery, records, writer
from tests.support.volrun import run_plugin

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = "windows.kcbwait.KcbWait"
GOOD = ["basic-lab.raw", "basic-lab.dmp", "nt-only-lab.raw", "nt-only-lab.dmp"]
TRUNCATED_RAW = "truncated.raw"  # 4 MiB of basic-lab.raw: no kernel layer found
TRUNCATED_DMP = "truncated.dmp"  # a crash dump cut inside its process data: partial results
NOT_WINDOWS = "notwindows.raw"
IGNORED = ["basic-lab.truth.json", "notes.txt"]  # in the directory, not images


# -- helpers shared with test_batch_dask.py --------------------------------------------------
def _inside_process_data(dump: bytes) -> int:
    """A cut halfway through the last run of data pages: crash dumps lay physical memory out
    as the machine's memory map (a sparse file) and the builder places the kernel's pages first
    and the processes' after them, so the kernel stays readable and later processes are cut."""
    used = [
        offset
        for offset in range(0, len(dump), 0x1000)
        if dump[offset : offset + 0x1000].strip(b"\0")
    ]
    start = len(used) - 1
    while start > 0 and used[start] - used[start - 1] <= 0x10000:
        start -= 1
    return (used[start] + used[-1]) // 2 & ~0xFFF


def _batch_env(env: dict[str, str] | None) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}


def batch(*args: str, env: dict[str, str] | None = None, timeout: float = 300):
    """Runs the batch command; CompletedProcess with text output."""
    return subprocess.run(
        [sys.executable, "-m", "kcbwait_batch", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_batch_env(env),
        cwd=ROOT,
        check=False,
    )


def batch_one(image: Path, symbols: Path, work: Path, *options: str):
    """(output path, finished run) of kcbwait-batch on one image, offline, with ``options``."""
    out = work / "out.jsonl"
    cache = ["--offline", "--cache-path", str(work / "cache")]
    return out, batch(str(image), "-s", str(symbols), *cache, "--out", str(out), *options)


def start_batch(args: list[str], env: dict[str, str], **popen: Any) -> subprocess.Popen:
    """Starts the batch command in the background (for tests that interrupt it)."""
    return subprocess.Popen(
        [sys.executable, "-m", "kcbwait_batch", *args],
        env=_batch_env(env),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        **popen,
    )


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_image(recs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """image path -> {"status": status record, "threads": its thread records in order}."""
    result: dict[str, dict[str, Any]] = {}
    for rec in recs:
        entry = result.setdefault(rec["image"], {"status": None, "threads": []})
        if rec["record"] == records.THREAD:
            assert entry["status"] is None, "thread record after its image's status record"
            entry["threads"].append(rec)
        else:
            assert rec["record"] == records.IMAGE and entry["status"] is None
            entry["status"] = rec
    return result


def comparable(recs: list[dict[str, Any]]) -> list[str]:
    """Records without the run-dependent ``run`` object, in a canonical order."""
    return sorted(json.dumps({k: v for k, v in r.items() if k != "run"}) for r in recs)


def expected_results(directory: Path, symbols: Path, options: dict[str, Any]):
    """image path -> plugin rows, or the Volatility exception the plugin run raised."""
    expected: dict[str, Any] = {}
    for name in [*GOOD, TRUNCATED_RAW, TRUNCATED_DMP, NOT_WINDOWS]:
        path = str(directory / name)
        try:
            expected[path] = run_plugin(Path(path), PLUGIN, [symbols], options)
        except exceptions.VolatilityException as error:
            expected[path] = error
    return expected


def make_batch_dir(images, directory: Path) -> tuple[Path, Path]:
    """The test batch: builder images (symlinked), bad images, and files that are not images."""
    directory.mkdir()
    for scenario in ("basic", "nt-only"):
        paths = images.get(scenario, "lab")
        for kind in ("raw", "dmp"):
            (directory / f"{scenario}-lab.{kind}").symlink_to(paths[kind])
    basic = images.get("basic", "lab")
    with open(basic["raw"], "rb") as src:
        (directory / TRUNCATED_RAW).write_bytes(src.read(4 << 20))
    dump = Path(basic["dmp"]).read_bytes()
    (directory / TRUNCATED_DMP).write_bytes(dump[: _inside_process_data(dump)])
    # An ELF header and text: a file of the right name that is no Windows memory image.
    (directory / NOT_WINDOWS).write_bytes(b"\x7fELF\x02\x01\x01" + b"not a memory image\n" * 4096)
    shutil.copy(basic["truth"], directory / IGNORED[0])
    (directory / IGNORED[1]).write_text("case notes\n")
    return directory, basic["symbols"]


@pytest.fixture(scope="module")
def batch_dir(images, tmp_path_factory) -> tuple[Path, Path]:
    return make_batch_dir(images, tmp_path_factory.mktemp("batch") / "images")


@pytest.fixture(scope="module")
def expected(batch_dir):
    directory, symbols = batch_dir
    return expected_results(directory, symbols, {})


def common_args(batch_dir: tuple[Path, Path], cache: Path) -> list[str]:
    directory, symbols = batch_dir
    return [str(directory), "-s", str(symbols), "--offline", "--cache-path", str(cache)]


def assert_matches_plugin(output: list[dict[str, Any]], expected: dict[str, Any], truths) -> None:
    """Every image's records say exactly what the plugin said about it (rows or failure)."""
    found = by_image(output)
    assert sorted(found) == sorted(expected)
    for path, want in expected.items():
        status, threads = found[path]["status"], found[path]["threads"]
        info = os.stat(path)
        assert status["image_size"] == info.st_size
        assert status["format"] == records.FORMAT
        if isinstance(want, Exception):
            assert status["status"] == records.ERROR, status
            assert "no Windows kernel layer found" in status["error"]
            assert threads == []
            assert status["kernel_build"] is None and status["symbol_guid"] is None
            continue
        assert status["status"] == records.OK and status["error"] is None, status
        assert records.as_plugin_rows(threads) == want
        assert status["threads"] == len(want)
        assert status["callback_frames"] == sum(len(r["__children"]) for r in want)
        assert status["threads_at_return"] == sum("at-return" in r["Reason"] for r in want)
        assert status["threads_in_callback"] == sum("in-callback" in r["Reason"] for r in want)
        name = Path(path).name
        profile = truths["basic" if name == TRUNCATED_DMP else name.split("-lab")[0]]["profile"]
        assert (status["kernel_build"], status["symbol_guid"], status["symbol_age"]) == (
            profile["build"],
            profile["guid"],
            profile["age"],
        )
        for rec in threads:
            for field in (*records.IMAGE_FIELDS, *records.KERNEL_FIELDS):
                assert rec[field] == status[field]


@pytest.fixture(scope="module")
def truths(images):
    return {s: images.truth(s, "lab") for s in ("basic", "nt-only")}


@pytest.fixture(scope="module")
def local_run(batch_dir, tmp_path_factory):
    """One full local batch (2 jobs, --hash), shared by the tests that only read it."""
    work = tmp_path_factory.mktemp("local-run")
    out = work / "out.jsonl"
    result = batch(*common_args(batch_dir, work / "cache"), "--out", str(out), "-j", "2", "--hash")
    return result, out


# -- the batch's output ---------------------------------------------------------------------
def test_output_is_the_plugin_result_per_image(local_run, expected, truths):
    result, out = local_run
    assert result.returncode == 1, result.stderr  # the bad images failed
    output = read_jsonl(out)
    assert_matches_plugin(output, expected, truths)
    # The truncated crash dump is read as far as it goes: the plugin reports what it can.
    truncated_dmp = next(p for p in expected if p.endswith(TRUNCATED_DMP))
    assert not isinstance(expected[truncated_dmp], Exception)


def test_records_carry_image_facts_and_versions(local_run):
    from volatility3.framework import constants

    from kcbwait_batch import framework_runner

    _, out = local_run
    plugin_version, volatility_version = framework_runner.versions()
    assert volatility_version == constants.PACKAGE_VERSION
    for status in (r for r in read_jsonl(out) if r["record"] == records.IMAGE):
        path = status["image"]
        assert status["image_sha256"] == hashlib.sha256(Path(path).read_bytes()).hexdigest()
        assert status["image_mtime"] == records.ImageFile.stat(path).mtime
        assert status["plugin_version"] == plugin_version
        assert status["volatility_version"] == volatility_version
        assert status["options"] == {
            "all-threads": False,
            "at-return-only": False,
            "pid": None,
            "tid": None,
            "stacks": False,
        }
        assert status["run"]["worker"] in ("local-1", "local-2")


def test_summary_and_log_lines(local_run, expected):
    result, _ = local_run
    oks = [p for p, v in expected.items() if not isinstance(v, Exception)]
    threads = sum(len(expected[p]) for p in oks)
    at_return = sum("at-return" in r["Reason"] for p in oks for r in expected[p])
    in_callback = sum("in-callback" in r["Reason"] for p in oks for r in expected[p])
    assert f"images: {len(oks)} ok, {len(expected) - len(oks)} failed" in result.stderr
    assert (
        f"threads reported: {threads}; at ZwCallbackReturn: {at_return}; "
        f"in callbacks: {in_callback}"
    ) in result.stderr
    assert "images/minute" in result.stderr
    # Not a terminal: one plain line per image, no bar.
    assert "\x1b[K" not in result.stderr and "img/min" not in result.stderr
    assert sum(line.startswith("[") for line in result.stderr.splitlines()) == len(expected)


def test_all_threads_as_csv(batch_dir, tmp_path):
    directory, symbols = batch_dir
    out = tmp_path / "out.csv"
    result = batch(
        *common_args(batch_dir, tmp_path / "cache"),
        "--out",
        str(out),
        "--all-threads",
        "--progress",
        "bar",
    )
    assert result.returncode == 1, result.stderr
    # The bar was drawn (text mode turned its carriage returns into newlines).
    assert "\x1b[K[" in result.stderr and "img/min" in result.stderr
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0].keys()) == writer.CSV_COLUMNS
    for name in GOOD:
        path = str(directory / name)
        want = run_plugin(Path(path), PLUGIN, [symbols], {"all-threads": True})
        mine = [r for r in rows if r["image"] == path]
        threads = [r for r in mine if r["record"] == records.THREAD]
        frames = [r for r in mine if r["record"] == records.FRAME]
        assert [(int(r["PID"]), int(r["TID"]), r["Reason"]) for r in threads] == [
            (r["PID"], r["TID"], r["Reason"]) for r in want
        ]
        assert [(int(r["TID"]), int(r["Level"]), int(r["Handler"] or 0)) for r in frames] == [
            (c["TID"], c["Level"], c["Handler"] or 0) for r in want for c in r["__children"]
        ]
        status = next(r for r in mine if r["record"] == records.IMAGE)
        assert json.loads(status["options"])["all-threads"] is True
    errors = [r for r in rows if r["record"] == records.IMAGE and r["status"] == records.ERROR]
    assert {Path(r["image"]).name for r in errors} == {TRUNCATED_RAW, NOT_WINDOWS}


def test_pid_filter_is_passed_to_the_plugin(batch_dir, tmp_path):
    directory, symbols = batch_dir
    image = directory / "basic-lab.raw"
    out, result = batch_one(image, symbols, tmp_path, "--pid", "2468", "3580")
    assert result.returncode == 0, result.stderr
    want = run_plugin(image, PLUGIN, [symbols], {"pid": [2468, 3580]})
    output = by_image(read_jsonl(out))[str(image)]
    assert records.as_plugin_rows(output["threads"]) == want
    assert output["status"]["options"]["pid"] == [2468, 3580]


def test_stacks_add_each_threads_kcbstack_frames(batch_dir, truths, local_run, tmp_path):
    directory, symbols = batch_dir
    image = directory / "basic-lab.raw"
    out, result = batch_one(image, symbols, tmp_path, "--all-threads", "--stacks")
    assert result.returncode == 0, result.stderr
    output = by_image(read_jsonl(out))[str(image)]
    assert output["status"]["options"]["stacks"] is True
    columns = dict(
        zip(
            records.STACK_COLUMNS,
            ("frame", "callback_level", "rip", "symbol", "rsp", "how", "notes"),
            strict=True,
        )
    )
    got = [
        [{key: frame[column] for column, key in columns.items()} for frame in thread["stack"]]
        for thread in output["threads"]
    ]
    assert got == [t["stack"] for t in truths["basic"]["threads"]]
    # Without --stacks (the shared local run), thread records carry no "stack".
    plain = [r for r in read_jsonl(local_run[1]) if r["record"] == records.THREAD]
    assert plain and all("stack" not in r for r in plain)


def test_plugin_columns_are_the_plugins(batch_dir):
    directory, symbols = batch_dir
    run_plugin(directory / "basic-lab.raw", PLUGIN, [symbols])  # loads the plugin module
    from volatility3.plugins.windows import kcbwait

    assert tuple(name for name, _ in kcbwait.COLUMNS) == records.PLUGIN_COLUMNS


# -- resume --------------------------------------------------------------------------------
def test_resume_after_a_killed_run_gives_the_same_output(batch_dir, local_run, tmp_path):
    _, full = local_run
    out = tmp_path / "out.jsonl"
    args = [*common_args(batch_dir, tmp_path / "cache"), "--out", str(out), "-j", "1", "--hash"]
    proc = start_batch(args, {"KCBWAIT_BATCH_FAULT": "slow:0.5"}, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_text().count('"record": "image"') >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the batch finished before it could be interrupted"
        proc.kill()  # SIGKILL: no chance to clean up
    finally:
        proc.wait()
    before = read_jsonl(out)
    done_before = {r["image"] for r in before if r["record"] == records.IMAGE}
    assert 2 <= len(done_before) < len(by_image(read_jsonl(full)))
    # What a kill during a write leaves: thread records without their status, a torn line.
    first = next(
        r
        for r in read_jsonl(full)
        if r["record"] == records.THREAD and r["image"] not in done_before
    )
    with open(out, "a") as handle:
        handle.write(json.dumps(first) + "\n" + json.dumps(first)[:50])

    result = batch(*args, "--resume")
    assert result.returncode == 1, result.stderr
    assert f"{len(done_before)} already complete (skipped)" in result.stderr
    after = read_jsonl(out)
    assert comparable(after) == comparable(read_jsonl(full))
    # The complete images were kept as they were, not analysed again.
    kept = [r for r in after if r["record"] == records.IMAGE and r["image"] in done_before]
    assert kept == [r for r in before if r["record"] == records.IMAGE]


def test_resume_of_a_complete_output_and_retry_failed(batch_dir, local_run, tmp_path):
    _, full = local_run
    out = tmp_path / "out.jsonl"
    shutil.copy(full, out)
    args = [*common_args(batch_dir, tmp_path / "cache"), "--out", str(out), "--hash"]
    result = batch(*args, "--resume")
    assert result.returncode == 1  # the output still holds failed images
    assert out.read_text() == full.read_text()
    assert "2 earlier failed images kept" in result.stderr

    result = batch(*args, "--resume", "--retry-failed")
    assert result.returncode == 1
    redone = [r for r in read_jsonl(out)[-2:]]
    assert {Path(r["image"]).name for r in redone} == {TRUNCATED_RAW, NOT_WINDOWS}
    assert comparable(read_jsonl(out)) == comparable(read_jsonl(full))


def test_resume_reanalyses_a_changed_image(batch_dir, tmp_path):
    directory, symbols = batch_dir
    image = tmp_path / "changing.raw"
    image.write_bytes(b"first version")
    out = tmp_path / "out.jsonl"
    args = [
        str(image),
        "-s",
        str(symbols),
        "--offline",
        "--cache-path",
        str(tmp_path / "c"),
        "--out",
        str(out),
    ]
    assert batch(*args).returncode == 1
    image.write_bytes(b"second, longer version")
    assert batch(*args, "--resume").returncode == 1
    statuses = [r for r in read_jsonl(out) if r["record"] == records.IMAGE]
    assert [s["image_size"] for s in statuses] == [image.stat().st_size]


def test_output_guards(batch_dir, local_run, tmp_path):
    _, full = local_run
    out = tmp_path / "out.jsonl"
    shutil.copy(full, out)
    args = [*common_args(batch_dir, tmp_path / "cache"), "--out", str(out)]
    result = batch(*args)
    assert result.returncode == 2 and "use --resume" in result.stderr
    result = batch(*args, "--resume", "--all-threads")
    assert result.returncode == 2 and "options" in result.stderr
    assert out.read_text() == full.read_text()
    result = batch(str(tmp_path / "missing.raw"), "--out", str(tmp_path / "x.jsonl"))
    assert result.returncode == 2 and "no such file" in result.stderr


# -- isolation -------------------------------------------------------------------------------
def test_hang_and_crash_do_not_stop_the_batch(batch_dir, expected, truths, tmp_path):
    directory, _ = batch_dir
    out = tmp_path / "out.jsonl"
    fifo = tmp_path / "fifo.raw"
    os.mkfifo(fifo)  # opening it blocks forever: a real hang inside Volatility
    env = {"KCBWAIT_BATCH_FAULT": "hang:nt-only-lab.raw,crash:basic-lab.dmp"}
    started = time.monotonic()
    result = batch(
        *common_args(batch_dir, tmp_path / "cache"),
        str(fifo),
        "--out",
        str(out),
        "-j",
        "2",
        "--timeout",
        "4",
        env=env,
    )
    assert time.monotonic() - started < 90
    assert result.returncode == 1, result.stderr
    found = by_image(read_jsonl(out))
    status = {Path(p).name: e["status"]["status"] for p, e in found.items()}
    assert status["nt-only-lab.raw"] == records.TIMEOUT
    assert status["fifo.raw"] == records.TIMEOUT
    assert status["basic-lab.dmp"] == records.CRASHED
    assert "killed by SIGKILL" in found[str(directory / "basic-lab.dmp")]["status"]["error"]
    assert "timed out after 4s" in found[str(fifo)]["status"]["error"]
    # Every other image is analysed as usual, by replacement workers.
    rest = {
        p: v
        for p, v in expected.items()
        if Path(p).name not in ("nt-only-lab.raw", "basic-lab.dmp")
    }
    assert_matches_plugin([r for r in read_jsonl(out) if r["image"] in rest], rest, truths)


def test_interrupt_leaves_whole_images(batch_dir, tmp_path):
    out = tmp_path / "out.jsonl"
    args = [*common_args(batch_dir, tmp_path / "cache"), "--out", str(out), "-j", "1"]
    proc = start_batch(args, {"KCBWAIT_BATCH_FAULT": "slow:0.5"}, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out.exists() and out.stat().st_size):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr
    existing = writer.load_existing(out, writer.JSONL)
    assert existing.dropped_lines == 0 and existing.status
    assert sum(len(b) for b in existing.blocks.values()) == len(out.read_text().splitlines())


# -- units -----------------------------------------------------------------------------------
def test_discovery_takes_image_names_in_directories_and_any_named_file(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.RAW", "a.dmp", "c.vmem", "notes.txt", "x.truth.json", "sub/d.raw"):
        (tmp_path / name).write_bytes(b"x")
    assert [Path(p).name for p in discovery.find_images([str(tmp_path)])] == [
        "a.dmp",
        "b.RAW",
        "c.vmem",
    ]
    found = discovery.find_images([str(tmp_path), str(tmp_path / "notes.txt")], recursive=True)
    assert [Path(p).name for p in found] == ["a.dmp", "b.RAW", "c.vmem", "d.raw", "notes.txt"]
    assert discovery.find_images([str(tmp_path)], ["*.txt"]) == [str(tmp_path / "notes.txt")]
    with pytest.raises(discovery.DiscoveryError):
        discovery.find_images([str(tmp_path / "nope")])


def _outcome(rows: list[dict[str, Any]]) -> records.ImageOutcome:
    return records.ImageOutcome(
        status=records.OK,
        rows=rows,
        kernel_build=19041,
        symbol_guid="AB",
        symbol_age=1,
        plugin_version="1.0.0",
        volatility_version="2.28.2",
        seconds=0.5,
        worker="w",
    )


def test_writer_round_trip_and_torn_output(tmp_path):
    row = {c: None for c in records.PLUGIN_COLUMNS}
    row.update(PID=4, TID=8, Reason="at-return", Level=0, Notes='a, "quoted"\nnote')
    child = {**row, "Level": 1, "Reason": "callback", "__children": []}
    rows = [{**row, "__children": [child]}]
    for fmt in writer.FORMATS:
        out = tmp_path / f"out.{fmt}"
        images = []
        with writer.OutputWriter(out, fmt) as w:
            for n in range(3):
                image = tmp_path / f"{n}.raw"
                image.write_bytes(b"x" * n)
                images.append(records.ImageFile.stat(image))
                w.write_image(records.image_records(images[-1], _outcome(rows), {"o": 1}))
        whole = out.read_text()
        existing = writer.load_existing(out, fmt)
        assert list(existing.status) == [i.path for i in images]
        assert existing.status[images[0].path]["image_size"] == 0
        assert existing.status[images[0].path]["options"] == {"o": 1}
        # Cut inside the last image's block: that image is incomplete, the others are kept.
        out.write_text(whole[: whole.rindex(images[2].path) - 5])
        existing = writer.load_existing(out, fmt)
        assert list(existing.status) == [i.path for i in images[:2]]
        existing.rewrite(out, {images[1].path})
        assert list(writer.load_existing(out, fmt).status) == [images[1].path]
    records_ = records.image_records(images[0], _outcome(rows), {})
    assert records.as_plugin_rows(records_[:-1]) == rows
    assert records_[-1]["threads_at_return"] == 1 and records_[-1]["callback_frames"] == 1


def test_missing_symbol_table_names_the_kernel_pdb(images, tmp_path):
    """Offline without the kernel's table, the status says which GUID/age to supply."""
    from kcbwait_batch import framework_runner
    from tests.support.volrun import PLUGIN_DIR

    paths = images.get("basic", "lab")
    truth = images.truth("basic", "lab")
    empty = tmp_path / "no-symbols"
    empty.mkdir()
    config = framework_runner.FrameworkConfig(
        symbol_dirs=(str(empty),), plugin_dirs=(str(PLUGIN_DIR),), offline=True, private_cache=True
    )
    with pytest.raises(framework_runner.ImageError) as raised:
        framework_runner.run_kcbwait(paths["raw"], config)
    guid, age = truth["profile"]["guid"], truth["profile"]["age"]
    assert f"GUID {guid} age {age}" in str(raised.value)
    assert f"windows/ntkrnlmp.pdb/{guid}-{age}.json.xz" in str(raised.value)
