"""Crash and hang isolation: each analysis runs in a supervised child process.

An :class:`IsolatedWorker` owns one ``python -m kcbwait_batch.child`` process and feeds it one
image at a time.  The child stays up between images (loading Volatility and its plugins costs
about a second, often more than analysing a small image), and is replaced when it

- dies (segfault, out-of-memory kill, ``os._exit`` in a library): the image is ``crashed``;
- exceeds the per-image timeout: it is killed and the image is ``timeout``;
- has served ``tasks_per_child`` images: recycled, so that memory a framework cache keeps
  from one image cannot pile up over thousands of them.

The child is a plain ``subprocess`` rather than a ``multiprocessing`` process on purpose: Dask
workers run as daemonic processes, which ``multiprocessing`` forbids to have children, and
the same worker class serves the local pool and Dask workers alike.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from kcbwait_batch import records
from kcbwait_batch.framework_runner import FrameworkConfig
from kcbwait_batch.tasks import ImageTask

log = logging.getLogger(__name__)

STARTUP_TIMEOUT = 180.0  # importing Volatility and every plugin, on a loaded machine
STDERR_TAIL_LINES = 20
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])

StageCallback = Callable[[str], None]
LogSink = Callable[[str], None]


class ChildGone(Exception):
    """The child process ended or stopped answering."""


class IsolatedWorker:
    """Runs tasks one at a time in a supervised child process (see the module docstring)."""

    def __init__(
        self,
        name: str = "worker",
        tasks_per_child: int = 0,
        verbose: bool = False,
        log_sink: LogSink | None = None,
    ) -> None:
        self.name = name
        self.tasks_per_child = tasks_per_child
        self.verbose = verbose
        self.log_sink = log_sink
        self._proc: subprocess.Popen[bytes] | None = None
        self._config: FrameworkConfig | None = None
        self._served = 0
        self._buffer = b""
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._ready: dict[str, Any] = {}

    # -- child lifecycle -------------------------------------------------------------
    def _spawn(self, config: FrameworkConfig) -> None:
        env = dict(os.environ)
        # The child must import this very copy of kcbwait_batch (a checkout or an install).
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p
        )
        argv = [sys.executable, "-m", "kcbwait_batch.child"]
        if self.verbose:
            argv.append("--verbose")
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            # Its own session: a terminal's Ctrl-C reaches the supervisor, which then stops
            # the children in order, instead of every child printing a traceback.
            start_new_session=True,
        )
        self._buffer = b""
        self._stderr_tail.clear()
        self._served = 0
        self._config = config
        threading.Thread(target=self._drain_stderr, args=(self._proc.stderr,), daemon=True).start()
        self._send({"framework": config.to_json()})
        self._ready = self._read_message(time.monotonic() + STARTUP_TIMEOUT)
        if self._ready.get("event") != "ready":
            raise ChildGone(f"unexpected first message from the analysis process: {self._ready}")

    def _drain_stderr(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip()
            self._stderr_tail.append(line)
            if self.log_sink is not None:
                self.log_sink(f"{self.name}: {line}")

    def close(self) -> None:
        """Ends the child: end of input first, then a kill if it does not go."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.stdin:
                proc.stdin.close()
            proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self._kill(proc)
        finally:
            if proc.stdout:
                proc.stdout.close()

    def terminate(self) -> None:
        """Kills the child from another thread (stopping a batch); the thread running a task
        on it sees the child end and returns."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # also whatever the analysis started
        except OSError:
            proc.kill()
        proc.wait()

    # -- protocol ----------------------------------------------------------------------
    def _send(self, message: dict[str, Any]) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write(json.dumps(message).encode() + b"\n")
            self._proc.stdin.flush()
        except OSError as error:
            raise ChildGone(f"analysis process not accepting work: {error}") from None

    def _read_message(self, deadline: float | None) -> dict[str, Any]:
        """The next protocol line; TimeoutError at ``deadline``, ChildGone at end of output."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError
                if not selector.select(remaining):
                    continue
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise ChildGone("analysis process ended")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    # -- one task ------------------------------------------------------------------------
    def run(
        self, task: ImageTask, timeout: float | None, on_stage: StageCallback | None = None
    ) -> records.ImageOutcome:
        """Analyses ``task`` in the child; never raises for what the image or child does."""
        stage = on_stage or (lambda _name: None)
        started = time.perf_counter()
        facts: dict[str, Any] = {}
        current = "starting"
        self._stderr_tail.clear()  # an error message should quote this image's output only
        try:
            if self._proc is None or self._config != task.framework:
                self.close()
                stage("starting worker")
                self._spawn(task.framework)
            self._send({"task": task.to_json()})
            deadline = None if not timeout else time.monotonic() + timeout
            while True:
                message = self._read_message(deadline)
                if message.get("event") == "result":
                    outcome = records.ImageOutcome.from_json(message["outcome"])
                    break
                if "stage" in message:
                    current = message["stage"]
                    stage(current)
                if "sha256" in message:
                    facts["sha256"] = message["sha256"]
        except TimeoutError:
            self._abandon_child()
            outcome = records.ImageOutcome.failure(
                records.TIMEOUT, f"timed out after {timeout:g}s (stage: {current})", **facts
            )
        except (ChildGone, ValueError) as error:
            outcome = records.ImageOutcome.failure(
                records.CRASHED, self._crash_message(error, current), **facts
            )
            self._abandon_child()
        self._served += 1
        if self.tasks_per_child and self._served >= self.tasks_per_child:
            self.close()
        # The analysis process knows its versions even when it died on this image.
        outcome.plugin_version = outcome.plugin_version or self._ready.get("plugin_version")
        outcome.volatility_version = outcome.volatility_version or self._ready.get(
            "volatility_version"
        )
        if outcome.status != records.OK:
            outcome.seconds = time.perf_counter() - started
        outcome.worker = outcome.worker or self.name
        return outcome

    def _abandon_child(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            self._kill(proc)
            if proc.stdout:
                proc.stdout.close()
            if proc.stdin:
                with contextlib.suppress(OSError):
                    proc.stdin.close()

    def _crash_message(self, error: Exception, stage: str) -> str:
        proc = self._proc
        code = None
        if proc is not None:
            try:
                code = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                code = None
        if code is not None and code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        elif code is not None:
            how = f"exited with status {code}"
        else:
            how = str(error)
        time.sleep(0.05)  # let the stderr drain catch the child's last words
        tail = [line for line in self._stderr_tail if line.strip()][-3:]
        last_words = f"; stderr: {' | '.join(tail)}" if tail else ""
        return f"analysis process {how} (stage: {stage}){last_words}"
