"""MemProcFS as a peer engine: where its native libraries are, and running it on an image.

MemProcFS (PyPI ``memprocfs`` with ``leechcorepyc``) is loaded in a child process
(tests/support/memprocfs_runner.py), so a crash in its native code cannot take pytest down.
``vmm.so`` and ``leechcore.so`` need ``libusb-1.0.so.0``: scripts/bootstrap.sh unpacks the
Debian package into ``.deps/libusb`` when the system has none; ``KCBWAIT_LIBUSB_DIR`` names
another directory holding it.
"""

from __future__ import annotations

import ctypes.util
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).resolve().with_name("memprocfs_runner.py")
LIBUSB = "libusb-1.0.so.0"
# Where scripts/bootstrap.sh unpacks the Debian package libusb-1.0-0 (dpkg -x).
LOCAL_LIBUSB = ROOT / ".deps" / "libusb" / "usr" / "lib" / "x86_64-linux-gnu"


class PeerUnavailable(RuntimeError):
    """MemProcFS cannot be loaded here; the message says what is missing and how to fix it."""


@dataclass(frozen=True)
class PeerEnvironment:
    python: str
    env: dict[str, str]
    package_dir: Path


def environment() -> PeerEnvironment:
    """The interpreter and environment that load MemProcFS, or PeerUnavailable."""
    spec = importlib.util.find_spec("memprocfs")
    leech = importlib.util.find_spec("leechcorepyc")
    if spec is None or leech is None or not spec.submodule_search_locations:
        raise PeerUnavailable(
            "the memprocfs and leechcorepyc packages are not installed in this interpreter "
            f"({sys.executable}); scripts/bootstrap.sh installs them with the test extras "
            "(pip install '.[test]')"
        )
    package = Path(next(iter(spec.submodule_search_locations)))
    leech_dir = Path(next(iter(leech.submodule_search_locations or [])))
    dirs = [str(leech_dir), str(package)]
    libusb_dir = _libusb_dir()
    if libusb_dir is None:
        raise PeerUnavailable(
            f"{LIBUSB} not found (system library path, KCBWAIT_LIBUSB_DIR or {LOCAL_LIBUSB}); "
            "scripts/bootstrap.sh unpacks the Debian package libusb-1.0-0 there"
        )
    if libusb_dir:
        dirs.append(libusb_dir)
    env = dict(os.environ)
    if env.get("LD_LIBRARY_PATH"):
        dirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(dirs)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*sys.path]))
    return PeerEnvironment(sys.executable, env, package)


def _libusb_dir() -> str | None:
    """A directory to add to LD_LIBRARY_PATH for libusb, "" if the system has it, else None."""
    named = os.environ.get("KCBWAIT_LIBUSB_DIR")
    for candidate in filter(None, [named, str(LOCAL_LIBUSB)]):
        if (Path(candidate) / LIBUSB).exists():
            return candidate
    if ctypes.util.find_library("usb-1.0"):
        return ""
    return None


def read_image(
    image: Path, callstacks: list[int] | tuple[int, ...] = (), timeout: float = 300
) -> dict[str, Any]:
    """MemProcFS's view of ``image`` (see memprocfs_runner.py); {"error": ...} if refused."""
    peer = environment()
    command = [peer.python, str(RUNNER), str(image)]
    if callstacks:
        command += ["--callstacks", ",".join(map(str, callstacks))]
    done = subprocess.run(
        command, env=peer.env, capture_output=True, text=True, timeout=timeout, check=False
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(
            f"MemProcFS runner exited {done.returncode} without a result:\n"
            f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        )
    result = json.loads(lines[-1])
    if done.returncode not in (0, 2) or (done.returncode == 0) == ("error" in result):
        raise RuntimeError(f"MemProcFS runner exited {done.returncode}: {result}")
    return result


def info_db_has(pdb_guid: str, age: int) -> bool:
    """Whether MemProcFS's bundled info.db holds structure offsets for this kernel PDB."""
    import sqlite3

    db = environment().package_dir / "info.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
        row = connection.execute(
            "SELECT 1 FROM pdb WHERE guidage = ?", (f"{pdb_guid.upper()}{age:X}",)
        ).fetchone()
    return row is not None
