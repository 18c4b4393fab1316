"""One user process of a scenario: address space, modules, PEB, threads, EPROCESS and truth.

Called by build.ImageBuilder, whose per-image state (kernel, module images, ntdll facts, region
map) it shares through ``ImageContext``.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field
from typing import Any

from imagebuilder import call_chains, conditions, damage, executive, stack_truth, truth
from imagebuilder.callback_tables import TableCheck, instrumentation_note, space_reader
from imagebuilder.expectation import (
    HandlerLookup,
    ImageFacts,
    KernelLevel,
    ThreadExpectation,
    UserFrame,
    thread_record,
)
from imagebuilder.kernel_layout import Kernel
from imagebuilder.private_memory import PrivateMemory
from imagebuilder.process_layout import (
    FILETIME_2024,
    HEAP_ADDRESS,
    HEAP_SIZE,
    PEB_ADDRESS,
    STACKS_ADDRESS,
    TEB_STRIDE,
    USER_STACK_RESERVE,
    WOW64_PEB32,
    ModuleMapper,
    ProcessLayout,
    Vad,
    write_loader_data,
    write_vad_tree,
)
from imagebuilder.process_symbols import ModuleSymbols, ProcessSymbols
from imagebuilder.regions import RegionMap
from imagebuilder.scenario import Process, Thread
from imagebuilder.stack_truth import ProcessUnwind, StackShadow
from imagebuilder.table_layout import override_entries, place_table, target_address
from imagebuilder.tables_spec import table_owner
from imagebuilder.thread_layout import StackFacts, lay_out_kernel_thread, lay_out_user_thread
from imagebuilder.user_modules import SYSCALL_RETURN, WIN32U_SYSCALLS, ModuleImage
from imagebuilder.wow64_layout import Wow64Side, lay_out_wow64_side
from imagebuilder.wow64_stack import WOW64_TLS_CPURESERVED, lay_out_wow64_stack, wow64_rows

STATE_WAITING, STATE_TERMINATED = "Waiting", "Terminated"


@dataclass
class ImageContext:
    """What every process of one image shares."""

    kernel: Kernel
    mapper: ModuleMapper
    rng: random.Random
    ntdll: ModuleImage
    win32u: ModuleImage
    user32: ModuleImage
    ntdll_view: ModuleImage  # ntdll with only the exports the plugin can use (symbols)
    facts: ImageFacts
    regions: RegionMap
    dispatcher_return: int
    dispatcher_range: tuple[int, int]
    exe: Any  # name -> ModuleImage
    module: Any  # name -> ModuleImage
    seed: int = 0
    sequence: int = 0
    spaces: list = field(default_factory=list)
    # Modules the scenario has the builder write a PDB symbol table (ISF) for.
    pdb_modules: frozenset[str] = frozenset()
    table_size: int = 128  # entries of the owners' callback tables (scenario)


@dataclass
class BuiltProcess:
    pid: int
    eprocess: int
    ethreads: dict[int, int]  # tid -> ETHREAD
    records: list[dict[str, Any]]
    inventory: dict[str, Any]
    tables: list[dict[str, Any]] = field(default_factory=list)  # windows.kcbtable rows


def build_user_process(ctx: ImageContext, proc: Process) -> BuiltProcess:
    k = ctx.kernel
    space = k.new_process_space()
    ctx.spaces.append(space)
    eproc = k.pool_object("_EPROCESS", b"Proc")
    modules = [ctx.module(name) for name in proc.modules]
    layout = ProcessLayout(
        proc.pid, proc.name, eproc, space, PEB_ADDRESS, modules, ctx.exe(proc.name)
    )
    for module in [layout.exe, *modules]:
        # A table owner's table pages are the process's own (copy-on-write once rewritten).
        ctx.mapper.map(space, module, private_data="callback_table" in module.extras)
        layout.vads.append(Vad(module.base, module.base + module.size - 1, module))
    # Where this process's callback handlers return: into the dispatcher, or into a hook.
    dispatcher_return = ctx.dispatcher_return
    hook = conditions.process_hook(proc.conditions)
    if hook is not None:
        dispatcher_return = conditions.hook_dispatcher(
            k.memory, space, ctx.ntdll, ctx.module(hook), ctx.dispatcher_return
        )
    # Unwind data this process cannot use (damage): .pdata paged out, a corrupt UNWIND_INFO.
    corrupt: set[tuple[str, int]] = set()
    if proc.damage.unwind_data_paged_out is not None:
        module = layout.module_named(proc.damage.unwind_data_paged_out)
        assert module is not None, proc.damage.unwind_data_paged_out
        damage.damage_unwind_data(k.memory, space, module, "unwind_data_paged_out")
    if proc.damage.unwind_info_corrupt is not None:
        name, function = proc.damage.unwind_info_corrupt
        module = layout.module_named(name)
        assert module is not None, name
        begins = damage.damage_unwind_data(k.memory, space, module, "unwind_info_corrupt", function)
        corrupt = {(module.name, b) for b in begins}
    call_sites = set().union(*(call_chains.call_returns(m) for m in [layout.exe, *modules]))
    if dispatcher_return != ctx.dispatcher_return:
        call_sites.add(dispatcher_return)  # the hook's call to the handler
    if "ntdll_exports" in proc.page_out:
        start, size = ctx.ntdll.export_dir
        for page in range(start & ~0xFFF, start + size, 0x1000):
            space.page_out(ctx.ntdll.base + page)
    _page_out_codeview(proc, layout)
    # Loader heap, PEB + TEBs, stacks: private memory.
    layout.vads.append(Vad(HEAP_ADDRESS, HEAP_ADDRESS + HEAP_SIZE - 1))
    teb_region = PEB_ADDRESS + 0x1000 + TEB_STRIDE * len(proc.threads)
    layout.vads.append(Vad(PEB_ADDRESS, teb_region - 1))
    private = PrivateMemory(layout)
    owner_name = table_owner(proc.modules, proc.wow64)
    owner = ctx.module(owner_name) if owner_name else None
    table = 0
    if owner is not None:
        table = place_table(layout, private, k.memory, owner, proc.tables.location, ctx.table_size)
        override_entries(layout, private, table, proc.callback_overrides)
    layout.callback_table = damage.callback_table_value(
        proc.damage.kernel_callback_table, table, space
    )
    instrumentation = 0
    if proc.tables.instrumentation is not None:
        instrumentation = target_address(layout, private, proc.tables.instrumentation)
    ldr = write_loader_data(k, layout)
    k.writer.put(
        space,
        PEB_ADDRESS,
        "_PEB",
        {
            "Ldr": ldr,
            "ImageBaseAddress": layout.exe.base,
            "KernelCallbackTable": layout.callback_table,
            "NumberOfProcessors": 2,
            "OSMajorVersion": 10,
            "OSBuildNumber": k.build & 0xFFFF,
        },
        optional=True,
    )
    wow64, side = 0, None
    if proc.wow64:
        side = lay_out_wow64_side(
            k, ctx.mapper, layout, private, ctx.table_size, proc.tables.overrides32
        )
        wow64 = side.peb32
    all_modules = [layout.exe, *modules]
    read = space_reader(space)
    check = TableCheck(64, layout.callback_table, owner, all_modules, layout.vads, read)
    layout.thread_note = instrumentation_note(check, instrumentation)
    symbol_modules = process_symbols(ctx, space, all_modules)
    unwind = ProcessUnwind(symbol_modules, call_sites, corrupt)
    handler = damage.handler_lookup(space, layout.callback_table)
    ethreads: dict[int, int] = {}
    records, thread_inventory = [], []
    start = ctx.ntdll.address("RtlUserThreadStart")
    for index, thread in enumerate(proc.threads):
        ethread = k.pool_object("_ETHREAD", b"Thre")
        teb = PEB_ADDRESS + 0x1000 + TEB_STRIDE * index
        stack_base = STACKS_ADDRESS + USER_STACK_RESERVE * (index + 1)
        stack_start = k.stack_cursor
        if thread.kind == "user":
            layout.vads.append(Vad(stack_base - USER_STACK_RESERVE, stack_base - 1))
            record, stack, state, wait_reason, exit_time = _user_thread(
                ctx,
                layout,
                proc,
                thread,
                teb,
                stack_base,
                symbol_modules,
                handler,
                dispatcher_return,
                unwind,
                (side, index) if side is not None else None,
            )
        else:
            record, stack, state, wait_reason, exit_time = _kernel_only_thread(
                ctx, layout, proc, thread, teb, symbol_modules
            )
        ctx.regions.add_virtual(
            ("thread", proc.pid, thread.tid), k.space, stack_start, k.stack_cursor - stack_start
        )
        ctx.sequence += 1
        executive.write_ethread(
            k,
            ethread,
            sequence=ctx.sequence,
            eproc=eproc,
            pid=proc.pid,
            tid=thread.tid,
            state=state,
            wait_reason=wait_reason,
            stack=stack,
            teb=teb,
            start=start,
            user=thread.kind == "user",
            exit_time=exit_time,
        )
        executive.record_ethread(ctx.regions, k, ethread, proc.pid, thread.tid)
        ethreads[thread.tid] = ethread
        thread_inventory.append({"tid": thread.tid, "start": start})
        check.annotate(record)
        records.append(record)
    root = write_vad_tree(k, ctx.mapper, layout)
    ordered = [ethreads[t.tid] for t in proc.threads]
    ewow = executive.write_eprocess(
        k,
        eproc,
        pid=proc.pid,
        ppid=proc.ppid,
        name=proc.name,
        dtb=space.pml4,
        peb=PEB_ADDRESS,
        create_time=FILETIME_2024 + 10_000_000 * 30,
        threads=ordered,
        wow64=wow64,
    )
    k.writer.put(k.space, eproc, "_EPROCESS", {"VadRoot.Root": root}, optional=True)
    if instrumentation:
        k.writer.put(k.space, eproc, "_EPROCESS", {"Pcb.InstrumentationCallback": instrumentation})
    executive.record_eprocess(ctx.regions, k, eproc, proc.pid, ewow)
    tables = _kcbtable_rows(proc, layout, check, side, instrumentation)
    _record_process_memory(ctx, proc, layout, check)
    if proc.damage.thread_list is not None:
        damage.redirect_thread_link(k, proc.damage.thread_list, ethreads)
        order = damage.thread_list_order(
            len(records),
            proc.damage.thread_list,
            {t.tid: i for i, t in enumerate(proc.threads)},
        )
        records = [records[i] for i in order]
    return BuiltProcess(
        proc.pid,
        eproc,
        ethreads,
        records,
        _inventory(proc, layout, all_modules, thread_inventory, side),
        tables,
    )


def process_symbols(ctx: ImageContext, space, modules: list[ModuleImage]) -> ProcessSymbols:
    """How this process's modules are named (contract "Symbols"): PDB names when the scenario
    writes the module's ISF and this process can read its CodeView record (header and debug
    directory page), else the exports the plugin can use; .pdata only when readable here."""

    def readable(address: int, size: int) -> bool:
        return all(space.is_mapped(p) for p in range(address & ~0xFFF, address + size, 0x1000))

    entries = []
    for module in modules:
        pdb = (
            module.name in ctx.pdb_modules
            and module.codeview is not None
            and readable(module.base, 0x1000)
            and readable(module.base + module.debug_page, 0x1000)
        )
        if pdb:
            names = module.pdb_symbols
        else:
            names = (ctx.ntdll_view if module is ctx.ntdll else module).exports
        pdata_rva, pdata_size = module.pdata
        functions = module.functions
        if pdata_size and not readable(module.base + pdata_rva, pdata_size):
            functions = None  # contract: unreadable .pdata makes every routine a leaf
        entries.append(ModuleSymbols(module, names, functions, pdb))

    def read(address: int, size: int) -> bytes | None:
        return space.read(address, size) if readable(address, size) else None

    return ProcessSymbols(tuple(entries), read)


def _kcbtable_rows(
    proc: Process,
    layout: ProcessLayout,
    check: TableCheck,
    side: Wow64Side | None,
    instrumentation: int,
) -> list[dict[str, Any]]:
    """windows.kcbtable's rows for the process: the 64-bit table when its pointer is set, its
    owner loaded or an instrumentation callback set; a WoW64 process's 32-bit table too."""
    who = {"pid": proc.pid, "process": proc.name, "wow64": proc.wow64}
    rows = []
    if check.table or check.owner is not None or instrumentation:
        rows.append(check.kcbtable_row(**who, instrumentation=instrumentation))
        if side is not None:
            # <where> of a 32-bit entry: the loaded modules and the 32-bit owner itself.
            check32 = TableCheck(
                32, side.table, side.user32, [*check.modules, side.user32], layout.vads, check.read
            )
            rows.append(check32.kcbtable_row(**who))
    return rows


