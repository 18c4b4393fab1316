"""A small reader for Volatility's Intermediate Symbol Format, for laying structures out.

The builder reads every offset from the kernel's symbol table by type and field name, so
one scenario builds for every kernel the project has a table for.  This module is the
builder's own reader: the plugin reads the same tables through Volatility, so a mistake
here cannot hide a mistake there.
"""

from __future__ import annotations

import json
import lzma
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_INT_FORMATS = {
    (1, False): "B",
    (1, True): "b",
    (2, False): "H",
    (2, True): "h",
    (4, False): "I",
    (4, True): "i",
    (8, False): "Q",
    (8, True): "q",
}


class IsfError(ValueError):
    """The symbol table lacks a type, field or symbol the builder needs."""


@dataclass(frozen=True)
class Field:
    """A resolved (possibly nested) field: where it is and how to encode it."""

    offset: int
    type: dict[str, Any]
    size: int


class SymbolTable:
    """A kernel symbol table (ISF) with the look-ups a layout needs."""

    def __init__(self, data: dict[str, Any], path: Path | None = None) -> None:
        self.data = data
        self.path = path
        self._types: dict[str, Any] = data["user_types"]
        self._base: dict[str, Any] = data["base_types"]
        self._enums: dict[str, Any] = data.get("enums", {})
        self._symbols: dict[str, Any] = data.get("symbols", {})
        self._field_cache: dict[tuple[str, str], Field] = {}
        self._has_cache: dict[tuple[str, str], bool] = {}
        pdb = data["metadata"]["windows"]["pdb"]
        self.guid: str = pdb["GUID"].upper()
        self.age: int = int(pdb["age"])
        self.pdb_name: str = pdb.get("database", "ntkrnlmp.pdb")

    @classmethod
    def load(cls, path: str | Path) -> SymbolTable:
        path = Path(path)
        opener = lzma.open if path.suffix == ".xz" else open
        with opener(path, "rt", encoding="utf-8") as handle:
            return cls(json.load(handle), path)

    # -- types -------------------------------------------------------------------------
    def has_type(self, name: str) -> bool:
        return name in self._types

    def has_field(self, type_name: str, path: str) -> bool:
        key = (type_name, path)
        known = self._has_cache.get(key)
        if known is None:
            try:
                self.field(type_name, path)
                known = True
            except IsfError:
                known = False
            self._has_cache[key] = known
        return known

    def size(self, type_name: str) -> int:
        if type_name in self._types:
            return int(self._types[type_name]["size"])
        if type_name in self._base:
            return int(self._base[type_name]["size"])
        raise IsfError(f"symbol table {self._label()} has no type {type_name}")

    def field(self, type_name: str, path: str) -> Field:
        """Resolve a dotted field path such as ``Tcb.Teb`` or ``NtTib.StackBase``."""
        key = (type_name, path)
        cached = self._field_cache.get(key)
        if cached is not None:
            return cached
        offset = 0
        current: dict[str, Any] = {"kind": "struct", "name": type_name}
        for part in path.split("."):
            if current["kind"] not in ("struct", "union"):
                raise IsfError(f"{type_name}.{path}: {part} is not inside a structure")
            struct_def = self._types.get(current["name"])
            if struct_def is None:
                raise IsfError(f"symbol table {self._label()} has no type {current['name']}")
            member = struct_def["fields"].get(part)
            if member is None:
                raise IsfError(
                    f"symbol table {self._label()}: {current['name']} has no field {part}"
                )
            offset += int(member["offset"])
            current = member["type"]
        result = Field(offset, current, self._type_size(current))
        self._field_cache[key] = result
        return result

    def offset(self, type_name: str, path: str) -> int:
        return self.field(type_name, path).offset

    def _type_size(self, type_def: dict[str, Any]) -> int:
        kind = type_def["kind"]
        if kind in ("struct", "union", "class"):
            return self.size(type_def["name"])
        if kind == "base":
            return self.size(type_def["name"])
        if kind == "pointer":
            return 8
        if kind == "enum":
            return self.size(self._enums[type_def["name"]]["base"])
        if kind == "array":
            return int(type_def["count"]) * self._type_size(type_def["subtype"])
        if kind == "bitfield":
            return self._type_size(type_def["type"])
        if kind == "function":
            return 0
        raise IsfError(f"unknown ISF type kind {kind}")

    # -- encoding ----------------------------------------------------------------------
    def encode(
        self, type_name: str, path: str, value: Any, current: bytes | None = None
    ) -> tuple[int, bytes]:
        """Bytes to write for ``value`` at field ``path``; bitfields merge into ``current``."""
        fld = self.field(type_name, path)
        return fld.offset, self.encode_type(fld.type, fld.size, value, current)

    def encode_type(
        self, type_def: dict[str, Any], size: int, value: Any, current: bytes | None = None
    ) -> bytes:
        kind = type_def["kind"]
        if kind == "pointer":
            return struct.pack("<Q", value & 0xFFFFFFFFFFFFFFFF)
        if kind in ("base", "enum"):
            if isinstance(value, bool):
                value = int(value)
            signed = False
            if kind == "base":
                signed = bool(self._base[type_def["name"]].get("signed", False))
            return _pack_int(value, size, signed)
        if kind == "bitfield":
            base = int.from_bytes(current or bytes(size), "little")
            width, pos = int(type_def["bit_length"]), int(type_def["bit_position"])
            mask = ((1 << width) - 1) << pos
            base = (base & ~mask) | ((value << pos) & mask)
            return base.to_bytes(size, "little")
        if kind == "array" or kind in ("struct", "union"):
            data = bytes(value)
            if len(data) > size:
                raise IsfError(f"{len(data)} bytes do not fit a field of {size}")
            return data + bytes(size - len(data))
        raise IsfError(f"cannot encode a field of kind {kind}")

    # -- symbols and enums -------------------------------------------------------------
    def has_symbol(self, name: str) -> bool:
        return name in self._symbols

    def symbol_rva(self, name: str) -> int:
        sym = self._symbols.get(name)
        if sym is None:
            raise IsfError(f"symbol table {self._label()} has no symbol {name}")
        return int(sym["address"])

    def enum_value(self, enum_name: str, constant: str) -> int:
        enum = self._enums.get(enum_name)
        if enum is None:
            raise IsfError(f"symbol table {self._label()} has no enum {enum_name}")
        if constant not in enum["constants"]:
            raise IsfError(f"enum {enum_name} has no constant {constant}")
        return int(enum["constants"][constant])

    def enum_names(self, enum_name: str) -> list[str]:
        return list(self._enums[enum_name]["constants"])

    def _label(self) -> str:
        return f"{self.guid}-{self.age}"


def _pack_int(value: int, size: int, signed: bool) -> bytes:
    fmt = _INT_FORMATS.get((size, signed))
    if fmt is None:
        return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
    if not signed:
        value &= (1 << (8 * size)) - 1
    return struct.pack("<" + fmt, value)
