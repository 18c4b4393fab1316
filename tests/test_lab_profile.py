"""The lab profile's symbol table: Volatility loads it, its names are Windows', its layout
is our own and self-consistent, and the file is the same bytes every time."""

from __future__ import annotations

import json
import lzma
import re
import struct
from pathlib import Path
from typing import Any

import pytest

from imagebuilder import lab_profile as lp
from imagebuilder import lab_types as lt

SHARED_SYMBOLS = Path(__file__).resolve().parents[1].parent / "shared" / "symbols"
REAL_19041 = (
    SHARED_SYMBOLS / "windows" / "ntkrnlmp.pdb" / "BBED7C2955FBE4522AAA23F4B8677AD9-1.json.xz"
)

# Members that Volatility 2.28's stock plugins windows.pslist, threads, dlllist, ldrmodules,
# vadinfo, pe_symbols and info (and the extension classes they call) read from the kernel
# table on a Windows 10 x64 kernel; dotted paths go through embedded structures.
MEMBERS_READ_BY_VOLATILITY: dict[str, list[str]] = {
    "_LIST_ENTRY": ["Flink", "Blink"],
    "_UNICODE_STRING": ["Length", "MaximumLength", "Buffer"],
    "_LARGE_INTEGER": ["QuadPart", "LowPart", "HighPart"],
    "_ULARGE_INTEGER": ["LowPart", "HighPart"],
    "_KSYSTEM_TIME": ["LowPart", "High1Time"],
    "_EX_FAST_REF": ["Object"],
    "_CLIENT_ID": ["UniqueProcess", "UniqueThread"],
    "_KPROCESS": ["DirectoryTableBase"],
    "_EPROCESS": [
        "Pcb.DirectoryTableBase", "UniqueProcessId", "ActiveProcessLinks",
        "InheritedFromUniqueProcessId", "ImageFileName", "CreateTime.QuadPart",
        "ExitTime.QuadPart", "Peb", "ObjectTable", "Session", "ThreadListHead.Flink",
        "ThreadListHead.Blink", "ActiveThreads", "VadRoot.Root", "WoW64Process",
    ],
    "_EWOW64PROCESS": ["Peb"],
    "_MM_SESSION_SPACE": ["SessionId"],
    "_ETHREAD": [
        "Cid.UniqueProcess", "Cid.UniqueThread", "StartAddress", "Win32StartAddress",
        "CreateTime.QuadPart", "ExitTime.QuadPart", "Tcb.Process", "ThreadListEntry",
        "CrossThreadFlags",
    ],
    "_KTHREAD": ["State", "WaitReason", "Process"],
    "_PEB": ["Ldr", "ImageBaseAddress", "ProcessParameters"],
    "_PEB_LDR_DATA": [
        "InLoadOrderModuleList", "InMemoryOrderModuleList", "InInitializationOrderModuleList",
    ],
    "_LDR_DATA_TABLE_ENTRY": [
        "InLoadOrderLinks", "InMemoryOrderLinks", "InInitializationOrderLinks", "DllBase",
        "SizeOfImage", "FullDllName", "BaseDllName", "LoadTime.QuadPart", "ObsoleteLoadCount",
    ],
    "_KLDR_DATA_TABLE_ENTRY": [
        "InLoadOrderLinks", "DllBase", "SizeOfImage", "FullDllName", "BaseDllName",
    ],
    "_RTL_USER_PROCESS_PARAMETERS": ["Environment", "EnvironmentSize"],
    "_RTL_AVL_TREE": ["Root"],
    "_RTL_BALANCED_NODE": ["Left", "Right", "ParentValue"],
    "_MMVAD_SHORT": [
        "VadNode.Left", "VadNode.Right", "VadNode.ParentValue", "StartingVpn", "EndingVpn",
        "StartingVpnHigh", "EndingVpnHigh", "u.VadFlags.Protection",
        "u.VadFlags.PrivateMemory", "u1.VadFlags1.CommitCharge",
    ],
    "_MMVAD": ["Core.VadNode.Left", "Core.StartingVpn", "Subsection"],
    "_SUBSECTION": ["ControlArea"],
    "_CONTROL_AREA": ["FilePointer.Object"],
    "_FILE_OBJECT": ["FileName"],
    "_OBJECT_HEADER": ["Body", "InfoMask", "PointerCount", "TypeIndex"],
    "_POOL_TRACKER_BIG_PAGES": ["PoolType"],
    "_KUSER_SHARED_DATA": [
        "NtMajorVersion", "NtMinorVersion", "SystemTime", "NtSystemRoot", "NtProductType",
    ],
    "_DBGKD_GET_VERSION64": ["MajorVersion", "MinorVersion", "MachineType"],
}