def _record_targets(ctx: ImageContext, space, teb: int, facts) -> None:
    """The thread's structures by kind, for the fuzz harness to aim at."""
    regions, k = ctx.regions, ctx.kernel
    for label, address, size in facts.kernel_structures:
        regions.add_target(label, k.space, address, size)
    regions.add_target("teb", space, teb, 0x40)  # NT_TIB: StackBase/StackLimit
    regions.add_target("user_rsp", space, facts.rsp, 0x40)
    for frame in facts.frames:
        regions.add_target("ucallout_frame", space, frame.frame - 8, 0x60)


def _record_process_memory(
    ctx: ImageContext, proc: Process, layout: ProcessLayout, check: TableCheck
) -> None:
    """What the plugin reads for every thread of the process besides the EPROCESS."""
    owner = ("process", proc.pid)
    sym, space, regions = ctx.kernel.symbols, layout.space, ctx.regions
    # The Table verdict looks an address up in the VAD tree (private RWX or not).
    for node in layout.vad_nodes:
        regions.add_virtual(owner, ctx.kernel.space, node, sym.size("_MMVAD"))
    regions.add_virtual(owner, space, PEB_ADDRESS, sym.size("_PEB"))
    regions.add_virtual(owner, space, HEAP_ADDRESS, layout.heap_next - HEAP_ADDRESS)
    regions.add_target("peb", space, PEB_ADDRESS, sym.size("_PEB"))
    regions.add_target("loader_data", space, HEAP_ADDRESS, layout.heap_next - HEAP_ADDRESS)
    if proc.wow64:
        regions.add_virtual(owner, space, WOW64_PEB32, 0x480)
    for module in [layout.exe, *layout.modules]:
        regions.add_virtual(owner, space, module.base, 0x1000)  # headers
        rva, size = module.export_dir
        regions.add_virtual(owner, space, module.base + rva, size)
        rva, size = module.pdata
        regions.add_virtual(owner, space, module.base + rva, size)
        if module is ctx.ntdll:
            export_page = module.base + (module.export_dir[0] & ~0xFFF)
            pte = space.entry_slots(export_page)[-1]  # this process's own PTE for that page
            regions.add_physical_target(f"ntdll_export_pte:{proc.pid}", pte, pte + 8)
            regions.add_target("ntdll_headers", space, module.base, 0x400)
            regions.add_target(
                "ntdll_exports", space, module.base + module.export_dir[0], module.export_dir[1]
            )
    if layout.callback_table and space.is_mapped(layout.callback_table):
        entries = len(check.checked_entries()) + 1  # and the entry that ends them
        regions.add_virtual(owner, space, layout.callback_table, 8 * entries)


