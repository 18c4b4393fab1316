"""The lab profile: a small Windows x64 kernel symbol table written by this project.

The table is declared here as C does it (for every structure, its fields in order, each with
a C type) and laid out by this module's own rules: natural alignment of the declared fields
in the declared order, plus explicit padding where this file says so.  Names and C types are
Windows facts (they can be checked against a real table, see ``tests/test_lab_profile.py``);
the offsets and sizes are ours and deliberately differ from any real kernel wherever a
structure declares only a subset of the real fields.  The only offsets and sizes pinned to
Windows are those that outside code hard-codes (see ``FIXED_OFFSETS`` and ``FIXED_SIZES``).

The profile behaves like build 19041: it defines ``KeUserCallbackDispatcher`` (not
``PsNtdllExports``) and a 0x30-byte ``_KSTACK_CONTROL``.

Type strings used in the declarations:

- a base type name (``"unsigned long"``, ``"wchar"``, ...; see ``BASE_TYPES``);
- ``"pointer:T"`` a 64-bit pointer to T (``"pointer:void"``, ``"pointer:pointer:_VACB"``);
- ``"array:N:T"`` N elements of T;
- ``"enum:NAME"`` an enumeration from ``ENUMS``;
- ``"bits:W:BASE"`` a W-bit bitfield in a unit of type BASE (Microsoft packing: consecutive
  bitfields share a unit while the unit type's size is the same and the bits fit);
- the name of another declared structure or union (embedded by value).

Entries of a structure are ``(name, type)`` pairs, ``Overlay(...)`` (an anonymous union inside
the structure: each alternative is one field, or a list of fields laid out as an anonymous
structure, all starting at the same offset), ``Pad(n)`` (n explicit padding bytes) or
``PadTo(offset)`` (explicit padding up to an offset).  A union's entries are its alternatives.
Anonymous union types that Windows gives a field of their own (``_MMVAD_SHORT.u``) are named
``__anonymous_<parent>_<field>`` here, as the real tables name theirs ``__anonymous_<n>``.
"""

from __future__ import annotations

import json
import lzma
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagebuilder.lab_types import (
    BASE_TYPES,
    ENUMS,
    FIXED_OFFSETS,
    FIXED_SIZES,
    POINTER_SIZE,
    SYMBOLS,
    TYPES,
    Overlay,
    Pad,
    PadTo,
    TypeDecl,
)
from imagebuilder.pdb_isf import isf_metadata

LAB_GUID = "4B43425741495400000000000000AB01"
LAB_AGE = 1
LAB_BUILD = 19041
PDB_NAME = "ntkrnlmp.pdb"
PRODUCER = {"name": "kcbwait-imagebuilder-lab-profile", "version": "1"}



# -- layout -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class FieldLayout:
    name: str
    offset: int
    size: int  # bytes of the storage unit for bitfields
    isf_type: dict[str, Any]
    bit_position: int | None = None
    bit_length: int | None = None
    # (overlay number, alternative index) from the outermost overlay inwards: two fields may
    # share bytes only if their paths part at some overlay with different alternatives.
    path: tuple[tuple[int, int], ...] = ()


@dataclass
class TypeLayout:
    name: str
    kind: str
    size: int
    align: int
    fields: dict[str, FieldLayout] = field(default_factory=dict)


@dataclass(frozen=True)
class _Resolved:
    isf: dict[str, Any]
    size: int
    align: int


class LayoutError(ValueError):
    pass


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


