"""Batch output files (JSON Lines or CSV) and what ``--resume`` reads back from them.

Each image's records reach the file in one write followed by ``fsync``, status record last,
so after any interruption (kill, power loss, full disk) the file holds whole images plus at
most one partial block at the end.  :func:`load_existing` finds the complete images; resuming
rewrites the file with exactly those blocks (dropping partial ones) and appends the rest.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kcbwait_batch import records

JSONL = "jsonl"
CSV = "csv"
FORMATS = (JSONL, CSV)

# CSV has one header for every kind of row; a column a kind does not use is empty.
CSV_COLUMNS = (
    "record",
    *records.IMAGE_FIELDS,
    *records.KERNEL_FIELDS,
    *records.PLUGIN_COLUMNS,
    *records.STATUS_FIELDS,
    "run_seconds",
    "run_worker",
)
_CSV_INT_FIELDS = (
    "image_size",
    "threads",
    "callback_frames",
    "threads_at_return",
    "threads_in_callback",
)


class OutputError(Exception):
    """The existing output cannot be resumed (other format, options or schema)."""


def infer_format(path: Path) -> str:
    return CSV if path.suffix.lower() == ".csv" else JSONL


def csv_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """A record as CSV rows: a thread becomes its row plus one ``frame`` row per frame."""
    if record["record"] == records.IMAGE:
        row = {k: v for k, v in record.items() if k in CSV_COLUMNS}
        row["options"] = json.dumps(record["options"], sort_keys=True)
        row["run_seconds"] = record["run"]["seconds"]
        row["run_worker"] = record["run"]["worker"]
        return [row]
    thread = {k: v for k, v in record.items() if k != "frames"}
    frames = [
        {
            **{k: thread[k] for k in (*records.IMAGE_FIELDS, *records.KERNEL_FIELDS)},
            "record": records.FRAME,
            **frame,
        }
        for frame in record["frames"]
    ]
    return [thread, *frames]


def _csv_text(rows: Iterable[dict[str, Any]], header: bool) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_COLUMNS, lineterminator="\n")
    if header:
        writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buffer.getvalue()


class OutputWriter:
    """Appends whole images to ``path`` in ``fmt``; creates the file (and header) if needed."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.path = path
        self.fmt = fmt
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists() or path.stat().st_size == 0
        self._file = open(path, "a", encoding="utf-8", newline="")  # noqa: SIM115 - closed in close()
        if new and fmt == CSV:
            self._write(_csv_text((), header=True))

    def write_image(self, image_records: list[dict[str, Any]]) -> None:
        if self.fmt == CSV:
            text = _csv_text((row for r in image_records for row in csv_rows(r)), header=False)
        else:
            text = "".join(json.dumps(r) + "\n" for r in image_records)
        self._write(text)

    def _write(self, text: str) -> None:
        self._file.write(text)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class ExistingOutput:
    """What an earlier run left in the output file.

    ``status``: image path -> its status record (with ``run``/``options`` decoded), for the
    images whose block is complete; ``blocks``: image path -> the file's own lines of that
    image's records (text as written, re-used verbatim when the file is rewritten).
    """

    fmt: str
    status: dict[str, dict[str, Any]] = field(default_factory=dict)
    blocks: dict[str, list[str]] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    dropped_lines: int = 0

    def rewrite(self, path: Path, keep: set[str]) -> None:
        """Replaces ``path`` by the blocks of the images in ``keep``, in their old order."""
        tmp = path.with_name(path.name + ".resume-tmp")
        with open(tmp, "w", encoding="utf-8", newline="") as out:
            if self.fmt == CSV:
                out.write(_csv_text((), header=True))
            for image in self.order:
                if image in keep:
                    out.writelines(self.blocks[image])
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)


def load_existing(path: Path, fmt: str) -> ExistingOutput:
    """Reads an earlier run's output; tolerates a torn last line and partial blocks."""
    existing = ExistingOutput(fmt)
    if not path.exists():
        return existing
    text = path.read_text(encoding="utf-8", errors="replace")
    entries = _read_csv(text) if fmt == CSV else _read_jsonl(text)
    lines_by_image: dict[str, list[str]] = {}
    threads_by_image: dict[str, int] = {}
    for record, line in entries:
        if record is None:
            existing.dropped_lines += 1
            continue
        image = record.get("image")
        if not image:
            existing.dropped_lines += 1
            continue
        lines_by_image.setdefault(image, []).append(line)
        kind = record.get("record")
        if kind == records.THREAD:
            threads_by_image[image] = threads_by_image.get(image, 0) + 1
        elif kind == records.IMAGE:
            if record.get("format") not in (None, records.FORMAT) and fmt == JSONL:
                raise OutputError(
                    f"{path} was written in format {record.get('format')}, not {records.FORMAT}"
                )
            # Complete only if every thread record the status counts precedes it.
            if threads_by_image.get(image, 0) == record.get("threads"):
                if image not in existing.status:
                    existing.order.append(image)
                existing.status[image] = record
                existing.blocks[image] = lines_by_image[image]
            lines_by_image[image] = []
            threads_by_image[image] = 0
    return existing


def _read_jsonl(text: str) -> list[tuple[dict[str, Any] | None, str]]:
    entries = []
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            entries.append((None, line))  # torn by an interruption
            continue
        try:
            entries.append((json.loads(line), line))
        except json.JSONDecodeError:
            entries.append((None, line))
    return entries


def _read_csv(text: str) -> list[tuple[dict[str, Any] | None, str]]:
    lines = text.splitlines(keepends=True)
    if not lines:
        return []
    header = next(csv.reader([lines[0]]))
    if tuple(header) != CSV_COLUMNS:
        raise OutputError("the existing CSV output has other columns (another version?)")
    entries: list[tuple[dict[str, Any] | None, str]] = []
    # Fields may hold newlines (quoted); csv.reader over the remaining text keeps them whole,
    # and the raw text of each row is rebuilt by re-serialising it.
    for values in csv.reader(io.StringIO("".join(lines[1:]))):
        raw = io.StringIO()
        csv.writer(raw, lineterminator="\n").writerow(values)
        if len(values) != len(CSV_COLUMNS):
            entries.append((None, raw.getvalue()))
            continue
        row: dict[str, Any] = dict(zip(CSV_COLUMNS, values, strict=True))
        if row["record"] == records.IMAGE:
            try:
                for name in _CSV_INT_FIELDS:
                    row[name] = int(row[name])
                row["options"] = json.loads(row["options"])
            except ValueError:
                entries.append((None, raw.getvalue()))
                continue
        entries.append((row, raw.getvalue()))
    if not text.endswith("\n") and entries:
        entries[-1] = (None, entries[-1][1])  # torn last row
    return entries