# Members whose absence sends Volatility down its Windows 10 code paths.
MEMBERS_THAT_MUST_BE_ABSENT: dict[str, list[str]] = {
    "_ETHREAD": ["ThreadsProcess"],  # XP only
    "_EPROCESS": ["Wow64Process"],  # 19041 spells it WoW64Process
    "_RTL_AVL_TREE": ["BalancedRoot"],  # Windows 8 _MM_AVL_TABLE
    "_MMVAD_SHORT": ["LeftChild", "RightChild", "Left", "Right", "Parent", "Core",
                     "CommitCharge"],
    "_RTL_BALANCED_NODE": ["LeftChild", "RightChild", "u1"],
    "_MMVAD": ["ControlArea"],  # XP keeps it in the VAD
    "_HANDLE_TABLE": ["HandleCount"],  # not in 19041 either
}

KERNEL_GLOBALS_READ_BY_VOLATILITY = [
    "PsActiveProcessHead", "PsLoadedModuleList", "KdVersionBlock", "KeNumberProcessors",
    "KdDebuggerDataBlock", "MmProtectToValue", "MmSystemRangeStart",
]


# -- helpers ----------------------------------------------------------------------------------
def _natural_alignment(isf_type: dict[str, Any], layouts: dict[str, lp.TypeLayout]) -> int:
    kind = isf_type["kind"]
    if kind == "base":
        return max(1, lt.BASE_TYPES[isf_type["name"]]["size"])
    if kind == "pointer":
        return lt.POINTER_SIZE
    if kind == "array":
        return _natural_alignment(isf_type["subtype"], layouts)
    if kind == "enum":
        return lt.ENUMS[isf_type["name"]]["size"]
    return layouts[isf_type["name"]].align


def _shares_storage_legally(a: lp.FieldLayout, b: lp.FieldLayout) -> bool:
    for step_a, step_b in zip(a.path, b.path, strict=False):
        if step_a[0] != step_b[0]:
            return False
        if step_a[1] != step_b[1]:
            return True  # different alternatives of the same overlay
    return False


def _bit_range(item: lp.FieldLayout) -> tuple[int, int]:
    if item.bit_length is not None:
        start = item.offset * 8 + (item.bit_position or 0)
        return start, start + item.bit_length
    return item.offset * 8, (item.offset + item.size) * 8


def _referenced_names(isf_type: dict[str, Any]) -> list[tuple[str, str]]:
    kind = isf_type["kind"]
    if kind in ("struct", "union", "class"):
        return [("user", isf_type["name"])]
    if kind == "enum":
        return [("enum", isf_type["name"])]
    if kind == "base":
        return [("base", isf_type["name"])]
    if kind in ("pointer", "array"):
        return _referenced_names(isf_type["subtype"])
    if kind == "bitfield":
        return _referenced_names(isf_type["type"])
    raise AssertionError(f"unexpected ISF kind {kind}")