class _Layouter:
    def __init__(self, types: dict[str, TypeDecl], enums: dict[str, dict[str, Any]]) -> None:
        self.types = types
        self.enums = enums
        self.done: dict[str, TypeLayout] = {}
        self.active: set[str] = set()
        self._overlay_counter = 0

    # type strings
    def resolve(self, tstr: str) -> _Resolved:
        if tstr.startswith("pointer:"):
            target = tstr[len("pointer:"):]
            return _Resolved({"kind": "pointer", "subtype": self.reference(target)},
                             POINTER_SIZE, POINTER_SIZE)
        if tstr.startswith("array:"):
            _, count_text, element = tstr.split(":", 2)
            count = int(count_text, 0)
            if count <= 0:
                raise LayoutError(f"array of {count} elements: {tstr}")
            sub = self.resolve(element)
            return _Resolved({"kind": "array", "count": count, "subtype": sub.isf},
                             sub.size * count, sub.align)
        if tstr.startswith("enum:"):
            name = tstr[len("enum:"):]
            if name not in self.enums:
                raise LayoutError(f"unknown enum {name}")
            size = self.enums[name]["size"]
            return _Resolved({"kind": "enum", "name": name}, size, size)
        if tstr.startswith("bits:"):
            raise LayoutError(f"a bitfield is only valid as a field type: {tstr}")
        if tstr in BASE_TYPES:
            if tstr == "void":
                raise LayoutError("void is only valid as a pointer target")
            size = BASE_TYPES[tstr]["size"]
            return _Resolved({"kind": "base", "name": tstr}, size, size)
        if tstr in self.types:
            sub_layout = self.layout(tstr)
            return _Resolved({"kind": sub_layout.kind, "name": tstr},
                             sub_layout.size, sub_layout.align)
        raise LayoutError(f"unknown type {tstr!r}")

    def reference(self, tstr: str) -> dict[str, Any]:
        """The ISF type of a pointer target, without laying it out (types may point to
        themselves)."""
        if tstr in BASE_TYPES:
            return {"kind": "base", "name": tstr}
        if tstr in self.types:
            return {"kind": self.types[tstr].kind, "name": tstr}
        return self.resolve(tstr).isf

    # structures
    def layout(self, name: str) -> TypeLayout:
        if name in self.done:
            return self.done[name]
        if name in self.active:
            raise LayoutError(f"{name} contains itself")
        self.active.add(name)
        decl = self.types[name]
        fields: dict[str, FieldLayout] = {}
        if decl.kind == "struct":
            end, align = self._sequence(name, decl.entries, 0, (), fields)
        elif decl.kind == "union":
            end, align = self._overlay(name, decl.entries, 0, (), fields)
        else:
            raise LayoutError(f"{name}: unknown kind {decl.kind}")
        align = max(align, decl.align)
        result = TypeLayout(name, decl.kind, _align_up(end, align), align, fields)
        self.active.discard(name)
        self.done[name] = result
        return result

    def _sequence(self, owner: str, entries: tuple[Any, ...] | list[Any], start: int,
                  path: tuple[tuple[int, int], ...],
                  fields: dict[str, FieldLayout]) -> tuple[int, int]:
        """Lays entries out one after another from ``start``; returns (end, alignment)."""
        offset = start
        align = 1
        unit: tuple[int, int, int] | None = None  # (offset, size, bits used)
        for entry in entries:
            if isinstance(entry, tuple) and entry[1].startswith("bits:"):
                name, tstr = entry
                _, width_text, base = tstr.split(":", 2)
                width = int(width_text, 0)
                if base not in BASE_TYPES or BASE_TYPES[base]["kind"] not in ("int", "char"):
                    raise LayoutError(f"{owner}.{name}: bitfield base {base!r}")
                size = BASE_TYPES[base]["size"]
                if not 0 < width <= size * 8:
                    raise LayoutError(f"{owner}.{name}: {width} bits in a {size}-byte unit")
                if unit is not None and unit[1] == size and unit[2] + width <= size * 8:
                    unit_offset, _, used = unit
                else:
                    unit_offset = _align_up(offset, size)
                    offset = unit_offset + size
                    used = 0
                self._add(owner, fields, FieldLayout(
                    name, unit_offset, size, {"kind": "bitfield", "bit_position": used,
                                              "bit_length": width,
                                              "type": {"kind": "base", "name": base}},
                    used, width, path))
                unit = (unit_offset, size, used + width)
                align = max(align, size)
                continue
            unit = None
            if isinstance(entry, Pad):
                if entry.size < 0:
                    raise LayoutError(f"{owner}: negative padding")
                offset += entry.size
            elif isinstance(entry, PadTo):
                target = start + entry.offset
                if target < offset:
                    raise LayoutError(
                        f"{owner}: PadTo({entry.offset:#x}) but already at {offset - start:#x}")
                offset = target
            elif isinstance(entry, Overlay):
                overlay_align = self._overlay_alignment(owner, entry.alternatives)
                offset = _align_up(offset, overlay_align)
                offset, sub_align = self._overlay(owner, entry.alternatives, offset, path,
                                                  fields)
                align = max(align, sub_align)
            elif isinstance(entry, tuple) and len(entry) == 2:
                name, tstr = entry
                resolved = self.resolve(tstr)
                offset = _align_up(offset, resolved.align)
                self._add(owner, fields, FieldLayout(name, offset, resolved.size, resolved.isf,
                                                     path=path))
                offset += resolved.size
                align = max(align, resolved.align)
            else:
                raise LayoutError(f"{owner}: cannot lay out {entry!r}")
        return offset, align

    def _overlay_alignment(self, owner: str, alternatives: tuple[Any, ...]) -> int:
        scratch: dict[str, FieldLayout] = {}
        _, align = self._overlay(owner, alternatives, 0, (), scratch)
        return align

    def _overlay(self, owner: str, alternatives: tuple[Any, ...] | list[Any], start: int,
                 path: tuple[tuple[int, int], ...],
                 fields: dict[str, FieldLayout]) -> tuple[int, int]:
        """Alternatives sharing ``start`` (an anonymous union); returns (end, alignment)."""
        self._overlay_counter += 1
        number = self._overlay_counter
        size = 0
        align = 1
        for index, alternative in enumerate(alternatives):
            entries = alternative if isinstance(alternative, list) else [alternative]
            end, sub_align = self._sequence(owner, entries, start, path + ((number, index),),
                                            fields)
            # an anonymous structure alternative is padded to its own alignment, as in C
            size = max(size, _align_up(end - start, sub_align))
            align = max(align, sub_align)
        return start + _align_up(size, align), align

    @staticmethod
    def _add(owner: str, fields: dict[str, FieldLayout], item: FieldLayout) -> None:
        if item.name in fields:
            raise LayoutError(f"{owner}.{item.name} declared twice")
        fields[item.name] = item


