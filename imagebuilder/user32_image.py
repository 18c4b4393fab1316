"""The builder's user32.dll, shaped like Microsoft's (../shared/docs/real-binaries.md).

- Sections .text .rdata .data .pdata .didat .rsrc .reloc; 985 named exports, none of them a
  callback handler.
- The callback table (``apfnDispatch``, what PEB.KernelCallbackTable points at) is a run of
  relocated pointers into .text, in the read-only .rdata; several ApiNumbers share a routine
  (143 entries, 120 distinct routines in 19041: the same ratio here).
- Each handler is an ordinary routine (prologue 4, UWOP_ALLOC_SMALL) at a RUNTIME_FUNCTION that
  ends by calling NtCallbackReturn through user32's import address table; a few are leaf
  routines without one that tail-jump there.  The handlers sit together, among internal
  routines, as the compiler emits one source file's functions, so most are far from an export.
- user32 imports NtCallbackReturn (and a few others) from ntdll by name, and NtUser* calls from
  win32u, through a real import directory.
"""

from __future__ import annotations

import random

from imagebuilder import export_names, pdb_names, stack_functions
from imagebuilder.image_plan import IMAGE_DIRECTORY_ENTRY_RESOURCE, ImagePlan, import_directory
from imagebuilder.module_image import ModuleImage, mapped, plan_facts
from imagebuilder.pe_image import PAGE
from imagebuilder.unwind_info import push_nonvol
from imagebuilder.x64_code import (
    CHAINED_HANDLER_FRAME,
    RBX,
    Abs64,
    Routine,
    callback_handler,
    chained_callback_handler,
    ordinary_routine,
)

USER32_BASE = 0x7FFB_9F60_0000
USER32_PATH = r"\Windows\System32\user32.dll"
REAL_TABLE_ENTRIES, REAL_DISTINCT_HANDLERS = 143, 120  # 19041.572's run
_NTDLL_IMPORTS = (
    "NtCallbackReturn",
    "RtlAllocateHeap",
    "RtlFreeHeap",
    "RtlEnterCriticalSection",
    "RtlLeaveCriticalSection",
    "RtlInitUnicodeString",
)
_WIN32U_IMPORTS = (
    "NtUserGetMessage",
    "NtUserPeekMessage",
    "NtUserDispatchMessage",
    "NtUserMessageCall",
    "NtUserCreateWindowEx",
    "NtUserShowWindow",
    "NtUserSetWindowPos",
    "NtUserCallHwndLock",
)
_INTERNAL_ROUTINES = 700


def handler_routines(table_size: int, rng: random.Random) -> list[int]:
    """For each ApiNumber, the index of its routine: every routine serves at least one entry
    and the share of distinct routines is 19041's."""
    share = REAL_DISTINCT_HANDLERS / REAL_TABLE_ENTRIES
    distinct = max(1, min(table_size, round(table_size * share)))
    routine_of = list(range(distinct))
    routine_of += [rng.randrange(distinct) for _ in range(table_size - distinct)]
    rng.shuffle(routine_of)
    return routine_of


def build_user32(table_size: int, ntdll: ModuleImage, win32u: ModuleImage) -> ModuleImage:
    rng = random.Random(0x5532)
    plan = ImagePlan("user32.dll", USER32_BASE)
    exported = export_names.user32_routines(export_names.USER32_NAMED_EXPORTS)
    # Labels are the names user32's PDB gives these routines (pdb_names.py).
    internal = pdb_names.user32_internal_names(_INTERNAL_ROUTINES)
    routine_of = handler_routines(table_size, rng)
    handlers = pdb_names.callback_names(routine_of)
    # Everything but the handler block in a fixed shuffled order; the block goes in the middle.
    others = exported + internal[: _INTERNAL_ROUTINES // 2]
    rng.shuffle(others)
    helpers = internal[_INTERNAL_ROUTINES // 2 :]
    callees = tuple(internal[:64])

    slot = "__imp_NtCallbackReturn"
    plan.section(".text", "code")
    for name in others[: len(others) // 2]:
        plan.routine(name, ordinary_routine(rng, callees))
    # The routines user stacks run through (stack_functions.py): dispatch routines of every
    # unwind shape, and the routine that makes the system call through the win32u import.
    for function in stack_functions.user32_functions(f"__imp_{_WIN32U_IMPORTS[3]}"):
        plan.stack_function(function)
    sites = tuple(stack_functions.handler_sites())
    handler_calls: dict[str, dict[str, int]] = {}
    after_return: dict[str, int] = {}
    order = list(handlers)
    rng.shuffle(order)
    for label in order:
        if helpers and rng.random() < 0.4:
            plan.routine(helpers.pop(), ordinary_routine(rng, callees))
        if label == pdb_names.CHAINED_HANDLER:
            after_return[label] = _chained_handler(plan, label, slot)
            continue
        handler = callback_handler(rng, slot, callees, sites)
        rva = plan.routine(label, handler.routine)
        if handler.after_return_call is not None:
            after_return[label] = rva + handler.after_return_call
        if handler.site_returns:
            handler_calls[label] = {c: rva + o for c, o in handler.site_returns.items()}
    for name in helpers + others[len(others) // 2 :]:
        plan.routine(name, ordinary_routine(rng, callees))

    plan.section(".rdata", "rdata")
    import_directory(
        plan,
        {
            "ntdll.dll": {n: ntdll.address(n) for n in _NTDLL_IMPORTS},
            "win32u.dll": {n: win32u.address(n) for n in _WIN32U_IMPORTS},
        },
    )
    plan.unwind_infos()
    table = plan.place(
        tuple(Abs64(handlers[routine_of[api]]) for api in range(table_size)), "apfnDispatch", PAGE
    )
    plan.public_data.add("apfnDispatch")
    plan.align(PAGE)  # a process that rewrites the table gets private copies of these pages
    for name in exported:
        plan.exports[name] = name
    plan.export_directory()
    plan.debug_directory("user32.pdb")
    plan.section(".data", "data")
    plan.reserve(0x400, "data")
    plan.section(".pdata", "rdata")
    plan.exception_directory()
    plan.section(".didat", "data")
    plan.reserve(0x100, "delay-load import address table")
    plan.section(".rsrc", "rdata")
    rsrc = plan.reserve(16, "resource directory")
    plan.directories[IMAGE_DIRECTORY_ENTRY_RESOURCE] = (rsrc, 16)
    plan.section(".reloc", "rdata")
    plan.base_relocations()
    img = plan.link()
    return mapped(
        img,
        USER32_PATH,
        USER32_BASE,
        data_section=(table, 8 * table_size),
        extras={"callback_table": table},
        handler_returns={plan.labels[label]: rva for label, rva in after_return.items()},
        handler_calls={plan.labels[label]: calls for label, calls in handler_calls.items()},
        notable=frozenset(export_names.USER32_ROUTINES),
        **plan_facts(plan),
    )


def _chained_handler(plan: ImagePlan, label: str, slot: str) -> int:
    """The handler with a secondary RUNTIME_FUNCTION right after its primary one (chained to
    it); returns the RVA after its NtCallbackReturn call."""
    handler = chained_callback_handler(slot)
    rva = plan.routine(label, Routine(handler.primary, CHAINED_HANDLER_FRAME))
    plan.chained_part(
        f"{label}#secondary", handler.secondary, label, prologue=1, codes=(push_nonvol(1, RBX),)
    )
    return rva + handler.after_return_call
