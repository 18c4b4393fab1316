"""Which files a batch analyses: named files as given, directories by name pattern.

A directory of images usually holds other files too (notes, hashes, the builder's truth
files, symbol directories), so in a directory only names matching memory-image patterns are
taken; a file named on the command line is always taken, whatever its name.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

# Extensions of raw, crash-dump, VM-snapshot and acquisition-tool images Volatility reads.
DEFAULT_PATTERNS = (
    "*.raw",
    "*.mem",
    "*.dmp",
    "*.vmem",
    "*.vmss",
    "*.vmsn",
    "*.lime",
    "*.img",
    "*.bin",
    "*.core",
    "*.elf",
    "*.dump",
)


class DiscoveryError(Exception):
    """An input does not exist or cannot be listed."""


def _matches(name: str, patterns: Sequence[str]) -> bool:
    lower = name.lower()
    return any(fnmatch.fnmatchcase(lower, p.lower()) for p in patterns)


def _scan(directory: Path, patterns: Sequence[str], recursive: bool) -> list[str]:
    found = []
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as error:
        raise DiscoveryError(f"cannot list {directory}: {error.strerror}") from None
    for entry in entries:
        if entry.is_dir():
            if recursive:
                found += _scan(Path(entry.path), patterns, recursive)
        elif _matches(entry.name, patterns):
            found.append(os.path.abspath(entry.path))
    return found


def read_list(path: str) -> list[str]:
    """Paths from a list file (one per line, ``#`` comments), ``-`` for standard input."""
    import sys

    text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def find_images(
    inputs: Iterable[str], patterns: Sequence[str] = DEFAULT_PATTERNS, recursive: bool = False
) -> list[str]:
    """Absolute image paths in input order (directories sorted by name), each once."""
    images: list[str] = []
    seen: set[str] = set()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            candidates = _scan(path, patterns, recursive)
        elif path.exists():
            candidates = [os.path.abspath(path)]
        else:
            raise DiscoveryError(f"no such file or directory: {item}")
        for candidate in candidates:
            if candidate not in seen:
                seen.add(candidate)
                images.append(candidate)
    return images
