"""A throwaway Dask cluster on this machine, bound to 127.0.0.1 (tests, benchmarks, trials).

It runs the real command-line programs, ``dask scheduler`` and ``dask worker``, as separate
process groups, exactly as an operator would start them on cluster nodes, so that what runs
against it is what would run against a real cluster (tasks serialised over TCP, worker
processes under nannies).  Use as a context manager; leaving it stops every process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO

START_TIMEOUT = 90.0
STOP_TIMEOUT = 20.0
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])


class ClusterError(Exception):
    """The cluster did not come up; the message quotes the failing process's log."""


class LoopbackCluster:
    """``workers`` Dask workers with ``threads`` threads each, plus a scheduler, on loopback.

    ``env`` is added to the processes' environment (e.g. ``KCBWAIT_BATCH_FAULT`` for fault
    injection in the analysis processes the workers start).  Logs go to ``work_dir``.
    """

    def __init__(
        self,
        workers: int = 2,
        threads: int = 1,
        env: dict[str, str] | None = None,
        work_dir: Path | None = None,
    ) -> None:
        self.workers = workers
        self.threads = threads
        self.extra_env = env or {}
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if work_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="kcbwait-dask-")
            work_dir = Path(self._tmp.name)
        self.work_dir = work_dir
        self.address = ""
        self.worker_addresses: list[str] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []

    def _start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, **self.extra_env}
        # Workers must import this copy of kcbwait_batch (a checkout or an install).
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p
        )
        log = open(self.work_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        proc = subprocess.Popen(
            [sys.executable, "-m", "dask", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.work_dir,
            start_new_session=True,  # its own process group, stopped as a whole
        )
        self._procs.append(proc)
        return proc

    def _log(self, name: str) -> str:
        return (self.work_dir / f"{name}.log").read_text(errors="replace")[-4000:]

    def start(self) -> LoopbackCluster:
        scheduler_file = self.work_dir / "scheduler.json"
        scheduler = self._start(
            "scheduler",
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",  # any free port: read back from the scheduler file
            "--no-dashboard",
            "--scheduler-file",
            str(scheduler_file),
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not self.address:
            if scheduler.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ClusterError(f"dask scheduler did not start:\n{self._log('scheduler')}")
            try:
                self.address = json.loads(scheduler_file.read_text())["address"]
            except (OSError, ValueError, KeyError):
                time.sleep(0.1)
        for n in range(1, self.workers + 1):
            self._start(
                f"worker{n}",
                "worker",
                self.address,
                "--name",
                f"worker{n}",
                "--nthreads",
                str(self.threads),
                "--host",
                "127.0.0.1",
                "--no-dashboard",
                "--memory-limit",
                "0",
                "--local-directory",
                str(self.work_dir / f"worker{n}"),
            )
        self._wait_for_workers(deadline)
        return self

    def _wait_for_workers(self, deadline: float) -> None:
        from distributed import Client

        try:
            with Client(self.address, timeout="30s", set_as_default=False) as client:
                client.wait_for_workers(self.workers, timeout=max(1.0, deadline - time.monotonic()))
                self.worker_addresses = sorted(client.scheduler_info()["workers"])
        except Exception as error:
            logs = "\n".join(self._log(f"worker{n}") for n in range(1, self.workers + 1))
            self.stop()
            raise ClusterError(f"dask workers did not join ({error}):\n{logs}") from None

    def stop(self) -> None:
        """SIGTERM to workers, then the scheduler; SIGKILL whatever is left after a while."""
        workers, scheduler = self._procs[1:], self._procs[:1]
        for group in (workers, scheduler):
            for proc in group:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT
            for proc in group:
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        self._procs.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LoopbackCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
