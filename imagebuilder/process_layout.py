"""A user process: its address space, mapped modules, PEB, loader lists, VAD tree, EPROCESS."""

from __future__ import annotations

from dataclasses import dataclass, field

from imagebuilder.kernel_layout import Kernel
from imagebuilder.memory import PAGE, AddressSpace
from imagebuilder.user_modules import ModuleImage

PEB_ADDRESS = 0x0000_00B3_4A5C_0000
TEB_STRIDE = 0x2000  # a 64-bit TEB spans two pages
HEAP_ADDRESS = 0x0000_01F2_3000_0000
HEAP_SIZE = 0x40000
STACKS_ADDRESS = 0x0000_0012_0000_0000
USER_STACK_RESERVE = 0x100000
PRIVATE_MEMORY = 0x0000_0200_0000_0000  # a region no module maps (hijacked callback targets)
WOW64_PEB32 = 0x7F5E_0000

# MMVAD_FLAGS values (ntddk/ReactOS mmtypes.h): VadNone 0, VadImageMap 2;
# protection MM_READWRITE 4, MM_EXECUTE_READWRITE 6, MM_EXECUTE_WRITECOPY 7 (indices into
# MmProtectToValue: PAGE_READWRITE, PAGE_EXECUTE_READWRITE, PAGE_EXECUTE_WRITECOPY).
VAD_IMAGE_MAP = 2
MM_READWRITE = 4
MM_EXECUTE_READWRITE = 6
MM_EXECUTE_WRITECOPY = 7
FILETIME_2024 = 133_590_240_000_000_000  # 2024-05-01 00:00 UTC in 100 ns since 1601


@dataclass
class Vad:
    start: int
    end: int  # inclusive last byte
    module: ModuleImage | None = None
    protection: int = MM_READWRITE  # of a private VAD (an image VAD is EXECUTE_WRITECOPY)

    def contains(self, address: int) -> bool:
        return self.start <= address <= self.end


@dataclass
class ProcessLayout:
    pid: int
    name: str
    eprocess: int
    space: AddressSpace
    peb: int
    modules: list[ModuleImage]
    exe: ModuleImage
    vads: list[Vad] = field(default_factory=list)
    callback_table: int = 0
    # The note every thread of the process gets (its instrumentation callback), or None.
    thread_note: str | None = None
    heap_next: int = HEAP_ADDRESS
    vad_nodes: list[int] = field(default_factory=list)  # _MMVAD(_SHORT) nodes, written last

    def heap(self, size: int) -> int:
        address = self.heap_next
        self.heap_next = (address + size + 15) & ~15
        if self.heap_next > HEAP_ADDRESS + HEAP_SIZE:
            raise ValueError(f"process {self.pid}: loader heap exhausted")
        return address

    def module_named(self, name: str) -> ModuleImage | None:
        for module in [self.exe, *self.modules]:
            if module.name == name:
                return module
        return None


