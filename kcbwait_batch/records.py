"""The batch output schema: image facts, per-image outcomes and the records written for them.

Every record is a flat-ish JSON object with a ``record`` kind:

- ``thread``: one per thread windows.kcbwait reported, carrying the plugin's columns exactly as
  its JSON renderer writes them (``PID`` ... ``Notes``) plus the image and kernel facts; its
  callback frames (the plugin's child rows) are nested under ``frames`` in JSON Lines and
  become ``frame`` records in CSV, which cannot nest.
- ``image``: one per image, written after its thread records: ``status`` (``ok``, ``error``,
  ``timeout``, ``crashed``), the error message, counts, options, and a ``run`` object (seconds,
  worker) that is the only part of the output that depends on where and when it ran.

An image's records are written together, status last, so an image is complete in an output
file exactly when its status record is there (what ``--resume`` relies on).
"""

from __future__ import annotations

import datetime
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "kcbwait-batch/1"

THREAD = "thread"
FRAME = "frame"
IMAGE = "image"

OK = "ok"
ERROR = "error"
TIMEOUT = "timeout"
CRASHED = "crashed"
FAILED_STATUSES = (ERROR, TIMEOUT, CRASHED)

# windows.kcbwait's columns, in its order (docs/output-contract.md); a test holds this list to
# the plugin's own COLUMNS so the two cannot drift apart.
STACK_KEY = "__stack"
"""Where a thread row carries its windows.kcbstack rows (``kcbwait-batch --stacks``)."""
STACK_COLUMNS = ("Frame", "CallbackLevel", "Rip", "Symbol", "Rsp", "How", "Notes")

PLUGIN_COLUMNS = (
    "PID",
    "TID",
    "Process",
    "Wow64",
    "Level",
    "Reason",
    "State",
    "WaitReason",
    "NestingLevel",
    "Rip",
    "Symbol",
    "Rsp",
    "Frame",
    "ApiNumber",
    "Handler",
    "HandlerSymbol",
    "Callback",
    "Table",
    "Buffer",
    "Length",
    "KernelSide",
    "Notes",
)

# Facts every thread and image record carries, in this order.
IMAGE_FIELDS = ("image", "image_size", "image_mtime", "image_sha256")
KERNEL_FIELDS = (
    "kernel_build",
    "symbol_guid",
    "symbol_age",
    "plugin_version",
    "volatility_version",
)
STATUS_FIELDS = (
    "status",
    "error",
    "options",
    "threads",
    "callback_frames",
    "threads_at_return",
    "threads_in_callback",
)


@dataclass(frozen=True)
class ImageFile:
    """An image as found on disk: absolute path, size in bytes, modification time (UTC)."""

    path: str
    size: int
    mtime: str

    @classmethod
    def stat(cls, path: str | Path) -> ImageFile:
        """Facts of ``path`` (absolute, symlinks kept: the name the user gave is the key)."""
        absolute = os.path.abspath(path)
        info = os.stat(absolute)
        mtime = datetime.datetime.fromtimestamp(info.st_mtime_ns / 1e9, tz=datetime.timezone.utc)
        return cls(absolute, info.st_size, mtime.isoformat(timespec="microseconds"))

    @property
    def is_regular(self) -> bool:
        try:
            return stat.S_ISREG(os.stat(self.path).st_mode)
        except OSError:
            return False


@dataclass
class ImageOutcome:
    """What analysing one image produced, as it travels back from a worker (JSON-able).

    ``rows`` are the plugin's rows (JSON-renderer shape, children under ``__children``);
    they are kept only for ``ok`` outcomes: an image that failed part-way reports nothing
    but its error, as ``vol`` would.
    """

    status: str
    error: str | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    kernel_build: int | None = None
    symbol_guid: str | None = None
    symbol_age: int | None = None
    plugin_version: str | None = None
    volatility_version: str | None = None
    sha256: str | None = None
    seconds: float = 0.0
    worker: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageOutcome:
        return cls(**data)

    @classmethod
    def failure(cls, status: str, error: str, **facts: Any) -> ImageOutcome:
        return cls(status=status, error=error, **facts)


def _is_at_return(row: dict[str, Any]) -> bool:
    return "at-return" in (row.get("Reason") or "")