# -- the file ---------------------------------------------------------------------------------
def test_constants_and_file_name(tmp_path: Path) -> None:
    assert re.fullmatch(r"[0-9A-F]{32}", lp.LAB_GUID)
    assert lp.LAB_AGE == 1
    assert lp.LAB_BUILD == 19041
    path = lp.write_isf(tmp_path)
    assert path == tmp_path / "windows" / "ntkrnlmp.pdb" / f"{lp.LAB_GUID}-1.json.xz"
    data = json.loads(lzma.decompress(path.read_bytes()))
    assert data == json.loads(json.dumps(lp.build_isf()))
    pdb = data["metadata"]["windows"]["pdb"]
    assert pdb == {"GUID": lp.LAB_GUID, "age": 1, "database": "ntkrnlmp.pdb",
                   "machine_type": 34404}
    # what pefile prints for the RSDS GUID (and so what Volatility looks the table up by)
    raw = lp.codeview_guid_bytes()
    data1, data2, data3 = struct.unpack_from("<IHH", raw)
    printed = f"{data1:08X}{data2:04X}{data3:04X}" + raw[8:].hex().upper()
    assert printed == lp.LAB_GUID


def test_file_is_deterministic(tmp_path: Path) -> None:
    first = lp.write_isf(tmp_path / "a").read_bytes()
    second = lp.write_isf(tmp_path / "b").read_bytes()
    assert first == second == lp.isf_bytes()
    again = lp.write_isf(tmp_path / "a")  # rewriting an existing table changes nothing
    assert again.read_bytes() == first


def test_isf_passes_volatility_schema() -> None:
    pytest.importorskip("jsonschema", reason="jsonschema is needed to validate the schema")
    from volatility3 import schemas

    assert schemas.validate(lp.build_isf(), use_cache=False)


def test_every_referenced_name_is_defined() -> None:
    isf = lp.build_isf()
    referenced_anonymous = set()
    for type_name, body in isf["user_types"].items():
        for field_name, field in body["fields"].items():
            for space, name in _referenced_names(field["type"]):
                where = f"{type_name}.{field_name}"
                if space == "user":
                    assert name in isf["user_types"], f"{where}: no type {name}"
                    if name.startswith("__anonymous"):
                        referenced_anonymous.add(name)
                elif space == "enum":
                    assert name in isf["enums"], f"{where}: no enum {name}"
                else:
                    assert name in isf["base_types"], f"{where}: no base type {name}"
    anonymous = {name for name in isf["user_types"] if name.startswith("__anonymous")}
    assert anonymous == referenced_anonymous


