"""The user-mode PE images the builder maps: ntdll, win32u, user32 and plain DLLs/EXEs.

Each image is built once per scenario and mapped at one base in every process, as Windows
maps a DLL at one address per boot.  What the truth file needs (export addresses, the
dispatcher, the callback handlers) is recorded where the bytes are laid out: ntdll_image.py,
win32u_image.py and user32_image.py shape those three like Microsoft's own
(../shared/docs/real-binaries.md); this module keeps the plain modules and the shared names.
"""

from __future__ import annotations

from imagebuilder import stack_functions
from imagebuilder.codeview import (
    DEBUG_DIRECTORY_SIZE,
    debug_directory_entry,
    pdb_path_for,
    rsds_record,
)
from imagebuilder.function_table import FunctionTable
from imagebuilder.image_plan import IMAGE_DIRECTORY_ENTRY_DEBUG
from imagebuilder.module_image import ModuleImage, mapped
from imagebuilder.ntdll_image import DECOY_EXPORT, NTDLL_BASE, NTDLL_SYSCALLS, build_ntdll
from imagebuilder.pe_image import new_image
from imagebuilder.unwind_info import ops_of, unwind_info
from imagebuilder.user32_image import USER32_BASE, build_user32
from imagebuilder.win32u_image import WIN32U_BASE, WIN32U_SYSCALLS, build_win32u
from imagebuilder.x64_code import STUB_SIZE, SYSCALL_RETURN, code_size

__all__ = [
    "DECOY_EXPORT",
    "EXE_BASE",
    "MODULE_BASES",
    "NTDLL_SYSCALLS",
    "OTHER_DLL_BASE",
    "STUB_SPACING",
    "SYSCALL_RETURN",
    "WIN32U_SYSCALLS",
    "ModuleImage",
    "build_ntdll",
    "build_plain",
    "build_user32",
    "build_win32u",
]

STUB_SPACING = STUB_SIZE

# Bases are per boot, the same in every process (ASLR randomises per boot, not per process).
MODULE_BASES = {
    "ntdll.dll": NTDLL_BASE,
    "win32u.dll": WIN32U_BASE,
    "user32.dll": USER32_BASE,
    "kernel32.dll": 0x7FFB_9E80_0000,
}
OTHER_DLL_BASE = 0x7FFB_4000_0000
EXE_BASE = 0x7FF6_1234_0000
PAYLOAD_RVA = 0x2000  # code far from the exports, where a hijacked table entry can point
DISPATCH_HOOK_RVA = 0x2100  # where conditions.hook_dispatcher puts a hooked dispatcher's code
_DEBUG_RVA = 0x6000  # the debug directory and RSDS record: a .rdata page of their own
STACK_CODE_RVA = 0x1200  # stack functions of plain modules (WinMain, BaseThreadInitThunk ...)
_UNWIND_RVA, _PDATA_RVA = 0x5000, 0x5800


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
    img.put(".text", PAYLOAD_RVA, b"\x48\x83\xec\x48\xcc")
    placed = _place_stack_functions(img, name, dll)
    unwind_ops = {rva: ops for rva, (_f, ops, _u) in placed.items()}
    unwind_records = {rva: u for rva, (_f, _ops, u) in placed.items()}
    functions = {f.name: (rva, f) for rva, (f, _ops, _u) in placed.items()}
    exports.update({f.name: rva for f, rva in ((f, r) for r, (f, _o, _u) in placed.items())})
    img.exports = exports
    img.build_exports(".rdata", 0x4000)
    record = rsds_record("0" * 32, 1, pdb_path_for(name, stem, dll))
    img.put(
        ".rdata",
        _DEBUG_RVA,
        debug_directory_entry(_DEBUG_RVA + DEBUG_DIRECTORY_SIZE, len(record)) + record,
    )
    img.directories[IMAGE_DIRECTORY_ENTRY_DEBUG] = (_DEBUG_RVA, DEBUG_DIRECTORY_SIZE)
    # No .pdata: every routine here is a leaf to an unwinder.  The PDB also names the code
    # no export does.
    symbols = {**exports, f"{stem}Payload": PAYLOAD_RVA, f"{stem}DispatchHook": DISPATCH_HOOK_RVA}
    return mapped(
        img,
        path,
        base,
        codeview_record=(_DEBUG_RVA + DEBUG_DIRECTORY_SIZE, 1, pdb_path_for(name, stem, dll)),
        extras={"payload": PAYLOAD_RVA},
        pdb_symbols=symbols,
        unwind_ops=unwind_ops,
        unwind_records=unwind_records,
        stack_functions=functions,
        functions=FunctionTable(
            tuple((rva, rva + code_size(f.code), rva) for rva, (f, _o, _u) in placed.items())
        ),
    )


def _place_stack_functions(img, name: str, dll: bool) -> dict[int, tuple]:
    """An EXE's WinMain/WndProc, kernel32's thread thunk and wait routine (stack_functions.py)
    in .text from STACK_CODE_RVA, their UNWIND_INFO and .pdata in .rdata.  Returns RVA ->
    (function, ops, UNWIND_INFO RVA)."""
    if not dll:
        functions = stack_functions.exe_functions()
    elif name.lower() == "kernel32.dll":
        functions = stack_functions.kernel32_functions()
    else:
        return {}
    placed: dict[int, tuple] = {}
    code_rva, info_rva = STACK_CODE_RVA, _UNWIND_RVA
    for function in functions:
        code = b"".join(p for p in function.code if isinstance(p, bytes))
        assert len(code) == code_size(function.code)
        img.put(".text", code_rva, code)
        info = unwind_info(
            function.prologue,
            list(function.codes),
            version=function.version,
            frame_register=function.frame_register,
            frame_offset=function.frame_offset // 16,
        )
        record = b"".join(p for p in info if isinstance(p, bytes))
        img.put(".rdata", info_rva, record)
        ops = ops_of(list(function.codes), function.frame_register, function.frame_offset // 16)
        placed[code_rva] = (function, ops, info_rva)
        img.pdata.append((code_rva, code_rva + len(code), info_rva))
        code_rva = (code_rva + len(code) + 15) & ~15
        info_rva = (info_rva + len(record) + 3) & ~3
    img.build_pdata(".rdata", _PDATA_RVA)
    return placed