def _is_in_callback(row: dict[str, Any]) -> bool:
    return "in-callback" in (row.get("Reason") or "")


def common_fields(image: ImageFile, outcome: ImageOutcome) -> dict[str, Any]:
    """The image and kernel facts every record of this image carries."""
    return {
        "image": image.path,
        "image_size": image.size,
        "image_mtime": image.mtime,
        "image_sha256": outcome.sha256,
        "kernel_build": outcome.kernel_build,
        "symbol_guid": outcome.symbol_guid,
        "symbol_age": outcome.symbol_age,
        "plugin_version": outcome.plugin_version,
        "volatility_version": outcome.volatility_version,
    }


def thread_record(common: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """A ``thread`` record: the plugin's row, its child rows nested under ``frames``."""
    record: dict[str, Any] = {"record": THREAD, **common}
    record.update((column, row.get(column)) for column in PLUGIN_COLUMNS)
    record["frames"] = [
        {column: child.get(column) for column in PLUGIN_COLUMNS}
        for child in row.get("__children", [])
    ]
    if STACK_KEY in row:
        record["stack"] = [
            {column: frame.get(column) for column in STACK_COLUMNS} for frame in row[STACK_KEY]
        ]
    return record


def status_record(
    image: ImageFile, outcome: ImageOutcome, options: dict[str, Any]
) -> dict[str, Any]:
    """The ``image`` record closing this image's block."""
    rows = outcome.rows if outcome.status == OK else []
    return {
        "record": IMAGE,
        "format": FORMAT,
        **common_fields(image, outcome),
        "status": outcome.status,
        "error": outcome.error,
        "options": options,
        "threads": len(rows),
        "callback_frames": sum(len(r.get("__children", [])) for r in rows),
        "threads_at_return": sum(map(_is_at_return, rows)),
        "threads_in_callback": sum(map(_is_in_callback, rows)),
        "run": {"seconds": round(outcome.seconds, 3), "worker": outcome.worker},
    }


def image_records(
    image: ImageFile, outcome: ImageOutcome, options: dict[str, Any]
) -> list[dict[str, Any]]:
    """All records of one image: its threads in the plugin's order, then its status."""
    common = common_fields(image, outcome)
    rows = outcome.rows if outcome.status == OK else []
    return [*(thread_record(common, row) for row in rows), status_record(image, outcome, options)]


def as_plugin_rows(thread_records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Thread records back in the plugin's JSON-renderer shape (for comparisons and tools)."""
    rows = []
    for record in thread_records:
        row = {column: record[column] for column in PLUGIN_COLUMNS}
        row["__children"] = [{**frame, "__children": []} for frame in record["frames"]]
        rows.append(row)
    return rows


@dataclass
class Summary:
    """Batch totals, accumulated from status records as images finish."""

    images_ok: int = 0
    images_failed: int = 0
    images_skipped: int = 0
    images_unrun: int = 0
    threads: int = 0
    threads_at_return: int = 0
    threads_in_callback: int = 0
    wall_seconds: float = 0.0
    failures: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, status: dict[str, Any]) -> None:
        if status["status"] == OK:
            self.images_ok += 1
        else:
            self.images_failed += 1
            self.failures.append((status["image"], status["status"], status["error"] or ""))
        self.threads += status["threads"]
        self.threads_at_return += status["threads_at_return"]
        self.threads_in_callback += status["threads_in_callback"]

    @property
    def images_done(self) -> int:
        return self.images_ok + self.images_failed

    def images_per_minute(self) -> float:
        return self.images_done * 60.0 / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def lines(self) -> list[str]:
        """The human summary printed at the end of a batch."""
        lines = [
            f"images: {self.images_ok} ok, {self.images_failed} failed"
            + (
                f", {self.images_skipped} already complete (skipped)" if self.images_skipped else ""
            ),
            f"threads reported: {self.threads}; at ZwCallbackReturn: {self.threads_at_return}; "
            f"in callbacks: {self.threads_in_callback}",
            f"wall time: {self.wall_seconds:.1f}s ({self.images_per_minute():.1f} images/minute)",
        ]
        if self.images_unrun:
            lines.append(f"{self.images_unrun} images not run (no record; --resume runs them)")
        lines += [f"FAILED {status}: {path}: {error}" for path, status, error in self.failures]
        return lines