def _page_out_codeview(proc: Process, layout: ProcessLayout) -> None:
    """``page_out`` "ntdll_codeview"/"user32_codeview": the page holding the module's debug
    directory and RSDS record is in the page file in this process, so the process cannot tell
    which PDB the module needs (contract: named by its exports)."""
    for item in proc.page_out:
        if item.endswith("_codeview"):
            module = layout.module_named(item.split("_", 1)[0] + ".dll")
            assert module is not None and module.codeview is not None
            layout.space.page_out(module.base + module.debug_page)


def _syscall_rip(ctx: ImageContext, name: str) -> int:
    module = ctx.win32u if name in WIN32U_SYSCALLS else ctx.ntdll
    if name == "ZwCallbackReturn" and name not in module.exports:
        name = "NtCallbackReturn"
    return module.address(name) + SYSCALL_RETURN


def _kernel_only_thread(
    ctx: ImageContext,
    layout: ProcessLayout,
    proc: Process,
    thread: Thread,
    teb: int,
    modules: list[ModuleImage],
):
    """A system or terminated thread of a user process: one kernel stack, no trap frame."""
    k = ctx.kernel
    stack = lay_out_kernel_thread(k)
    state = STATE_TERMINATED if thread.kind == "terminated" else STATE_WAITING
    exit_time = FILETIME_2024 + 10_000_000 * 3600 if thread.kind == "terminated" else 0
    wait_reason = "WrTerminated" if thread.kind == "terminated" else thread.wait_reason
    k.writer.put(
        layout.space,
        teb,
        "_TEB",
        {
            "NtTib.Self": teb,
            "ProcessEnvironmentBlock": PEB_ADDRESS,
            "ClientId.UniqueProcess": proc.pid,
            "ClientId.UniqueThread": thread.tid,
        },
        optional=True,
    )
    record = truth.thread_record(
        pid=proc.pid,
        tid=thread.tid,
        process=proc.name,
        wow64=proc.wow64,
        state=state,
        wait_reason=wait_reason,
        nesting=0,
        rip=None,
        rsp=None,
        modules=modules,
        stub=ctx.facts.stub or (0, 0),
        frames=[],
        notes="; ".join(n for n in (layout.thread_note, "no user-mode trap frame") if n),
    )
    record["stack"] = stack_truth.single_row("no user-mode trap frame")
    return record, stack, state, wait_reason, exit_time


