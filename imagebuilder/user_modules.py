"""The user-mode PE images the builder maps: ntdll, win32u, user32 and plain DLLs/EXEs.

Each image is built once per scenario and mapped at one base in every process, as Windows
maps a DLL at one address per boot.  What the truth file needs (export addresses, the
dispatcher, the callback handlers) is recorded here, where the bytes are laid out.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from imagebuilder.pe_image import PeImage, new_image, set_image_base

NTDLL_SYSCALLS = (
    "NtWaitForSingleObject",
    "NtWaitForMultipleObjects",
    "NtDelayExecution",
    "NtRemoveIoCompletion",
    "NtReadFile",
    "NtCallbackReturn",
    "NtWaitForAlertByThreadId",
    "NtQueryInformationThread",
)
WIN32U_SYSCALLS = (
    "NtUserGetMessage",
    "NtUserDispatchMessage",
    "NtUserMessageCall",
    "NtUserPeekMessage",
    "NtUserWaitMessage",
    "NtUserCallHwndLock",
    "NtUserSetWindowPos",
    "NtUserCreateWindowEx",
    "NtUserShowWindow",
    "NtGdiBitBlt",
)
USER32_EXPORTS = (
    "GetMessageW",
    "DispatchMessageW",
    "PeekMessageW",
    "SendMessageW",
    "CreateWindowExW",
    "DefWindowProcW",
    "CallWindowProcW",
    "ShowWindow",
)

STUB_SPACING = 0x20
SYSCALL_RETURN = 0x14  # Rip after `syscall` in mov r10,rcx/mov eax/test/jne/syscall
_CALL_TABLE_OFFSET = 0x1F  # return address of `call [r8+r9*8]` inside the dispatcher

# Bases are per boot, the same in every process (ASLR randomises per boot, not per process).
MODULE_BASES = {
    "ntdll.dll": 0x7FFB_A1C0_0000,
    "win32u.dll": 0x7FFB_A0E0_0000,
    "user32.dll": 0x7FFB_9F60_0000,
    "kernel32.dll": 0x7FFB_9E80_0000,
}
OTHER_DLL_BASE = 0x7FFB_4000_0000
EXE_BASE = 0x7FF6_1234_0000


@dataclass
class ModuleImage:
    name: str
    path: str
    base: int
    data: bytes
    exports: dict[str, int]  # name -> RVA
    export_dir: tuple[int, int] = (0, 0)  # RVA, size
    data_section: tuple[int, int] = (0, 0)  # RVA, size: pages a process gets its own copy of
    extras: dict[str, int] = field(default_factory=dict)
    export_layout: dict[str, Any] = field(default_factory=dict)  # PeImage.export_layout
    pdata: tuple[int, int] = (0, 0)  # RVA, size of the exception directory

    @property
    def size(self) -> int:
        return len(self.data)

    def address(self, export: str) -> int:
        return self.base + self.exports[export]

    def contains(self, address: int) -> bool:
        return self.base <= address < self.base + self.size


def syscall_stub(number: int) -> bytes:
    """x64 system-call stub as ntdll and win32u carry it."""
    return (
        b"\x4c\x8b\xd1"  # mov r10, rcx
        + b"\xb8"
        + struct.pack("<I", number)  # mov eax, N
        + b"\xf6\x04\x25\x08\x03\xfe\x7f\x01"  # test byte ptr [7FFE0308h], 1
        + b"\x75\x03"  # jne +3 (int 2Eh path)
        + b"\x0f\x05"  # syscall
        + b"\xc3"  # ret
        + b"\xcd\x2e"  # int 2Eh
        + b"\xc3"
    )  # ret


def _dispatcher_code() -> bytes:
    # KiUserCallbackDispatcher: reads Buffer/Length/ApiNumber from the UCALLOUT_FRAME at
    # [rsp+20h..2Ch] and calls PEB->KernelCallbackTable[ApiNumber] (ReactOS dispatch.S).
    code = (
        b"\x48\x8b\x4c\x24\x20"  # mov rcx, [rsp+20h]   Buffer
        b"\x8b\x54\x24\x28"  # mov edx, [rsp+28h]       Length
        b"\x44\x8b\x4c\x24\x2c"  # mov r9d, [rsp+2Ch]   ApiNumber
        b"\x65\x48\x8b\x04\x25\x60\x00\x00\x00"  # mov rax, gs:[60h]  PEB
        b"\x4c\x8b\x40\x58"  # mov r8, [rax+58h]        KernelCallbackTable
        b"\x43\xff\x14\xc8"  # call [r8+r9*8]
        b"\x33\xc9\x33\xd2\x8b\xc8"  # xor ecx,ecx; xor edx,edx; mov ecx,eax
        b"\xcc"
    )
    assert code.index(b"\x33\xc9") == _CALL_TABLE_OFFSET
    return code


def _unwind_push_machframe() -> bytes:
    # UNWIND_INFO v1: two codes, in reverse prolog order: UWOP_ALLOC_SMALL (op 2, 0x30
    # bytes: info (0x30-8)/8) then UWOP_PUSH_MACHFRAME (op 10, no error code), so an
    # unwinder lands on the MACHINE_FRAME at UCALLOUT_FRAME+0x30.
    return bytes([0x01, 0x00, 0x02, 0x00, 0x00, (5 << 4) | 2, 0x00, (0 << 4) | 10])


# An extra name at NtCallbackReturn's address that sorts before it (damage "decoy_alias": two
# exports claiming the callback-return stub).
DECOY_EXPORT = "KiCallbackReturnDecoy"


def _mapped(img: PeImage, path: str, base: int, **facts: Any) -> ModuleImage:
    """The built image as it is mapped at ``base``, with its export facts."""
    return ModuleImage(
        img.name,
        path,
        base,
        set_image_base(bytes(img), base),
        img.exports,
        export_dir=(img.export_rva, img.export_size),
        export_layout=img.export_layout,
        **facts,
    )


def build_ntdll(zw_alias: bool, decoy: bool = False) -> ModuleImage:
    img = new_image(
        "ntdll.dll",
        0x30000,
        [
            (".text", 0x1000, "code"),
            (".rdata", 0x10000, "rdata"),
            (".pdata", 0x14000, "rdata"),
            (".data", 0x18000, "data"),
        ],
    )
    exports: dict[str, int] = {}
    rva = 0x1000
    for number, name in enumerate(NTDLL_SYSCALLS):
        img.put(".text", rva, syscall_stub(number + 1).ljust(STUB_SPACING, b"\xcc"))
        exports[name] = rva
        alias = "Zw" + name[2:]
        if zw_alias or alias != "ZwCallbackReturn":
            exports[alias] = rva
        rva += STUB_SPACING
    dispatcher = 0x2000
    code = _dispatcher_code()
    img.put(".text", dispatcher, code)
    exports["KiUserCallbackDispatcher"] = dispatcher
    unwind = 0x14800
    img.put(".pdata", unwind, _unwind_push_machframe())
    img.pdata.append((dispatcher, dispatcher + len(code), unwind))
    for i, name in enumerate(
        ("RtlUserThreadStart", "LdrInitializeThunk", "KiUserApcDispatcher", "RtlAllocateHeap")
    ):
        start = 0x3000 + 0x200 * i
        img.put(".text", start, b"\x48\x83\xec\x28\xcc".ljust(0x40, b"\xcc"))
        exports[name] = start
    if decoy:
        exports[DECOY_EXPORT] = exports["NtCallbackReturn"]
    img.exports = exports
    img.build_exports(".rdata", 0x10000)
    img.build_pdata(".pdata", 0x14000)
    return _mapped(
        img,
        r"\Windows\System32\ntdll.dll",
        MODULE_BASES["ntdll.dll"],
        extras={"dispatcher": dispatcher, "dispatcher_return": dispatcher + _CALL_TABLE_OFFSET},
        pdata=(img.pdata_rva, 12 * len(img.pdata)),
    )


def build_win32u() -> ModuleImage:
    img = new_image("win32u.dll", 0x10000, [(".text", 0x1000, "code"), (".rdata", 0x8000, "rdata")])
    exports = {}
    for number, name in enumerate(WIN32U_SYSCALLS):
        rva = 0x1000 + STUB_SPACING * number
        img.put(".text", rva, syscall_stub(0x1000 + number).ljust(STUB_SPACING, b"\xcc"))
        exports[name] = rva
    img.exports = exports
    img.build_exports(".rdata", 0x8000)
    return _mapped(img, r"\Windows\System32\win32u.dll", MODULE_BASES["win32u.dll"])


HANDLERS_RVA = 0x8000
HANDLER_SPACING = 0x40
CALLBACK_TABLE_RVA = 0x30000


def build_user32(table_size: int) -> ModuleImage:
    """user32 with exported entry points and unexported __fn* callback handlers.

    The handlers sit far (more than 0x100 bytes) from any export, as user32's __fn*
    routines are internal functions: a symbolizer shows them as user32.dll+RVA.
    """
    size = CALLBACK_TABLE_RVA + 0x1000 + ((table_size * 8 + 0xFFF) & ~0xFFF)
    img = new_image(
        "user32.dll",
        size,
        [
            (".text", 0x1000, "code"),
            (".rdata", 0x28000, "rdata"),
            (".data", CALLBACK_TABLE_RVA, "data"),
        ],
    )
    exports = {}
    for i, name in enumerate(USER32_EXPORTS):
        rva = 0x1000 + 0x80 * i
        img.put(".text", rva, b"\x48\x83\xec\x28\xcc")
        exports[name] = rva
    base = MODULE_BASES["user32.dll"]
    table = bytearray()
    for api in range(table_size):
        rva = HANDLERS_RVA + HANDLER_SPACING * api
        img.put(".text", rva, b"\x48\x83\xec\x48\xcc")
        table += struct.pack("<Q", base + rva)
    img.put(".data", CALLBACK_TABLE_RVA, bytes(table))
    img.exports = exports
    img.build_exports(".rdata", 0x28000)
    return _mapped(
        img,
        r"\Windows\System32\user32.dll",
        base,
        data_section=(CALLBACK_TABLE_RVA, len(table)),
        extras={"callback_table": CALLBACK_TABLE_RVA},
    )


def build_plain(name: str, base: int, path: str, dll: bool = True) -> ModuleImage:
    """A module with a few exports: kernel32, an EXE, or a foreign DLL of a scenario."""
    img = new_image(name, 0x8000, [(".text", 0x1000, "code"), (".rdata", 0x4000, "rdata")])
    img.dll = dll
    # Export names stay plain identifiers whatever the module is called (a scenario may give a
    # module control characters or unpaired surrogates to test the plugin's escaping).
    stem = "".join(c for c in name.rsplit(".", 1)[0] if c.isascii() and (c.isalnum() or c == "_"))
    stem = stem or "Module"
    exports = {}
    for i, suffix in enumerate(("Init", "Run", "Stop")):
        rva = 0x1000 + 0x80 * i
        img.put(".text", rva, b"\x48\x83\xec\x28\xcc")
        exports[f"{stem}{suffix}"] = rva
    # Code far from the exports, where a hijacked callback table entry can point.
    img.put(".text", 0x2000, b"\x48\x83\xec\x48\xcc")
    img.exports = exports
    img.build_exports(".rdata", 0x4000)
    return _mapped(img, path, base, extras={"payload": 0x2000})