# -- layout -----------------------------------------------------------------------------------
def test_layout_is_self_consistent() -> None:
    layouts = lp.layout()
    for name, type_layout in layouts.items():
        assert type_layout.size % type_layout.align == 0, name
        assert type_layout.size > 0, name
        items = list(type_layout.fields.values())
        assert items, f"{name} declares no field"
        for item in items:
            assert item.offset + item.size <= type_layout.size, f"{name}.{item.name}"
            if item.bit_length is None:
                assert item.offset % _natural_alignment(item.isf_type, layouts) == 0, (
                    f"{name}.{item.name} misaligned at {item.offset:#x}")
            else:
                unit_bits = lt.BASE_TYPES[item.isf_type["type"]["name"]]["size"] * 8
                assert item.offset % (unit_bits // 8) == 0, f"{name}.{item.name}"
                assert item.bit_position >= 0
                assert item.bit_position + item.bit_length <= unit_bits
            if type_layout.kind == "union":
                assert item.path, f"{name}.{item.name} is outside every alternative"
        for i, a in enumerate(items):
            a_start, a_end = _bit_range(a)
            for b in items[i + 1:]:
                b_start, b_end = _bit_range(b)
                if a_start < b_end and b_start < a_end:
                    assert _shares_storage_legally(a, b), (
                        f"{name}: {a.name} and {b.name} overlap outside an overlay")
        if type_layout.kind == "union":
            # every alternative of a union starts at its beginning
            assert min(item.offset for item in items) == 0, name


def test_isf_matches_layout() -> None:
    isf = lp.build_isf()
    layouts = lp.layout()
    assert set(isf["user_types"]) == set(layouts)
    for name, body in isf["user_types"].items():
        assert body["size"] == layouts[name].size
        for field_name, field in body["fields"].items():
            assert field["offset"] == layouts[name].fields[field_name].offset
            assert field["type"] == layouts[name].fields[field_name].isf_type


def test_pinned_offsets_and_sizes() -> None:
    layouts = lp.layout()
    kuser = layouts["_KUSER_SHARED_DATA"].fields
    assert kuser["NtMajorVersion"].offset == 0x26C
    assert kuser["NtMinorVersion"].offset == 0x270
    assert kuser["NtBuildNumber"].offset == 0x260
    assert layouts["_KTRAP_FRAME"].size == 0x190
    assert layouts["_KSTACK_CONTROL"].size == 0x30
    assert layouts["_DISPATCHER_HEADER"].fields["Size"].size == 1
    assert layouts["_EPROCESS"].fields["ImageFileName"].size == 15
    # the 32-bit PEB of a WoW64 process: pointers are ULONGs, the table at +0x2C as in Windows
    assert layouts["_PEB32"].fields["KernelCallbackTable"].offset == 0x2C
    assert layouts["_PEB32"].fields["KernelCallbackTable"].size == 4
    assert layouts["_OBJECT_HEADER"].fields["Body"].offset % 16 == 0
    for field_name in ("TrapFrame", "OutputBuffer", "OutputLength"):
        field = layouts["_KEXCEPTION_FRAME"].fields[field_name]
        assert field.isf_type == {"kind": "base", "name": "unsigned long long"}
    # the machine-pushed part of the trap frame stays at its top
    trap = layouts["_KTRAP_FRAME"].fields
    assert trap["SegSs"].offset + 8 == trap["Fill4"].offset + 4 == 0x190
    assert lp.field_offset("_KSTACK_CONTROL", "Previous.KernelStack") == (
        layouts["_KSTACK_CONTROL"].fields["Previous"].offset
        + layouts["_KERNEL_STACK_SEGMENT"].fields["KernelStack"].offset)


def test_layout_rules() -> None:
    types = {
        "_A": lt.S(("a", "unsigned char"), ("b", "unsigned long long"), ("c", "unsigned short")),
        "_B": lt.S(("x", "char"), ("f1", lt.bits(3, "unsigned long")),
                   ("f2", lt.bits(30, "unsigned long")), ("f3", lt.bits(2, "unsigned short"))),
        "_C": lt.U([("lo", "unsigned long"), ("hi", "long")], ("q", "long long")),
        "_D": lt.S(("a", "unsigned char"), lt.PadTo(0x10), ("m", "_M")),
        "_M": lt.S(("x", "unsigned long long"), align=16),
    }
    layouter = lp._Layouter(types, {})
    a = layouter.layout("_A")
    assert [(f.name, f.offset) for f in a.fields.values()] == [("a", 0), ("b", 8), ("c", 16)]
    assert a.size == 24
    b = layouter.layout("_B").fields
    assert (b["f1"].offset, b["f1"].bit_position) == (4, 0)
    assert (b["f2"].offset, b["f2"].bit_position) == (8, 0)  # 3 + 30 bits do not fit in 32
    assert (b["f3"].offset, b["f3"].bit_position) == (12, 0)  # unit size changed
    assert layouter.layout("_B").size == 16
    c = layouter.layout("_C")
    assert {f.name: f.offset for f in c.fields.values()} == {"lo": 0, "hi": 4, "q": 0}
    assert c.size == 8
    d = layouter.layout("_D")
    assert d.fields["m"].offset == 0x10 and d.size == 0x20 and d.align == 16
    with pytest.raises(lp.LayoutError):
        lp._Layouter({"_E": lt.S(("a", "unsigned long"), lt.PadTo(2))}, {}).layout("_E")


def test_kernel_symbols() -> None:
    layouts = lp.layout()
    assert "KeUserCallbackDispatcher" in lt.SYMBOLS  # builds up to 19041
    assert "PsNtdllExports" not in lt.SYMBOLS and "_PS_NTDLL_EXPORTS" not in layouts
    for name in KERNEL_GLOBALS_READ_BY_VOLATILITY + ["NtBuildLab", "NtBuildNumber",
                                                      "CmNtCSDVersion"]:
        assert name in lt.SYMBOLS, name
    spans = []
    for name, sym in lt.SYMBOLS.items():
        assert sym.rva >= lt.KERNEL_DATA_START, name
        assert sym.rva + sym.size <= lt.KERNEL_DATA_END, name
        assert sym.rva % 16 == 0, name
        if sym.ctype in layouts:
            assert sym.size == layouts[sym.ctype].size, name
        spans.append((sym.rva, sym.rva + sym.size, name))
    spans.sort()
    for (_, end, name), (start, _, following) in zip(spans, spans[1:], strict=False):
        assert end <= start, f"{name} overlaps {following}"


# -- against a real Windows table -------------------------------------------------------------
@pytest.fixture(scope="module")
def real_19041() -> dict[str, Any]:
    if not REAL_19041.exists():
        pytest.skip(f"the third-party kernel symbol tables are not here: {REAL_19041} is missing")
    with lzma.open(REAL_19041, "rt", encoding="utf-8") as handle:
        return json.load(handle)


def _compatible(lab_t: dict[str, Any], real_t: dict[str, Any], lab: dict[str, Any],
                real: dict[str, Any], where: str, problems: list[str]) -> None:
    lab_kind, real_kind = lab_t["kind"], real_t["kind"]
    if lab_kind == "base":
        if real_kind != "base" or real_t["name"] != lab_t["name"]:
            problems.append(f"{where}: {lab_t} where Windows has {real_t}")
    elif lab_kind == "pointer":
        if real_kind != "pointer":
            problems.append(f"{where}: pointer where Windows has {real_t}")
        elif lab_t["subtype"] != {"kind": "base", "name": "void"}:
            _compatible(lab_t["subtype"], real_t["subtype"], lab, real, where + "->", problems)
    elif lab_kind == "array":
        if real_kind != "array" or real_t["count"] != lab_t["count"]:
            problems.append(f"{where}: {lab_t} where Windows has {real_t}")
        else:
            _compatible(lab_t["subtype"], real_t["subtype"], lab, real, where + "[]", problems)
    elif lab_kind == "bitfield":
        if real_kind != "bitfield" or real_t["bit_length"] != lab_t["bit_length"]:
            problems.append(f"{where}: {lab_t} where Windows has {real_t}")
        else:
            _compatible(lab_t["type"], real_t["type"], lab, real, where, problems)
    elif lab_kind == "enum":
        if real_kind != "enum" or real_t["name"] != lab_t["name"]:
            problems.append(f"{where}: {lab_t} where Windows has {real_t}")
    elif lab_kind in ("struct", "union"):
        name = lab_t["name"]
        if name.startswith("__anonymous"):
            # ours and Windows' anonymous types have made-up names: compare their fields
            if real_kind != lab_kind or not real_t.get("name", "").startswith("__anonymous"):
                problems.append(f"{where}: anonymous {lab_kind} where Windows has {real_t}")
                return
            _compatible_fields(lab["user_types"][name], real["user_types"][real_t["name"]],
                               lab, real, where, problems)
        elif real_kind != lab_kind or real_t.get("name") != name:
            problems.append(f"{where}: {lab_t} where Windows has {real_t}")
    else:
        problems.append(f"{where}: unexpected kind {lab_kind}")


def _compatible_fields(lab_type: dict[str, Any], real_type: dict[str, Any],
                       lab: dict[str, Any], real: dict[str, Any], where: str,
                       problems: list[str]) -> None:
    for field_name, field in lab_type["fields"].items():
        real_field = real_type["fields"].get(field_name)
        if real_field is None:
            problems.append(f"{where}.{field_name}: no such field in Windows")
            continue
        _compatible(field["type"], real_field["type"], lab, real, f"{where}.{field_name}",
                    problems)


@pytest.mark.real_symbols
def test_names_and_kinds_exist_in_windows_19041(real_19041: dict[str, Any]) -> None:
    lab = lp.build_isf()
    real = real_19041
    problems: list[str] = []
    for name, body in lab["base_types"].items():
        real_body = real["base_types"].get(name)
        if real_body != body:
            problems.append(f"base type {name}: {body} where Windows has {real_body}")
    for name, body in lab["user_types"].items():
        if name.startswith("__anonymous"):
            continue  # compared through the fields that hold them
        real_body = real["user_types"].get(name)
        if real_body is None:
            problems.append(f"type {name}: not in Windows")
            continue
        if real_body["kind"] != body["kind"]:
            problems.append(f"type {name}: {body['kind']} where Windows has {real_body['kind']}")
        _compatible_fields(body, real_body, lab, real, name, problems)
    for name, body in lab["enums"].items():
        real_body = real["enums"].get(name)
        if real_body is None:
            problems.append(f"enum {name}: not in Windows")
            continue
        if (real_body["size"], real_body["base"]) != (body["size"], body["base"]):
            problems.append(f"enum {name}: size/base differ")
        for constant, value in body["constants"].items():
            if real_body["constants"].get(constant) != value:
                problems.append(f"enum {name}.{constant} = {value}: Windows differs")
    for name in lab["symbols"]:
        if name not in real["symbols"]:
            problems.append(f"symbol {name}: not in Windows")
    assert not problems, "\n".join(problems)


# -- in Volatility ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vol_table(tmp_path_factory: pytest.TempPathFactory):
    """The written table, found and loaded the way Volatility finds a kernel's table."""
    import volatility3.symbols
    from volatility3 import schemas
    from volatility3.framework import contexts
    from volatility3.framework.symbols.windows import WindowsKernelIntermedSymbols

    symbols_dir = tmp_path_factory.mktemp("symbols")
    lp.write_isf(symbols_dir)
    with pytest.MonkeyPatch.context() as patch:
        # only our directory, and keep Volatility's validation cache out of the user's home
        patch.setattr(volatility3.symbols, "__path__", [str(symbols_dir)])
        patch.setattr(schemas, "cached_validation_filepath",
                      str(symbols_dir / "valid_isf.hashcache"))
        patch.setattr(schemas, "cached_validations", set())
        context = contexts.Context()
        table_name = WindowsKernelIntermedSymbols.create(
            context, "lab", "windows", f"{lp.PDB_NAME}/{lp.LAB_GUID}-{lp.LAB_AGE}")
    return context, table_name


def _template(context, table_name: str, type_name: str):
    return context.symbol_space.get_type(f"{table_name}!{type_name}")


def _member_path(context, table_name: str, type_name: str, dotted: str) -> bool:
    from volatility3.framework.objects.templates import ReferenceTemplate

    current = _template(context, table_name, type_name)
    for part in dotted.split("."):
        if not current.has_member(part):
            return False
        current = current.members[part][1]
        if isinstance(current, ReferenceTemplate):  # an embedded structure, by name
            current = context.symbol_space.get_type(current.vol.type_name)
    return True


def test_volatility_loads_the_table(vol_table) -> None:
    from volatility3.framework.symbols.windows import WindowsKernelIntermedSymbols
    from volatility3.framework.symbols.windows.extensions import pool

    context, table_name = vol_table
    table = context.symbol_space[table_name]
    assert isinstance(table, WindowsKernelIntermedSymbols)
    assert table.metadata.pdb_guid == lp.LAB_GUID and table.metadata.pdb_age == lp.LAB_AGE
    assert table.config["isf_url"].endswith(f"{lp.LAB_GUID}-{lp.LAB_AGE}.json.xz")
    # 19041's big-page tracker has PoolType, which selects the Vista+ pool header class
    assert table.get_type_class("_POOL_HEADER") is pool.POOL_HEADER_VISTA
    assert context.symbol_space.get_type(f"{table_name}!pointer").size == 8
    assert table.get_symbol("KeUserCallbackDispatcher").address == (
        lt.SYMBOLS["KeUserCallbackDispatcher"].rva)
    assert not context.symbol_space.has_symbol(f"{table_name}!PsNtdllExports")
    for name in lt.ENUMS:
        enum = table.get_enumeration(name)
        assert enum.choices == lt.ENUMS[name]["constants"]


def test_volatility_agrees_with_the_layout(vol_table) -> None:
    context, table_name = vol_table
    for name, type_layout in lp.layout().items():
        template = _template(context, table_name, name)
        assert template.size == type_layout.size, name
        for field_name, item in type_layout.fields.items():
            assert template.relative_child_offset(field_name) == item.offset, (name, field_name)


def _touch(obj) -> None:
    """Reads every member (and member of member) of a Volatility object."""
    from volatility3.framework import objects

    if isinstance(obj, objects.Array):
        for element in obj:
            _touch(element)
    elif isinstance(obj, objects.AggregateType):
        for member_name in obj.vol.members:
            _touch(obj.member(member_name))
    elif isinstance(obj, objects.Float):
        float(obj)
    else:
        assert isinstance(obj, (objects.Integer, objects.Char, objects.Pointer, objects.BitField,
                                objects.Enumeration)), type(obj)
        int(obj)


def test_every_type_instantiates_in_volatility(vol_table) -> None:
    from volatility3.framework.layers.physical import BufferDataLayer

    context, table_name = vol_table
    layouts = lp.layout()
    size = max(t.size for t in layouts.values())
    layer = BufferDataLayer(context, "lab_zero", "lab_zero", b"\0" * size)
    context.add_layer(layer)
    for name in layouts:
        obj = context.object(f"{table_name}!{name}", layer_name="lab_zero", offset=0)
        assert obj.vol.size == layouts[name].size
        _touch(obj)


def test_members_volatility_reads_are_there(vol_table) -> None:
    context, table_name = vol_table
    missing = [f"{t}.{m}" for t, members in MEMBERS_READ_BY_VOLATILITY.items()
               for m in members if not _member_path(context, table_name, t, m)]
    assert not missing, missing
    present = [f"{t}.{m}" for t, members in MEMBERS_THAT_MUST_BE_ABSENT.items()
               for m in members if _template(context, table_name, t).has_member(m)]
    assert not present, present
    for name in KERNEL_GLOBALS_READ_BY_VOLATILITY:
        assert context.symbol_space.has_symbol(f"{table_name}!{name}"), name


class _Image:
    """A flat buffer that Volatility reads as one layer; pointers are buffer offsets."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.layouts = lp.layout()

    def put(self, address: int, type_name: str, values: dict[str, int]) -> None:
        for dotted, value in values.items():
            current, offset = type_name, address
            parts = dotted.split(".")
            for part in parts[:-1]:
                item = self.layouts[current].fields[part]
                offset += item.offset
                current = item.isf_type["name"]
            item = self.layouts[current].fields[parts[-1]]
            offset += item.offset
            if item.bit_length is not None:
                unit = int.from_bytes(self.data[offset:offset + item.size], "little")
                mask = ((1 << item.bit_length) - 1) << item.bit_position
                unit = (unit & ~mask) | ((value << item.bit_position) & mask)
                self.data[offset:offset + item.size] = unit.to_bytes(item.size, "little")
            else:
                self.data[offset:offset + item.size] = value.to_bytes(item.size, "little")

    def raw(self, address: int, data: bytes) -> None:
        self.data[address:address + len(data)] = data


def test_volatility_extensions_read_lab_structures(vol_table) -> None:
    """Volatility's own Windows classes walk structures laid out by the lab table."""
    from volatility3.framework.layers.physical import BufferDataLayer

    context, table_name = vol_table
    image = _Image(0x4000)
    eprocess, ethread, vad, vad_short = 0x200, 0x800, 0x1100, 0x1300
    subsection, control_area, file_object, name_buffer = 0x1500, 0x1600, 0x1700, 0x1900
    wow64 = 0x1A00
    image.put(eprocess, "_EPROCESS", {
        "UniqueProcessId": 0x1234, "VadRoot.Root": vad, "WoW64Process": wow64,
        "ThreadListHead.Flink": ethread + lp.field_offset("_ETHREAD", "ThreadListEntry"),
    })
    image.raw(eprocess + lp.field_offset("_EPROCESS", "ImageFileName"), b"notepad.exe\0")
    image.put(wow64, "_EWOW64PROCESS", {"Peb": 0x3000})
    image.put(ethread, "_ETHREAD", {
        "Tcb.Process": eprocess, "Tcb.State": 5, "Tcb.WaitReason": 13,
        "Cid.UniqueProcess": 0x1234, "Cid.UniqueThread": 0x88,
    })
    # the root VAD maps a file; its left child is a private short VAD
    image.raw(vad - 12, b"Vad ")
    image.put(vad, "_MMVAD", {
        "Core.VadNode.Left": vad_short, "Core.StartingVpn": 0x7FF8_0000 & 0xFFFFFFFF,
        "Core.StartingVpnHigh": 0, "Core.EndingVpn": 0x7FF8_01FF & 0xFFFFFFFF,
        "Core.u.VadFlags.Protection": 7, "Core.u.VadFlags.VadType": 2,
        "Core.u1.VadFlags1.CommitCharge": 3, "Subsection": subsection,
    })
    image.raw(vad_short - 12, b"VadS")
    image.put(vad_short, "_MMVAD_SHORT", {
        "VadNode.ParentValue": vad | 1, "StartingVpn": 0x10, "EndingVpn": 0x1F,
        "StartingVpnHigh": 1, "EndingVpnHigh": 1,
        "u.VadFlags.PrivateMemory": 1, "u.VadFlags.Protection": 4,
        "u1.VadFlags1.CommitCharge": 16,
    })
    image.put(subsection, "_SUBSECTION", {"ControlArea": control_area})
    image.put(control_area, "_CONTROL_AREA", {"FilePointer.Value": file_object | 0x5})
    path = "\\Windows\\System32\\ntdll.dll".encode("utf-16-le")
    image.put(file_object, "_FILE_OBJECT", {
        "FileName.Length": len(path), "FileName.MaximumLength": len(path) + 2,
        "FileName.Buffer": name_buffer,
    })
    image.raw(name_buffer, path)

    layer = BufferDataLayer(context, "lab_image", "lab_image", bytes(image.data))
    context.add_layer(layer)
    proc = context.object(f"{table_name}!_EPROCESS", layer_name="lab_image", offset=eprocess)
    assert proc.get_is_wow64() and int(proc.get_wow_64_process().Peb) == 0x3000
    threads = list(proc.ThreadListHead.to_list(f"{table_name}!_ETHREAD", "ThreadListEntry"))
    assert [t.vol.offset for t in threads] == [ethread]
    thread = threads[0]
    assert thread.owning_process().vol.offset == eprocess
    assert thread.Tcb.get_state() == "Waiting" and thread.Tcb.get_wait_reason() == "WrUserRequest"

    vads = list(proc.get_vad_root().traverse())
    assert [(v.get_tag(), v.vol.offset) for v in vads] == [("Vad ", vad), ("VadS", vad_short)]
    mapped, private = vads
    assert (mapped.get_start(), mapped.get_end()) == (0x7FF8_0000 << 12, (0x7FF8_0200 << 12) - 1)
    assert mapped.Protection == 7 and mapped.get_commit_charge() == 3
    assert mapped.get_file_name() == "\\Windows\\System32\\ntdll.dll"
    assert private.get_start() == (1 << 44) | (0x10 << 12)
    assert private.get_end() == (1 << 44) | ((0x20 << 12) - 1)
    assert private.get_private_memory() == 1 and private.get_commit_charge() == 16
    assert private.get_parent() == vad and private.get_file_name() != mapped.get_file_name()
