"""The scenario fields that place a process's callback table, rewrite its entries and set its
instrumentation callback (docs/output-contract.md, "Table" and "windows.kcbtable").

Process fields:
- ``callback_overrides``: ApiNumber -> target; the entry of the table PEB.KernelCallbackTable
  points at is rewritten to point there;
- ``callback_table``: where PEB.KernelCallbackTable points: ``owner`` (the owner image's own
  read-only table, default), a copy in ``private`` (read/write) or ``private_rwx``
  (PAGE_EXECUTE_READWRITE) memory, a copy in the owner's ``writable_section`` (.data), or a copy
  inside another module of the process (its name);
- ``callback_overrides32`` (WoW64 only): ApiNumber -> ``private`` / ``private_rwx``, entries of
  the 32-bit table (_PEB32.KernelCallbackTable, in the 32-bit user32.dll);
- ``instrumentation_callback``: KPROCESS.InstrumentationCallback's target.

A target is a module of the process (the code far from its exports), ``private`` (a private
read/write VadS) or ``private_rwx`` (a private PAGE_EXECUTE_READWRITE VadS).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from imagebuilder.spec_fields import FieldError

PRIVATE_TARGETS = ("private", "private_rwx")
TABLE_LOCATIONS = ("owner", "private", "private_rwx", "writable_section")
# A WoW64 process's 64-bit modules on a real machine; it maps no 64-bit user32.dll
# (../shared/docs/real-binaries.md, last section).
WOW64_MODULES = ("wow64.dll", "wow64win.dll", "wow64cpu.dll")
# A copy in the owner's .data page: the entries and the zero entry that ends them.
WRITABLE_SECTION_ENTRIES = 0x1000 // 8 - 1


@dataclass(frozen=True)
class TableSpec:
    location: str = "owner"
    overrides32: dict[int, str] = field(default_factory=dict)
    instrumentation: str | None = None


def table_owner(modules: tuple[str, ...], wow64: bool) -> str | None:
    """The image whose table PEB.KernelCallbackTable names: user32.dll, or wow64win.dll in a
    WoW64 process (its whcbfn* thunks switch to the 32-bit side)."""
    owner = "wow64win.dll" if wow64 else "user32.dll"
    return owner if owner in modules else None


def check_wow64_modules(modules: tuple[str, ...], wow64: bool, where: str) -> None:
    if not wow64:
        return
    missing = [m for m in WOW64_MODULES if m not in modules]
    if missing:
        raise FieldError(f"{where}.modules: a WoW64 process maps {', '.join(missing)}")
    if "user32.dll" in modules:
        raise FieldError(
            f"{where}.modules: a WoW64 process maps no 64-bit user32.dll (its 32-bit user32.dll"
            " comes from SysWOW64 by itself)"
        )


def target(value: Any, where: str, modules: tuple[str, ...]) -> str:
    if value in PRIVATE_TARGETS or (isinstance(value, str) and value in modules):
        return value
    raise FieldError(
        f"{where}: {value!r} is not private, private_rwx or one of the process's modules"
    )


def parse_table_spec(
    obj: dict[str, Any], where: str, modules: tuple[str, ...], wow64: bool, table_size: int
) -> TableSpec:
    """The ``callback_table``, ``callback_overrides32`` and ``instrumentation_callback`` fields
    of process ``obj`` (``callback_overrides`` is parsed by scenario.py)."""
    owner = table_owner(modules, wow64)
    location = obj.get("callback_table", "owner")
    if location not in TABLE_LOCATIONS and (
        not isinstance(location, str) or location not in modules or location == owner
    ):
        raise FieldError(
            f"{where}.callback_table: {location!r} is not one of {', '.join(TABLE_LOCATIONS)}"
            " or another module of the process"
        )
    if (location != "owner" or obj.get("callback_overrides")) and owner is None:
        key = "callback_table" if location != "owner" else "callback_overrides"
        raise FieldError(
            f"{where}.{key}: the process has no callback table (it maps neither user32.dll"
            " nor, in WoW64, wow64win.dll)"
        )
    if location == "writable_section" and table_size > WRITABLE_SECTION_ENTRIES:
        raise FieldError(
            f"{where}.callback_table: writable_section holds at most {WRITABLE_SECTION_ENTRIES}"
            f" entries; callback_table_size is {table_size}"
        )
    overrides32: dict[int, str] = {}
    raw = obj.get("callback_overrides32", {})
    if not isinstance(raw, dict):
        raise FieldError(f"{where}.callback_overrides32: expected an object")
    if raw and not wow64:
        raise FieldError(f"{where}.callback_overrides32: only a WoW64 process has a 32-bit table")
    for key, value in raw.items():
        try:
            api = int(key, 0)
        except ValueError:
            raise FieldError(f"{where}.callback_overrides32 key: {key!r} is not a number") from None
        if not 0 <= api < table_size:
            raise FieldError(
                f"{where}.callback_overrides32 key: {api} is outside 0..{table_size - 1}"
            )
        if value not in PRIVATE_TARGETS:
            raise FieldError(
                f"{where}.callback_overrides32[{key}]: {value!r} is not private or private_rwx"
            )
        overrides32[api] = value
    instrumentation = None
    if obj.get("instrumentation_callback") is not None:
        instrumentation = target(
            obj["instrumentation_callback"], f"{where}.instrumentation_callback", modules
        )
    return TableSpec(location, overrides32, instrumentation)