def _user_thread(
    ctx: ImageContext,
    layout: ProcessLayout,
    proc: Process,
    thread: Thread,
    teb: int,
    stack_base: int,
    modules: list[ModuleImage],
    handler: HandlerLookup,
    dispatcher_return: int,
    unwind: ProcessUnwind,
    wow64_side: tuple[Wow64Side, int] | None = None,
):
    k = ctx.kernel
    space = StackShadow(layout.space, stack_base - USER_STACK_RESERVE, stack_base)
    table = layout.callback_table
    calls = []
    for cb in thread.callbacks:
        value = 0
        if table and space.is_mapped(table + 8 * cb.api):
            value = struct.unpack("<Q", space.read(table + 8 * cb.api, 8))[0]
        calls.append((cb.api, value, cb.length))
    rips = [_syscall_rip(ctx, cb.syscall) for cb in thread.callbacks]
    rips.append(_syscall_rip(ctx, thread.wait))
    plan = conditions.stack_plan(thread.conditions, len(calls))
    loaded = [m.module for m in modules.modules if m.module is not layout.exe]
    resting_wait = thread.wait in call_chains.CALLBACK_RETURN_WAITS
    resting = None
    if not calls and resting_wait:
        # Without a handler frame below it, NtCallbackReturn was called by the dispatcher,
        # standing on the UCALLOUT_FRAME of a system call made at level 0.
        outer = "NtUserGetMessage" if layout.module_named("user32.dll") else "NtDelayExecution"
        outer_rip = _syscall_rip(ctx, outer)
        resting = (
            ctx.ntdll.base + ctx.ntdll.extras["dispatcher_callback_return"],
            outer_rip,
            call_chains.level_zero(loaded, layout.exe, outer_rip),
        )
        chains = [resting[2]]
    else:
        chains = [call_chains.level_zero(loaded, layout.exe, rips[0])]
    for level, (_api, value, _length) in enumerate(calls, start=1):
        chains.append(
            call_chains.callback_level(
                loaded,
                layout.exe,
                value,
                resting=resting_wait and level == len(calls),
                gap=plan.min_gaps.get(level, 0),
                choice=thread.tid // 4 + level,
            )
        )
    facts, stack = lay_out_user_thread(
        k,
        space,
        # A generator of its own per thread: how one thread's chains look (a handler the
        # builder has call sites for, or not) never shifts another thread's bytes.
        random.Random(f"stack:{ctx.seed}:{proc.pid}:{thread.tid}"),
        stack_base=stack_base,
        syscall_rips=rips,
        chains=chains,
        calls=calls,
        dispatcher_return=dispatcher_return,
        dispatcher_range=ctx.dispatcher_range,
        plan=plan,
        resting=resting,
    )
    k.writer.put(
        space,
        teb,
        "_TEB",
        {
            "NtTib.StackBase": facts.stack_base,
            "NtTib.StackLimit": facts.stack_limit,
            "NtTib.Self": teb,
            "ProcessEnvironmentBlock": PEB_ADDRESS,
            "ClientId.UniqueProcess": proc.pid,
            "ClientId.UniqueThread": thread.tid,
        },
        optional=True,
    )
    owner = ("thread", proc.pid, thread.tid)
    ctx.regions.add_virtual(owner, space, teb, k.symbols.size("_TEB"))
    ctx.regions.add_virtual(owner, space, facts.stack_limit, facts.stack_base - facts.stack_limit)
    for cb in thread.callbacks:
        if table:
            ctx.regions.add_virtual(owner, space, table + 8 * cb.api, 8)
    _record_targets(ctx, space, teb, facts)
    wow64_stack = None
    if wow64_side is not None:
        side, index = wow64_side
        wow64_stack = lay_out_wow64_stack(k, layout.space, layout.vads, teb, index, side.images)
    exp = _expectation(proc, thread, space, teb, facts)
    exp.instrumentation = layout.thread_note
    if facts.resting_frame:
        frame = facts.resting_frame
        exp.user_frames[frame] = UserFrame(
            frame, 2, frame + 0x58, 0x10, resting[1], facts.resting_rsp, resting[0]
        )
    damage.apply_thread_damage(
        thread.damage, kernel=k, space=space, teb=teb, facts=facts, kthread=stack, exp=exp
    )
    conditions.apply_thread_conditions(
        thread.conditions,
        kernel=k,
        space=space,
        rng=conditions.condition_rng(ctx.seed, proc.pid, thread.tid),
        facts=facts,
        kthread=stack,
        exp=exp,
        dispatcher_return=dispatcher_return,
        dispatcher_range=ctx.dispatcher_range,
    )
    for frame in exp.user_frames.values():
        if frame.address not in {f.frame for f in facts.frames}:
            ctx.regions.add_target("stale_ucallout_frame", space, frame.address - 8, 0x60)
    record = thread_record(exp, ctx.facts, modules, handler)
    rows32 = None
    if wow64_stack is not None:
        tls = teb + k.symbols.offset("_TEB", "TlsSlots") + 8 * WOW64_TLS_CPURESERVED
        rows32 = wow64_rows(wow64_stack, tls, exp.readable, wow64_side[0].images)
    record["stack"] = stack_truth.stack_rows(exp, space, facts.trap_rbps, ctx.facts, unwind, rows32)
    return record, stack, exp.state, thread.wait_reason, 0


