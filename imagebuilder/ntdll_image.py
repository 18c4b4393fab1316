"""The builder's ntdll.dll, shaped like Microsoft's (../shared/docs/real-binaries.md).

- ``KiUserCallbackDispatcher`` with the real code, offsets (+0x1F call the CFG thunk, +0x24 the
  handler's return address, +0x2B call NtCallbackReturn, +0x30 after it) and length 0x3B; its
  RUNTIME_FUNCTION covers it, UNWIND_INFO v1 with EHANDLER|UHANDLER, prologue 0 and the codes
  UWOP_ALLOC_SMALL 0x30, UWOP_PUSH_MACHFRAME (the order an unwinder applies them).
- The non-exported CFG dispatch thunk 0x160 bytes below it, with its own RUNTIME_FUNCTION.
- Every system call as the real stub, 0x20 apart in system-call-number order, each with a
  RUNTIME_FUNCTION; NtCallbackReturn is number 5 and ZwCallbackReturn names the same stub.
- 2429 named exports (19041.572's count): Nt*/Zw* stubs and Rtl*/Ldr*/... routines, each a
  real little routine; no KiUserCallbackDispatcherContinue.
"""

from __future__ import annotations

import random

from imagebuilder import export_names, stack_functions
from imagebuilder.image_plan import IMAGE_DIRECTORY_ENTRY_RESOURCE, ImagePlan
from imagebuilder.module_image import ModuleImage, mapped, plan_facts
from imagebuilder.pdb_names import SPLIT_NTDLL_ROUTINE
from imagebuilder.unwind_info import (
    LEAF_STUB_UNWIND,
    UNW_FLAG_EHANDLER,
    UNW_FLAG_UHANDLER,
    alloc_small,
    push_machframe,
    unwind_info,
)
from imagebuilder.x64_code import (
    CFG_THUNK_FRAME,
    DISPATCHER_AFTER_RETURN,
    DISPATCHER_HANDLER_RETURN,
    DISPATCHER_SIZE,
    DISPATCHER_THUNK_DISTANCE,
    STUB_CODE_SIZE,
    STUB_SIZE,
    Abs64,
    Routine,
    cfg_check,
    cfg_dispatch_thunk,
    dispatcher_code,
    language_handler,
    ordinary_routine,
    split_routine,
    syscall_stub,
)

NTDLL_BASE = 0x7FFB_A1C0_0000
NTDLL_PATH = r"\Windows\System32\ntdll.dll"
# The system calls a scenario may name (scenario.py checks them; they are ntdll exports).
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
SYSCALL_COUNT = 0x1C8  # system calls of 19041's ntdll, near enough
# An extra name at NtCallbackReturn's address that sorts before it (damage "decoy_alias": two
# exports claiming the callback-return stub).
DECOY_EXPORT = "KiCallbackReturnDecoy"
UCALLOUT_ALLOCATION = 0x30  # the UCALLOUT_FRAME's part below its MACHINE_FRAME
_THUNK = "LdrpDispatchUserCallTarget"
_CHECK = "LdrpValidateUserCallTarget"
_CHECK_SLOT = "__guard_check_icall_fptr"
_BITMAP_SLOT = "LdrpCfgBitmap"
_HANDLER = "KiUserCallbackDispatcherHandler"
_COMMON_CALLEES = ("RtlAllocateHeap", "RtlFreeHeap", "RtlEnterCriticalSection", "memset")
# Exported routines placed between the CFG thunk and the dispatcher, as in the real layout.
_NEAR_DISPATCHER = ("KiUserApcDispatcher", "KiUserExceptionDispatcher")


def dispatcher_unwind() -> tuple:
    """KiUserCallbackDispatcher's UNWIND_INFO (real-binaries.md): the unwinder first drops the
    0x30 bytes of UCALLOUT_FRAME below the machine frame, then pops the MACHINE_FRAME."""
    return unwind_info(
        0,
        [alloc_small(0, UCALLOUT_ALLOCATION), push_machframe(0)],
        UNW_FLAG_EHANDLER | UNW_FLAG_UHANDLER,
        _HANDLER,
    )