class ModuleMapper:
    """Physical pages of each module, shared by every process that maps it."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self._pages: dict[str, list[int]] = {}
        self._control_areas: dict[str, int] = {}

    def map(self, space: AddressSpace, module: ModuleImage, private_data: bool) -> None:
        key = f"{module.path}@{module.base:x}"
        pages = self._pages.get(key)
        if pages is None:
            pages = []
            for offset in range(0, module.size, PAGE):
                pa = self.kernel.memory.alloc()
                self.kernel.memory.write(pa, module.data[offset : offset + PAGE])
                pages.append(pa)
            self._pages[key] = pages
        data_start, data_size = module.data_section
        for index, pa in enumerate(pages):
            offset = index * PAGE
            va = module.base + offset
            if private_data and data_size and data_start <= offset < data_start + data_size:
                # Copy-on-write data (the callback table) gets a private page per process.
                private = self.kernel.memory.alloc()
                self.kernel.memory.write(private, module.data[offset : offset + PAGE])
                space.map_page(va, private)
            else:
                space.map_page(va, pa)

    def control_area(self, module: ModuleImage) -> int:
        """_CONTROL_AREA -> FilePointer -> _FILE_OBJECT naming the module, one per file."""
        key = f"{module.path}@{module.base:x}"
        if key in self._control_areas:
            return self._control_areas[key]
        k, w = self.kernel, self.kernel.writer
        file_object = k.pool_object("_FILE_OBJECT", b"File")
        name_buffer = k.pool(_utf16_size(module.path), b"FMfn")
        w.unicode_string(
            k.space,
            file_object + k.symbols.offset("_FILE_OBJECT", "FileName"),
            name_buffer,
            module.path,
        )
        w.put(
            k.space,
            file_object,
            "_FILE_OBJECT",
            {"Type": 5, "Size": k.symbols.size("_FILE_OBJECT")},
            optional=True,
        )
        control_area = k.pool_object("_CONTROL_AREA", b"MmCa")
        # _EX_FAST_REF keeps a reference count in the low 4 bits of the pointer.
        w.put(k.space, control_area, "_CONTROL_AREA", {"FilePointer.Value": file_object | 0x3})
        self._control_areas[key] = control_area
        return control_area


def write_vad_tree(kernel: Kernel, mapper: ModuleMapper, proc: ProcessLayout) -> int:
    """A balanced _RTL_AVL_TREE of _MMVAD/_MMVAD_SHORT nodes; returns the root node."""
    k, w, sym = kernel, kernel.writer, kernel.symbols
    vads = sorted(proc.vads, key=lambda v: v.start)
    nodes = []
    for vad in vads:
        if vad.module is not None:
            node = k.pool_object("_MMVAD", b"Vad ")
            subsection = k.pool_object("_SUBSECTION", b"MmSb")
            w.put(
                k.space, subsection, "_SUBSECTION", {"ControlArea": mapper.control_area(vad.module)}
            )
            w.put(k.space, node, "_MMVAD", {"Subsection": subsection})
            flags = {
                "u.VadFlags.VadType": VAD_IMAGE_MAP,
                "u.VadFlags.Protection": MM_EXECUTE_WRITECOPY,
                "u.VadFlags.PrivateMemory": 0,
            }
        else:
            node = k.pool_object("_MMVAD_SHORT", b"VadS")
            flags = {
                "u.VadFlags.VadType": 0,
                "u.VadFlags.Protection": vad.protection,
                "u.VadFlags.PrivateMemory": 1,
            }
        start_vpn, end_vpn = vad.start >> 12, vad.end >> 12
        w.put(
            k.space,
            node,
            "_MMVAD_SHORT",
            {
                "StartingVpn": start_vpn & 0xFFFFFFFF,
                "StartingVpnHigh": start_vpn >> 32,
                "EndingVpn": end_vpn & 0xFFFFFFFF,
                "EndingVpnHigh": end_vpn >> 32,
                **flags,
            },
        )
        nodes.append(node)
    proc.vad_nodes = nodes
    vad_node = sym.offset("_MMVAD_SHORT", "VadNode")

    def link(lo: int, hi: int, parent: int) -> int:
        if lo > hi:
            return 0
        mid = (lo + hi) // 2
        node = nodes[mid]
        left = link(lo, mid - 1, node)
        right = link(mid + 1, hi, node)
        w.put(
            k.space,
            node + vad_node,
            "_RTL_BALANCED_NODE",
            {"Left": left, "Right": right, "ParentValue": parent},
        )
        return node

    return link(0, len(nodes) - 1, 0)


def _utf16_size(text: str) -> int:
    """Bytes of ``text`` as a NUL-terminated UTF-16 string (unpaired surrogates allowed)."""
    return len(text.encode("utf-16-le", "surrogatepass")) + 2


def write_loader_data(kernel: Kernel, proc: ProcessLayout) -> int:
    """PEB_LDR_DATA with the three module lists; the EXE is not in initialization order."""
    w, sym, space = kernel.writer, kernel.symbols, proc.space
    ldr = proc.heap(sym.size("_PEB_LDR_DATA"))
    w.put(
        space,
        ldr,
        "_PEB_LDR_DATA",
        {"Length": sym.size("_PEB_LDR_DATA"), "Initialized": 1},
        optional=True,
    )
    lists = {"InLoadOrderLinks": [], "InMemoryOrderLinks": [], "InInitializationOrderLinks": []}
    for index, module in enumerate([proc.exe, *proc.modules]):
        entry = proc.heap(sym.size("_LDR_DATA_TABLE_ENTRY"))
        full = proc.heap(_utf16_size(f"C:{module.path}"))
        base_name = proc.heap(_utf16_size(module.name))
        w.unicode_string(
            space,
            entry + sym.offset("_LDR_DATA_TABLE_ENTRY", "FullDllName"),
            full,
            f"C:{module.path}",
        )
        w.unicode_string(
            space,
            entry + sym.offset("_LDR_DATA_TABLE_ENTRY", "BaseDllName"),
            base_name,
            module.name,
        )
        w.put(
            space,
            entry,
            "_LDR_DATA_TABLE_ENTRY",
            {
                "DllBase": module.base,
                "SizeOfImage": module.size,
                "EntryPoint": module.base + 0x1000,
                "LoadCount": 0xFFFF,
                "ObsoleteLoadCount": 0xFFFF,
                "LoadTime.QuadPart": FILETIME_2024,
            },
            optional=True,
        )
        for list_name in lists:
            if list_name == "InInitializationOrderLinks" and index == 0:
                continue
            lists[list_name].append(entry + sym.offset("_LDR_DATA_TABLE_ENTRY", list_name))
    heads = {
        "InLoadOrderLinks": "InLoadOrderModuleList",
        "InMemoryOrderLinks": "InMemoryOrderModuleList",
        "InInitializationOrderLinks": "InInitializationOrderModuleList",
    }
    for list_name, head in heads.items():
        w.list_ring(space, ldr + sym.offset("_PEB_LDR_DATA", head), lists[list_name])
    return ldr
