"""The analysis process: ``python -m kcbwait_batch.child``, driven by an isolation supervisor.

Protocol (JSON, one object per line): the supervisor writes the framework configuration
(``{"framework": {...}}``), then one ``{"task": {...}}`` per image on stdin; this process
answers ``{"event": "ready", ...}`` once, then for each task any number of
``{"event": "progress", ...}`` lines and one ``{"event": "result", "outcome": {...}}``.
End of input ends the process.

Only protocol lines go to the real stdout: whatever a library prints is sent to stderr
(which the supervisor keeps for error messages), so it can never corrupt the protocol.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from typing import Any, TextIO

PARENT_POLL_SECONDS = 1.0


def _protocol_stream() -> TextIO:
    """A private copy of stdout for the protocol; fd 1 itself is pointed at stderr."""
    stream = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    return stream


def _watch_parent() -> None:
    """Exits when the supervisor goes away (a hung analysis would never read end of input)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(PARENT_POLL_SECONDS)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = _protocol_stream()
    lock = threading.Lock()

    def send(message: dict[str, Any]) -> None:
        line = json.dumps(message, separators=(",", ":"))
        with lock:
            out.write(line + "\n")
            out.flush()

    logging.basicConfig(
        level=logging.DEBUG if "--verbose" in args else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    _watch_parent()

    from kcbwait_batch import framework_runner, tasks

    first = sys.stdin.readline()
    if not first:
        return 0
    config = framework_runner.FrameworkConfig.from_json(json.loads(first)["framework"])
    ready: dict[str, Any] = {"event": "ready", "pid": os.getpid()}
    try:
        # Loading the framework and every plugin once here, not in the first task, keeps the
        # per-image timeout about the image.
        framework_runner.prepare(config)
        ready["plugin_version"], ready["volatility_version"] = framework_runner.versions()
    except Exception as error:  # noqa: BLE001 - reported per task by execute() as well
        ready["error"] = f"{type(error).__name__}: {error}"
    send(ready)

    for line in sys.stdin:
        if not line.strip():
            continue
        task = tasks.ImageTask.from_json(json.loads(line)["task"])
        outcome = tasks.execute(task, lambda event: send({"event": "progress", **event}))
        send({"event": "result", "outcome": outcome.to_json()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