def layout() -> dict[str, TypeLayout]:
    """Lays out every declared type and checks the pinned offsets and sizes."""
    layouter = _Layouter(TYPES, ENUMS)
    result = {name: layouter.layout(name) for name in TYPES}
    for (type_name, field_name), expected in FIXED_OFFSETS.items():
        actual = result[type_name].fields[field_name].offset
        if actual != expected:
            raise LayoutError(f"{type_name}.{field_name} at {actual:#x}, must be {expected:#x}")
    for type_name, expected in FIXED_SIZES.items():
        if result[type_name].size != expected:
            raise LayoutError(
                f"sizeof({type_name}) is {result[type_name].size:#x}, must be {expected:#x}")
    return result


def field_offset(type_name: str, dotted: str) -> int:
    """Offset of a (possibly nested, dotted) field, e.g. ``("_KSTACK_CONTROL",
    "Previous.KernelStack")``."""
    layouts = layout()
    offset = 0
    current = type_name
    for part in dotted.split("."):
        item = layouts[current].fields[part]
        offset += item.offset
        current = item.isf_type.get("name", "")
    return offset


# -- the table --------------------------------------------------------------------------------
def build_isf() -> dict[str, Any]:
    """The lab profile as a Volatility ISF dictionary."""
    layouts = layout()
    user_types: dict[str, Any] = {}
    for name in sorted(layouts):
        type_layout = layouts[name]
        user_types[name] = {
            "kind": type_layout.kind,
            "size": type_layout.size,
            "fields": {
                item.name: {"offset": item.offset, "type": item.isf_type}
                for item in sorted(type_layout.fields.values(),
                                   key=lambda f: (f.offset, f.bit_position or 0, f.name))
            },
        }
    base_types = {name: {"endian": "little", **info} for name, info in BASE_TYPES.items()}
    enums = {name: {"base": e["base"], "size": e["size"], "constants": dict(e["constants"])}
             for name, e in ENUMS.items()}
    symbols = {name: {"address": sym.rva} for name, sym in SYMBOLS.items()}
    return {
        "metadata": isf_metadata(LAB_GUID, LAB_AGE, PDB_NAME, PRODUCER),
        "base_types": base_types,
        "user_types": user_types,
        "enums": enums,
        "symbols": symbols,
    }


def isf_bytes() -> bytes:
    """The xz-compressed table, byte-for-byte the same on every run."""
    text = json.dumps(build_isf(), sort_keys=True, indent=1) + "\n"
    return lzma.compress(text.encode("utf-8"), format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                         preset=6)


def isf_relative_path() -> Path:
    return Path("windows") / PDB_NAME / f"{LAB_GUID}-{LAB_AGE}.json.xz"


def write_isf(symbols_dir: str | Path) -> Path:
    """Writes ``<symbols_dir>/windows/ntkrnlmp.pdb/<GUID>-<age>.json.xz`` and returns its path."""
    path = Path(symbols_dir) / isf_relative_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = isf_bytes()
    if not path.exists() or path.read_bytes() != data:
        path.write_bytes(data)
    return path


def codeview_guid_bytes() -> bytes:
    """The 16 GUID bytes of the kernel's RSDS record (Data1-3 little endian, then Data4),
    which Volatility prints back as ``LAB_GUID``."""
    return uuid.UUID(hex=LAB_GUID).bytes_le
