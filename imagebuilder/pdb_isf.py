"""Volatility symbol tables (ISF) for the builder's own modules, as if made from their PDBs.

Volatility names a user module's code with the module's PDB when its symbol machinery has a
table for the module's CodeView record: offline, an ISF under a ``-s`` directory at
``windows/<pdb name>/<GUID>-<age>.json.xz``, found through the identifier cache it builds from
each ISF's ``metadata.windows.pdb`` (database, GUID, age).  These tables hold symbols only
(what ``pdbconv`` makes of a PDB's public symbols: name -> RVA); no types are needed to name
addresses.
"""

from __future__ import annotations

import json
import lzma
from pathlib import Path
from typing import Any

from imagebuilder.module_image import ModuleImage

ISF_FORMAT = "6.1.0"
IMAGE_FILE_MACHINE_AMD64 = 0x8664  # 34404
PRODUCER = {"name": "kcbwait-builder", "version": "0.1"}


def isf_metadata(guid: str, age: int, database: str, producer: dict[str, str]) -> dict[str, Any]:
    """The metadata of a Windows ISF: Volatility finds a table by ``windows.pdb``'s GUID, age
    and database (the PDB file name, case kept)."""
    return {
        "format": ISF_FORMAT,
        "producer": dict(producer),
        "windows": {
            "pdb": {
                "GUID": guid,
                "age": age,
                "database": database,
                "machine_type": IMAGE_FILE_MACHINE_AMD64,
            }
        },
    }


def module_isf(module: ModuleImage) -> dict[str, Any]:
    """The symbols-only ISF of ``module``'s PDB."""
    assert module.codeview is not None, module.name
    return {
        # The key a reader looks the table up by: the RSDS path's last element.
        "metadata": isf_metadata(
            module.codeview.guid, module.codeview.age, module.codeview.pdb_name, PRODUCER
        ),
        "base_types": {},
        "user_types": {},
        "enums": {},
        "symbols": {
            name: {"address": rva} for name, rva in sorted(module.pdb_symbols.items())
        },
    }


def isf_path(root: Path, module: ModuleImage) -> Path:
    assert module.codeview is not None, module.name
    cv = module.codeview
    return root / "windows" / cv.pdb_name / f"{cv.guid}-{cv.age}.json.xz"


def write_module_isfs(root: Path, modules: list[ModuleImage]) -> list[Path]:
    """Writes each module's ISF under ``root`` (a directory for ``vol -s``); returns the
    files.  ``root`` is created even when there is nothing to write, so a caller can always
    pass it."""
    root.mkdir(parents=True, exist_ok=True)
    written = []
    for module in modules:
        path = isf_path(root, module)
        path.parent.mkdir(parents=True, exist_ok=True)
        with lzma.open(path, "wt", encoding="utf-8") as out:
            json.dump(module_isf(module), out, sort_keys=True)
        written.append(path)
    return written