def _expectation(
    proc: Process, thread: Thread, space, teb: int, facts: StackFacts
) -> ThreadExpectation:
    """The builder's facts about a healthy user thread as lay_out_user_thread wrote it."""

    def readable(address: int, size: int) -> bool:
        return all(
            space.is_mapped(page) for page in range(address & ~0xFFF, address + size, 0x1000)
        )

    return ThreadExpectation(
        pid=proc.pid,
        tid=thread.tid,
        process=proc.name,
        wow64=proc.wow64,
        state=STATE_WAITING,
        wait_reason=thread.wait_reason,
        nesting=len(facts.frames),
        trap_frame=facts.trap_frame,
        kthread_trap_frame=facts.trap_frame,
        rip=facts.rip,
        rsp=facts.rsp,
        stack_limit=facts.stack_limit,
        stack_base=facts.stack_base,
        levels=[
            KernelLevel(
                level=f.level,
                trap_frame=facts.trap_frames[f.level - 1],
                trap_rip=facts.syscall_rips[f.level - 1],
                frame=f.frame,
                callout_trap_frame=facts.trap_frames[f.level - 1],
            )
            for f in facts.frames
        ],
        readable=readable,
        # NT_TIB.StackBase (+8) and StackLimit (+0x10) are what the plugin reads.
        teb_readable=lambda: readable(teb, 0x18),
        user_frames={
            f.frame: UserFrame(f.frame, f.api, f.buffer, f.length, f.rip, f.rsp, f.return_address)
            for f in facts.frames
        },
    )


def _inventory(
    proc: Process,
    layout: ProcessLayout,
    all_modules: list[ModuleImage],
    threads: list,
    side: Wow64Side | None = None,
) -> dict[str, Any]:
    """What the stock plugins must list for the process (truth file ``processes``)."""
    return {
        "pid": proc.pid,
        "ppid": proc.ppid,
        "name": proc.name,
        "wow64": proc.wow64,
        "threads": threads,
        "modules": [
            {
                "name": m.name,
                "path": f"C:{m.path}",
                "base": m.base,
                "size": m.size,
                "init_order": m is not layout.exe,
            }
            for m in all_modules
        ],
        "vads": [
            {"start": v.start, "end": v.end, "file": v.module.path if v.module else None}
            for v in sorted(layout.vads, key=lambda v: v.start)
        ],
        "exports": {m.name: m.inventory_exports() for m in all_modules},
        # A WoW64 process's 32-bit images: image VADs in no (64-bit) loader list.
        "modules32": [
            {"name": m.name, "path": f"C:{m.path}", "base": m.base, "size": m.size}
            for m in (side.images if side is not None else ())
        ],
    }
