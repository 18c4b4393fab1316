"""Function names from a module's PDB, through Volatility's own symbol machinery.

A module's CodeView record (debug directory entry of type IMAGE_DEBUG_TYPE_CODEVIEW, an
``RSDS`` record: GUID, age, PDB file name) identifies its PDB; Volatility's
``PDBUtility.load_windows_symbol_table`` then finds the matching symbol table the way it does
for the kernel: its identifier cache of every ISF under the symbol directories (``-s``), the
Microsoft symbol server when online.  The record is read here rather than through
``PDBUtility.symbol_table_from_offset`` / ``pe_symbols``: those rebuild the whole image from
memory (``get_guid_from_mz`` reads SizeOfImage bytes) or guess the PDB name from the DLL's file
name, while the record itself is two small reads and names the PDB exactly (full paths are
reduced to the file name, as the linker's ``/PDB`` path is not part of the key).
"""

from __future__ import annotations

import logging
import ntpath
import struct
import uuid
from dataclasses import dataclass

from volatility3.framework import exceptions, interfaces
from volatility3.framework.configuration import requirements
from volatility3.framework.symbols.windows import pdbutil
from volatility3.plugins.windows.kcbwait_analysis import memory, pe_exports, read_stats

vollog = logging.getLogger(__name__)

IMAGE_DEBUG_TYPE_CODEVIEW = 2
# IMAGE_DEBUG_DIRECTORY: Characteristics, TimeDateStamp, Major/MinorVersion, Type, SizeOfData,
# AddressOfRawData, PointerToRawData.
_DEBUG_DIRECTORY = struct.Struct("<IIHHIIII")
# A module has a handful of debug entries; more is corrupt.
MAX_DEBUG_ENTRIES = 16
# RSDS signature, GUID (16 bytes, Data1-3 little-endian), age, then the NUL-terminated name.
_RSDS_HEAD = struct.Struct("<4s16sI")
MAX_DEBUG_DIRECTORY = _DEBUG_DIRECTORY.size * MAX_DEBUG_ENTRIES
MAX_PDB_NAME = 0x200
# A DLL's PDB holds tens of thousands of public and private symbols; beyond this it is not one.
MAX_PDB_SYMBOLS = 0x100000
ISF_CLASS = "volatility3.framework.symbols.intermed.IntermediateSymbolTable"
# The config path under which each loaded table's settings live (one sub-path per PDB).
CONFIG_PATH = "kcbwait_pdb"


def _schema_errors() -> tuple[type, ...]:
    """Volatility validates an ISF with jsonschema when it is installed; a table that fails
    raises jsonschema's ValidationError, which is no VolatilityException."""
    try:
        from jsonschema.exceptions import ValidationError
    except ImportError:
        return ()
    return (ValidationError,)


# Why a PDB's table could not be had: OfflineException (none under -s and no symbol server),
# SymbolSpaceError, a failed download, an unreadable or invalid ISF.  The module is then named
# by its exports.
LOAD_ERRORS = (exceptions.VolatilityException, OSError, ValueError, *_schema_errors())


def version_requirement() -> requirements.VersionRequirement:
    """The plugin's requirement on the PDB utility this module calls."""
    return requirements.VersionRequirement(
        name="pdbutil", component=pdbutil.PDBUtility, version=(1, 0, 0)
    )


@dataclass(frozen=True)
class CodeView:
    """What identifies a module's PDB."""

    pdb_name: str
    guid: str
    age: int


def parse_rsds(data: bytes) -> CodeView | None:
    """Decodes an RSDS record (None if it is not one)."""
    if len(data) < _RSDS_HEAD.size + 1:
        return None
    signature, guid, age = _RSDS_HEAD.unpack_from(data)
    if signature != b"RSDS" or age == 0:
        return None
    name = data[_RSDS_HEAD.size :].split(b"\0", 1)[0].decode("latin-1")
    name = ntpath.basename(name)
    if not name:
        return None
    return CodeView(name, uuid.UUID(bytes_le=guid).hex.upper(), age)


def codeview_location(
    context: interfaces.context.ContextInterface,
    layer_name: str,
    base: int,
    headers: pe_exports.ImageHeaders,
    stats: read_stats.ReadStats | None = None,
) -> tuple[int, int] | None:
    """(RVA, length) of the image's CodeView record as its debug directory names it."""
    directory = headers.debug
    if not pe_exports.directory_in_image(headers, directory, MAX_DEBUG_DIRECTORY):
        return None
    raw = memory.read_bytes(context, layer_name, base + directory.rva, directory.size, stats)
    if raw is None:
        return None
    whole = len(raw) // _DEBUG_DIRECTORY.size * _DEBUG_DIRECTORY.size
    for entry in _DEBUG_DIRECTORY.iter_unpack(raw[:whole]):
        kind, size, rva = entry[4], entry[5], entry[6]
        if kind == IMAGE_DEBUG_TYPE_CODEVIEW and rva and rva < headers.size_of_image:
            return rva, min(size, _RSDS_HEAD.size + MAX_PDB_NAME)
    return None


def read_codeview(
    context: interfaces.context.ContextInterface,
    layer_name: str,
    base: int,
    headers: pe_exports.ImageHeaders,
    stats: read_stats.ReadStats | None = None,
) -> CodeView | None:
    """The CodeView record of the image mapped at ``base``, or None."""
    location = codeview_location(context, layer_name, base, headers, stats)
    if location is None:
        return None
    data = memory.read_bytes(context, layer_name, base + location[0], location[1], stats)
    return parse_rsds(data) if data is not None else None


class PdbNames:
    """Loads each PDB's symbols once per run (keyed by its CodeView identity, so every process's
    copy of a module shares them); a PDB that cannot be had is remembered as such, so that an
    offline run does not ask again for every module copy."""

    def __init__(self, context: interfaces.context.ContextInterface) -> None:
        self._context = context
        self._tables: dict[CodeView, list[tuple[str, int]] | None] = {}

    def names(self, codeview: CodeView) -> list[tuple[str, int]] | None:
        """(name, RVA) of every symbol of the PDB, or None when no table is available."""
        if codeview not in self._tables:
            self._tables[codeview] = self._load(codeview)
        return self._tables[codeview]

    def _load(self, codeview: CodeView) -> list[tuple[str, int]] | None:
        path = interfaces.configuration.path_join(
            CONFIG_PATH, f"{codeview.pdb_name}_{codeview.guid}_{codeview.age}".replace(".", "_")
        )
        try:
            table_name = pdbutil.PDBUtility.load_windows_symbol_table(
                self._context,
                codeview.guid,
                codeview.age,
                codeview.pdb_name,
                ISF_CLASS,
                config_path=path,
            )
        except LOAD_ERRORS as error:
            vollog.debug(f"no symbols for {codeview}: {error}")
            return None
        if not table_name:
            return None
        table = self._context.symbol_space[table_name]
        names = []
        for name in memory.bounded(table.symbols, MAX_PDB_SYMBOLS):
            try:
                names.append((name, int(table.get_symbol(name).address)))
            except (exceptions.SymbolError, TypeError):
                continue
        vollog.debug(f"{len(names)} symbols for {codeview.pdb_name} (table {table_name})")
        return names
