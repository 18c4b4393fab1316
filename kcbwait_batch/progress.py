"""Progress display: a one-line bar on a terminal, plain log lines otherwise.

On a terminal the bar shows images done of total, failures, rate, ETA and the stage of the
image that moved last (with several workers, the others are counted as active).  When
stderr is a file or a pipe (CI, ``nohup``, a scheduler's log), one line per finished image is
written instead, so logs stay readable and greppable.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from typing import Any, TextIO

REDRAW_SECONDS = 0.1
TICK_SECONDS = 1.0
BAR_WIDTH = 24


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class Progress:
    """Thread-safe progress reporting for a batch of ``total`` images."""

    def __init__(
        self,
        total: int,
        stream: TextIO | None = None,
        interactive: bool | None = None,
        quiet: bool = False,
    ) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.quiet = quiet
        self.done = 0
        self.failed = 0
        self._active: dict[str, str] = {}
        self._finished: set[str] = set()
        self._latest = ""
        self._started = time.monotonic()
        self._drawn = 0.0
        self._line_shown = False
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if self.interactive and not quiet:
            # Keeps elapsed time and ETA moving while a long image shows no events.
            self._ticker = threading.Thread(target=self._tick, name="progress", daemon=True)
            self._ticker.start()

    # -- events ------------------------------------------------------------------------
    def log(self, line: str) -> None:
        """A message line (shown in both modes; the bar is redrawn under it)."""
        if self.quiet:
            return
        with self._lock:
            self._clear()
            self.stream.write(line + "\n")
            self.stream.flush()
            self._draw(force=True)

    def stage(self, image: str, stage: str) -> None:
        with self._lock:
            # Dask delivers stage events and results on separate paths: a stage may arrive
            # after its image finished and must not resurrect it.
            if image in self._finished:
                return
            self._active[image] = stage
            self._latest = image
            self._draw()

    def image_done(self, status: dict[str, Any]) -> None:
        with self._lock:
            image = status["image"]
            self._finished.add(image)
            self._active.pop(image, None)
            self.done += 1
            if status["status"] != "ok":
                self.failed += 1
            if not self.interactive or status["status"] != "ok":
                self.log(self._done_line(status))
            else:
                self._draw(force=True)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self._clear()

    # -- rendering -------------------------------------------------------------------------
    def _done_line(self, status: dict[str, Any]) -> str:
        width = len(str(self.total))
        head = f"[{self.done:>{width}}/{self.total}] {status['status']:<7} {status['image']}"
        if status["status"] != "ok":
            return f"{head}: {status['error']}"
        return (
            f"{head}: {status['threads']} threads, {status['threads_at_return']} at return, "
            f"{status['threads_in_callback']} in callbacks ({status['run']['seconds']:.1f}s)"
        )

    def _status_line(self) -> str:
        elapsed = time.monotonic() - self._started
        filled = BAR_WIDTH * self.done // self.total if self.total else BAR_WIDTH
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        rate = self.done * 60.0 / elapsed if elapsed > 0 else 0.0
        parts = [f"[{bar}] {self.done}/{self.total}"]
        if self.failed:
            parts.append(f"{self.failed} failed")
        parts.append(f"{rate:.1f} img/min")
        if 0 < self.done < self.total:
            parts.append(f"ETA {_duration(elapsed / self.done * (self.total - self.done))}")
        else:
            parts.append(_duration(elapsed))
        if self._latest in self._active:
            name = self._latest.rsplit("/", 1)[-1]
            more = len(self._active) - 1
            parts.append(
                f"{name}: {self._active[self._latest]}" + (f" (+{more} active)" if more else "")
            )
        return " | ".join(parts)

    def _draw(self, force: bool = False) -> None:
        if not self.interactive or self.quiet or self._stop.is_set():
            return
        now = time.monotonic()
        if not force and now - self._drawn < REDRAW_SECONDS:
            return
        self._drawn = now
        width = shutil.get_terminal_size((100, 20)).columns - 1
        self.stream.write("\r\x1b[K" + self._status_line()[:width])
        self.stream.flush()
        self._line_shown = True

    def _clear(self) -> None:
        if self._line_shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._line_shown = False

    def _tick(self) -> None:
        while not self._stop.wait(TICK_SECONDS):
            with self._lock:
                self._draw(force=True)
