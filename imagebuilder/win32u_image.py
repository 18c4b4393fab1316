"""The builder's win32u.dll (../shared/docs/real-binaries.md): 1317 named NtUser*/NtGdi*
system-call stubs of ntdll's stub shape, numbered from 0x1000 (NtUserGetMessage = 0x1006 as in
19041), 0x20 apart, one RUNTIME_FUNCTION per stub."""

from __future__ import annotations

from imagebuilder import export_names
from imagebuilder.image_plan import IMAGE_DIRECTORY_ENTRY_RESOURCE, ImagePlan
from imagebuilder.module_image import ModuleImage, mapped, plan_facts
from imagebuilder.unwind_info import LEAF_STUB_UNWIND
from imagebuilder.x64_code import STUB_CODE_SIZE, STUB_SIZE, syscall_stub

WIN32U_BASE = 0x7FFB_A0E0_0000
WIN32U_PATH = r"\Windows\System32\win32u.dll"
FIRST_WIN32K_SYSCALL = 0x1000
# The system calls a scenario may name (scenario.py and generate.py use them).
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


def build_win32u() -> ModuleImage:
    plan = ImagePlan("win32u.dll", WIN32U_BASE)
    names = export_names.win32u_syscalls(export_names.WIN32U_NAMED_EXPORTS)
    plan.section(".text", "code")
    for number, name in enumerate(names, start=FIRST_WIN32K_SYSCALL):
        rva = plan.place((syscall_stub(number),), name, STUB_SIZE)
        plan.runtime_function(rva, rva + STUB_CODE_SIZE, LEAF_STUB_UNWIND)
        plan.exports[name] = name
    plan.section(".rdata", "rdata")
    plan.unwind_infos()
    plan.export_directory()
    plan.debug_directory("win32u.pdb")
    plan.section(".data", "data")
    plan.reserve(0x100, "data")
    plan.section(".pdata", "rdata")
    plan.exception_directory()
    plan.section(".rsrc", "rdata")
    rsrc = plan.reserve(16, "resource directory")
    plan.directories[IMAGE_DIRECTORY_ENTRY_RESOURCE] = (rsrc, 16)
    img = plan.link()
    return mapped(
        img, WIN32U_PATH, WIN32U_BASE, notable=frozenset(WIN32U_SYSCALLS), **plan_facts(plan)
    )
