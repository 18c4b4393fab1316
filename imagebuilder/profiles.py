"""Kernel profiles the builder knows: the project's lab table and the six shared real tables."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# ../shared/symbols relative to the project root (see ../shared/symbols/README.md); an
# installed builder (site-packages has no ../shared) is told where they are by this variable.
SHARED_SYMBOLS_ENV = "KCBWAIT_SHARED_SYMBOLS"
SHARED_SYMBOLS = Path(
    os.environ.get(SHARED_SYMBOLS_ENV)
    or Path(__file__).resolve().parents[1].parent / "shared" / "symbols"
)

REAL_TABLES = {  # build -> (GUID, age), from ../shared/symbols/README.md
    14393: ("517E128F7B7C4EA79491DE6B9B9CE190", 1),
    17763: ("8B11040A5928757B11390AC78F6B6925", 1),
    18362: ("11BC9A513F1140CA359ECDF50F0122C1", 1),
    19041: ("BBED7C2955FBE4522AAA23F4B8677AD9", 1),
    20348: ("C2EADB24A615E9472CE47C8ADD31F130", 1),
    22000: ("32C1A669D5FFEFD41091F636CFDB6E99", 1),
}


class ProfileError(ValueError):
    """A profile name is unknown or its symbol table is not on this machine."""


@dataclass(frozen=True)
class Profile:
    name: str
    build: int
    isf_path: Path
    symbols_dir: Path  # the directory to hand Volatility with -s


def real_profile(build: int, shared: Path = SHARED_SYMBOLS) -> Profile:
    guid, age = REAL_TABLES[build]
    path = shared / "windows" / "ntkrnlmp.pdb" / f"{guid}-{age}.json.xz"
    if not path.exists():
        raise ProfileError(
            f"symbol table for build {build} not found at {path} (set {SHARED_SYMBOLS_ENV} to "
            "the directory holding windows/ntkrnlmp.pdb/, e.g. ../shared/symbols)"
        )
    return Profile(str(build), build, path, shared)


def lab_profile(symbols_dir: Path) -> Profile:
    from imagebuilder import lab_profile as lab

    path = lab.write_isf(symbols_dir)
    return Profile("lab", lab.LAB_BUILD, path, symbols_dir)


def resolve(name: str, work_dir: Path) -> Profile:
    """``lab`` (written under ``work_dir/symbols``) or a build number of a shared table."""
    if name == "lab":
        return lab_profile(work_dir / "symbols")
    try:
        build = int(name)
    except ValueError:
        build = -1
    if build not in REAL_TABLES:
        known = ", ".join(["lab", *map(str, REAL_TABLES)])
        raise ProfileError(f"unknown profile {name!r}; known: {known}")
    return real_profile(build)