def build_ntdll(zw_alias: bool, decoy: bool = False) -> ModuleImage:
    rng = random.Random(0x7D11)
    plan = ImagePlan("ntdll.dll", NTDLL_BASE)
    syscalls = export_names.ntdll_syscalls(SYSCALL_COUNT)
    taken = set(syscalls) | {"Zw" + n[2:] for n in syscalls}
    routines = export_names.ntdll_routines(
        export_names.NTDLL_NAMED_EXPORTS - 2 * len(syscalls), taken
    )
    special = {"KiUserCallbackDispatcher", *_NEAR_DISPATCHER}
    filler = [n for n in routines if n not in special]
    half = len(filler) // 2
    callees = _COMMON_CALLEES

    plan.section(".text", "code")
    cold = f"{SPLIT_NTDLL_ROUTINE}#cold"
    split = split_routine(rng, cold)
    for name in filler[:half]:
        if name == SPLIT_NTDLL_ROUTINE:
            plan.routine(name, Routine(split.hot, split.frame))
        elif name == stack_functions.THREAD_START:
            ordinary_routine(rng, callees)  # keeps the generator's sequence
            (function,) = stack_functions.ntdll_functions(_CHECK_SLOT)
            plan.stack_function(function)
        else:
            plan.routine(name, ordinary_routine(rng, callees))
    # The system-call stubs, one after the other in number order.
    plan.align(STUB_SIZE)
    for number, name in enumerate(syscalls):
        rva = plan.place((syscall_stub(number),), name)
        plan.runtime_function(rva, rva + STUB_CODE_SIZE, LEAF_STUB_UNWIND)
    plan.routine(_CHECK, Routine(cfg_check(_BITMAP_SLOT), None))
    thunk = plan.routine(_THUNK, Routine(cfg_dispatch_thunk(_CHECK_SLOT), CFG_THUNK_FRAME))
    for name in _NEAR_DISPATCHER:
        plan.routine(name, ordinary_routine(rng, callees))
    plan.pad_to(thunk + DISPATCHER_THUNK_DISTANCE)
    dispatcher = plan.place(
        dispatcher_code(_THUNK, "NtCallbackReturn", "RtlRaiseStatus"), "KiUserCallbackDispatcher"
    )
    plan.runtime_function(
        dispatcher,
        dispatcher + DISPATCHER_SIZE,
        dispatcher_unwind(),
        ops=(("alloc", UCALLOUT_ALLOCATION), ("machframe", 0)),
    )
    plan.routine(_HANDLER, Routine(language_handler(), None))
    for name in filler[half:]:
        if name == stack_functions.THREAD_START:
            ordinary_routine(rng, callees)  # keeps the generator's sequence
            (function,) = stack_functions.ntdll_functions(_CHECK_SLOT)
            plan.stack_function(function)
        else:
            plan.routine(name, ordinary_routine(rng, callees))
    # The split routine's cold fragment, far from its hot part, as the compiler separates
    # rarely run code: a RUNTIME_FUNCTION of its own, chained to the hot part's.
    plan.chained_part(cold, split.cold, SPLIT_NTDLL_ROUTINE, alignment=16)

    plan.section(".rdata", "rdata")
    plan.unwind_infos()
    for name in routines:
        plan.exports[name] = name
    for name in syscalls:
        plan.exports[name] = name
        if zw_alias or name != "NtCallbackReturn":
            plan.exports["Zw" + name[2:]] = name
    if decoy:
        plan.exports[DECOY_EXPORT] = "NtCallbackReturn"
    plan.export_directory()
    plan.debug_directory("ntdll.pdb")
    plan.section(".data", "data")
    plan.reserve(0x200, "data")
    plan.section(".pdata", "rdata")
    plan.exception_directory()
    plan.section(".mrdata", "data")
    plan.place((Abs64(_CHECK),), _CHECK_SLOT, 8)  # __guard_check_icall_fptr -> the check
    plan.reserve(8, _BITMAP_SLOT)  # the loader stores the CFG bitmap's address here
    plan.public_data.update((_CHECK_SLOT, _BITMAP_SLOT))
    _resource_and_relocations(plan)
    img = plan.link()
    notable = {*NTDLL_SYSCALLS, "ZwCallbackReturn", DECOY_EXPORT, *export_names.NTDLL_ROUTINES}
    return mapped(
        img,
        NTDLL_PATH,
        NTDLL_BASE,
        extras={
            "dispatcher": dispatcher,
            "dispatcher_end": dispatcher + DISPATCHER_SIZE,
            # The handler's return address: the slot just below the UCALLOUT_FRAME.
            "dispatcher_return": dispatcher + DISPATCHER_HANDLER_RETURN,
            # [Rsp] of a thread resting in NtCallbackReturn called by the dispatcher.
            "dispatcher_callback_return": dispatcher + DISPATCHER_AFTER_RETURN,
            "cfg_thunk": thunk,
            "split_cold": plan.labels[cold],
        },
        notable=frozenset(n for n in notable if n in img.exports),
        **plan_facts(plan),
    )


def _resource_and_relocations(plan: ImagePlan) -> None:
    """.rsrc with an empty IMAGE_RESOURCE_DIRECTORY, and .reloc for the pointers placed."""
    plan.section(".rsrc", "rdata")
    rsrc = plan.reserve(16, "resource directory")
    plan.directories[IMAGE_DIRECTORY_ENTRY_RESOURCE] = (rsrc, 16)
    plan.section(".reloc", "rdata")
    plan.base_relocations()
