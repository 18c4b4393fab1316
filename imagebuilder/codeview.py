"""CodeView (RSDS) records: what identifies a module's PDB.

A linker writes one IMAGE_DEBUG_DIRECTORY entry of type IMAGE_DEBUG_TYPE_CODEVIEW whose data
is an ``RSDS`` record: the signature, the PDB's GUID (16 bytes, Data1-3 little-endian), its age
and the PDB path as given to ``/PDB`` (NUL-terminated).  A symbol server and Volatility key a
PDB by the path's last element, the GUID and the age (``<pdb name>/<GUID><age>``).

The builder's GUIDs are derived from the image's own bytes: the same layout always gets the
same GUID and two different layouts never share one, so an ISF written for one image can never
be taken for another by Volatility's identifier cache (which indexes every ISF it was ever
shown, across images).
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from dataclasses import dataclass
from pathlib import PureWindowsPath

IMAGE_DEBUG_TYPE_CODEVIEW = 2
DEBUG_DIRECTORY_SIZE = 28  # IMAGE_DEBUG_DIRECTORY
RSDS_GUID_OFFSET = 4  # after the signature
# Modules Microsoft builds: their RSDS records hold the bare PDB file name.
MICROSOFT_MODULES = ("ntdll.dll", "user32.dll", "win32u.dll", "kernel32.dll")


@dataclass(frozen=True)
class CodeView:
    guid: str  # 32 upper-case hex digits, as the symbol server and Volatility spell it
    age: int
    pdb_path: str  # as stored in the record: a file name or a full build path

    @property
    def pdb_name(self) -> str:
        """The last element of the stored path: the PDB's key on a symbol server."""
        return PureWindowsPath(self.pdb_path).name

    def record(self) -> bytes:
        return rsds_record(self.guid, self.age, self.pdb_path)


def rsds_record(guid: str, age: int, pdb_path: str) -> bytes:
    return (
        b"RSDS"
        + uuid.UUID(hex=guid).bytes_le
        + struct.pack("<I", age)
        + pdb_path.encode("latin-1")
        + b"\0"
    )


def debug_directory_entry(record_rva: int, record_size: int) -> bytes:
    """IMAGE_DEBUG_DIRECTORY: Characteristics, TimeDateStamp, Major/MinorVersion, Type,
    SizeOfData, AddressOfRawData, PointerToRawData (raw offsets equal RVAs in these images)."""
    return struct.pack(
        "<IIHHIIII",
        0,
        0x5F000000,
        0,
        0,
        IMAGE_DEBUG_TYPE_CODEVIEW,
        record_size,
        record_rva,
        record_rva,
    )


def pdb_path_for(module_name: str, stem: str, dll: bool) -> str:
    """The path a module's RSDS record names: Microsoft's modules and EXEs the bare
    ``<stem>.pdb``; a third-party DLL the full path of its build tree, as most vendors' are
    (a reader must reduce it to its last element)."""
    if not dll or module_name.lower() in MICROSOFT_MODULES:
        return f"{stem}.pdb"
    return rf"C:\build\{stem}\x64\{stem}.pdb"


def stamp_guid(image: bytes, record_rva: int) -> tuple[bytes, str]:
    """The image with its RSDS GUID set from a digest of the image (GUID field zeroed), and
    that GUID."""
    start = record_rva + RSDS_GUID_OFFSET
    blank = image[:start] + bytes(16) + image[start + 16 :]
    digest = bytearray(hashlib.sha256(blank).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x40  # an RFC 4122 version-4 GUID, as linkers make
    digest[8] = (digest[8] & 0x3F) | 0x80
    guid = uuid.UUID(bytes=bytes(digest))
    stamped = blank[:start] + guid.bytes_le + blank[start + 16 :]
    return stamped, guid.hex.upper()
