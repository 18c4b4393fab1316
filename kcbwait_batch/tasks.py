"""One batch task (analyse one image) and its execution inside a worker process.

:class:`ImageTask` is what crosses process and machine boundaries (JSON-able, no framework
objects); :func:`execute` runs in the isolated analysis process and never raises for a bad
image: every failure becomes an ``error`` outcome whose message goes to the status record.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kcbwait_batch import records
from kcbwait_batch.framework_runner import FrameworkConfig

vollog = logging.getLogger(__name__)

# Fault injection for the tests (and for trying a deployment's failure handling): a value
# "hang:TEXT", "crash:TEXT" or "slow:SECONDS" makes the analysis process hang forever, die
# by SIGKILL, or sleep before each image whose path contains TEXT.  Several faults may be
# given, separated by commas.  Read by the analysis process, so set it where workers start.
FAULT_ENV = "KCBWAIT_BATCH_FAULT"

HASH_CHUNK = 1 << 20

EventCallback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class ImageTask:
    """Analyse ``image`` with windows.kcbwait ``options`` under ``framework`` settings."""

    image: str
    options: dict[str, Any] = field(default_factory=dict)
    framework: FrameworkConfig = field(default_factory=FrameworkConfig)
    sha256: bool = False
    stacks: bool = False
    """Also walk each listed thread's call stack (windows.kcbstack)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "options": self.options,
            "framework": self.framework.to_json(),
            "sha256": self.sha256,
            "stacks": self.stacks,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageTask:
        return cls(
            image=data["image"],
            options=dict(data.get("options", {})),
            framework=FrameworkConfig.from_json(data.get("framework", {})),
            sha256=bool(data.get("sha256", False)),
            stacks=bool(data.get("stacks", False)),
        )


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _inject_faults(image: str) -> None:
    for fault in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        kind, _, arg = fault.partition(":")
        if kind == "slow":
            time.sleep(float(arg))
        elif kind == "hang" and arg in image:
            while True:
                time.sleep(3600)
        elif kind == "crash" and arg in image:
            os.kill(os.getpid(), signal.SIGKILL)


def execute(task: ImageTask, emit: EventCallback) -> records.ImageOutcome:
    """Analyses ``task.image`` in this process; ``emit`` receives progress events
    (``{"stage": name}``, ``{"sha256": hex}``) as they happen, so a supervisor still knows
    them if this process dies or hangs afterwards."""
    # Imported here: a supervisor process that only forwards tasks need not load Volatility.
    from kcbwait_batch import framework_runner

    started = time.perf_counter()
    sha256 = None
    try:
        emit({"stage": "started"})
        _inject_faults(task.image)
        if task.sha256:
            emit({"stage": "hashing"})
            sha256 = sha256_file(task.image)
            emit({"sha256": sha256})
        run = framework_runner.run_kcbwait(
            task.image,
            task.framework,
            task.options,
            on_stage=lambda stage: emit({"stage": stage}),
            stacks=task.stacks,
        )
    except framework_runner.ImageError as error:
        return _failure(str(error), sha256, started)
    except Exception as error:  # noqa: BLE001 - any failure of one image is that image's error
        vollog.debug("analysis of %s failed:\n%s", task.image, traceback.format_exc())
        return _failure(f"{type(error).__name__}: {error}", sha256, started)
    return records.ImageOutcome(
        status=records.OK,
        rows=run.rows,
        kernel_build=run.kernel.build,
        symbol_guid=run.kernel.pdb_guid,
        symbol_age=run.kernel.pdb_age,
        plugin_version=run.plugin_version,
        volatility_version=run.volatility_version,
        sha256=sha256,
        seconds=time.perf_counter() - started,
    )


def _failure(message: str, sha256: str | None, started: float) -> records.ImageOutcome:
    # Versions are still worth recording on a failure: they say what could not read the image.
    from kcbwait_batch import framework_runner

    try:
        plugin_version, volatility_version = framework_runner.versions()
    except Exception:  # noqa: BLE001 - the framework itself may be what failed
        plugin_version = volatility_version = None
    return records.ImageOutcome(
        status=records.ERROR,
        error=message,
        sha256=sha256,
        plugin_version=plugin_version,
        volatility_version=volatility_version,
        seconds=time.perf_counter() - started,
    )
