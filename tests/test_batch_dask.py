"""kcbwait-batch on a real Dask cluster: same output as local mode, same isolation.

The test starts its own cluster on loopback (``dask scheduler`` and two ``dask worker``
processes with one thread each, as separate processes, through
kcbwait_batch.loopback_cluster), runs the batch of test_batch.py through it with
``--scheduler``, and always tears the cluster down.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kcbwait_batch import records
from kcbwait_batch.loopback_cluster import LoopbackCluster
from tests.test_batch import (
    batch,
    by_image,
    common_args,
    comparable,
    make_batch_dir,
    read_jsonl,
)

distributed = pytest.importorskip(
    "distributed", reason="dask.distributed is not installed (pip install '.[batch-dask]')"
)

WORKERS = 2
# Fault injection in the workers' analysis processes, for images named on purpose only.
WORKER_FAULTS = "hang:hang-me,crash:crash-me"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[LoopbackCluster]:
    """``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1, torn down after."""
    work = tmp_path_factory.mktemp("dask-cluster")
    with LoopbackCluster(WORKERS, 1, {"KCBWAIT_BATCH_FAULT": WORKER_FAULTS}, work) as running:
        assert running.address.startswith("tcp://127.0.0.1:")
        processes = list(running._procs)
        yield running
    assert all(proc.poll() is not None for proc in processes), "cluster left running"


@pytest.fixture(scope="module")
def batch_dir(images, tmp_path_factory) -> tuple[Path, Path]:
    """The batch of test_batch.py: good, truncated and non-Windows images."""
    return make_batch_dir(images, tmp_path_factory.mktemp("dask-batch") / "images")


@pytest.fixture(scope="module")
def local_run(batch_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("dask-local-run")
    out = work / "out.jsonl"
    result = batch(*common_args(batch_dir, work / "cache"), "--out", str(out), "--hash")
    return result, out


def test_dask_output_is_identical_to_local(cluster, batch_dir, local_run, tmp_path):
    local_result, local_out = local_run
    out = tmp_path / "out.jsonl"
    result = batch(
        *common_args(batch_dir, tmp_path / "cache"),
        "--out",
        str(out),
        "--hash",
        "--scheduler",
        cluster.address,
    )
    assert result.returncode == local_result.returncode == 1, result.stderr
    assert f"{WORKERS} workers, {WORKERS} threads" in result.stderr
    output = read_jsonl(out)
    assert comparable(output) == comparable(read_jsonl(local_out))
    workers = {r["run"]["worker"] for r in output if r["record"] == records.IMAGE}
    assert workers <= set(cluster.worker_addresses)


def test_dask_isolates_hangs_and_crashes(cluster, batch_dir, tmp_path):
    directory, symbols = batch_dir
    images = tmp_path / "images"
    images.mkdir()
    for name, target in (
        ("hang-me.raw", "basic-lab.raw"),
        ("crash-me.raw", "basic-lab.raw"),
        ("fine.raw", "nt-only-lab.raw"),
    ):
        (images / name).symlink_to(directory / target)
    out = tmp_path / "out.jsonl"
    started = time.monotonic()
    result = batch(
        str(images),
        "-s",
        str(symbols),
        "--offline",
        "--cache-path",
        str(tmp_path / "cache"),
        "--out",
        str(out),
        "--timeout",
        "4",
        "--scheduler",
        cluster.address,
    )
    assert time.monotonic() - started < 90
    assert result.returncode == 1, result.stderr
    found = {Path(p).name: e for p, e in by_image(read_jsonl(out)).items()}
    assert found["hang-me.raw"]["status"]["status"] == records.TIMEOUT
    assert found["crash-me.raw"]["status"]["status"] == records.CRASHED
    assert "killed by SIGKILL" in found["crash-me.raw"]["status"]["error"]
    assert found["fine.raw"]["status"]["status"] == records.OK
    assert found["fine.raw"]["threads"]
    # The workers survived: the cluster still has both.
    with distributed.Client(cluster.address, timeout="30s") as client:
        assert len(client.scheduler_info()["workers"]) == WORKERS


def test_unreachable_scheduler_is_a_clear_error(batch_dir, tmp_path):
    directory, _ = batch_dir
    out = tmp_path / "out.jsonl"
    result = batch(
        str(directory / "basic-lab.raw"),
        "--out",
        str(out),
        "--scheduler",
        "tcp://127.0.0.1:9",
        env={"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"},
    )
    assert result.returncode == 2
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in result.stderr
    assert not out.exists()
