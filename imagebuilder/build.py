"""Scenario + symbol table in, memory image + ground truth out."""

from __future__ import annotations

import json
import random
import shutil
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from imagebuilder import damage, executive, stack_truth, truth
from imagebuilder.crashdump import write_crash_dump
from imagebuilder.damage_spec import ForeignThread
from imagebuilder.expectation import ImageFacts
from imagebuilder.isf import SymbolTable
from imagebuilder.kernel_layout import KERNEL_BASE, Kernel
from imagebuilder.memory import PhysicalMemory
from imagebuilder.pdb_isf import write_module_isfs
from imagebuilder.process_build import (
    STATE_WAITING,
    BuiltProcess,
    ImageContext,
    build_user_process,
)
from imagebuilder.process_layout import FILETIME_2024, ModuleMapper
from imagebuilder.process_symbols import ProcessSymbols
from imagebuilder.regions import GLOBAL, PROCESS_LIST, RegionMap
from imagebuilder.scenario import Scenario
from imagebuilder.thread_layout import lay_out_kernel_thread
from imagebuilder.user_modules import (
    EXE_BASE,
    MODULE_BASES,
    OTHER_DLL_BASE,
    ModuleImage,
    build_ntdll,
    build_plain,
    build_user32,
    build_win32u,
)
from imagebuilder.wow64_images import build_wow64win

TRUTH_FORMAT = "kcbwait-truth/1"


@dataclass
class BuiltImage:
    scenario: Scenario
    symbols: SymbolTable
    memory: PhysicalMemory
    kernel: Kernel
    truth: dict[str, Any]
    regions: RegionMap | None = None
    # The modules whose PDB symbol tables (ISF) the scenario asks for.
    pdb_modules: list[ModuleImage] = field(default_factory=list)

    def write(
        self, out_dir: Path, stem: str | None = None, formats: tuple[str, ...] = ("raw",)
    ) -> dict[str, Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = stem or self.scenario.name
        paths: dict[str, Path] = {}
        if "raw" in formats:
            paths["raw"] = out_dir / f"{stem}.raw"
            self.memory.write_raw(paths["raw"])
        if "dmp" in formats:
            paths["dmp"] = out_dir / f"{stem}.dmp"
            write_crash_dump(paths["dmp"], self)
        paths["truth"] = out_dir / f"{stem}.truth.json"
        paths["truth"].write_text(json.dumps(self.truth, indent=1, sort_keys=True) + "\n")
        # A directory for `vol -s`, next to the image (always made, maybe empty); rewritten
        # whole so that no table of an earlier build of the same stem stays behind.
        paths["pdb_symbols"] = out_dir / f"{stem}.pdb-symbols"
        shutil.rmtree(paths["pdb_symbols"], ignore_errors=True)
        write_module_isfs(paths["pdb_symbols"], self.pdb_modules)
        return paths


class ImageBuilder:
    def __init__(self, scenario: Scenario, symbols: SymbolTable, build_number: int) -> None:
        self.scenario = scenario
        self.symbols = symbols
        self.memory = PhysicalMemory(scenario.memory_mb * 1024 * 1024)
        self.kernel = Kernel(symbols, self.memory, scenario.seed, build_number)
        ntdll_damage = scenario.damage.ntdll_exports
        ntdll = build_ntdll(scenario.ntdll_zw_alias, decoy=ntdll_damage == "decoy_alias")
        usable, problem = dict(ntdll.exports), None
        if ntdll_damage is not None:
            ntdll, usable, problem = damage.damage_ntdll(ntdll_damage, ntdll)
        if scenario.processes and all("ntdll_exports" in p.page_out for p in scenario.processes):
            usable, problem = {}, "unreadable"  # no process holds a readable copy
        view = replace(ntdll, exports=usable)
        names = [n for n in ("NtCallbackReturn", "ZwCallbackReturn") if n in usable]
        self.regions = RegionMap()
        dispatcher = ntdll.address("KiUserCallbackDispatcher")
        dispatcher_return = ntdll.base + ntdll.extras["dispatcher_return"]
        win32u = build_win32u()
        self.ctx = ImageContext(
            kernel=self.kernel,
            mapper=ModuleMapper(self.kernel),
            rng=random.Random(scenario.seed),
            ntdll=ntdll,
            win32u=win32u,
            user32=build_user32(scenario.callback_table_size, ntdll, win32u),
            ntdll_view=view,
            facts=ImageFacts(
                truth.callback_return_range(view) if names else None,
                problem,
                dispatcher=_runtime_function(ntdll, dispatcher),
                dispatcher_return=(
                    dispatcher_return
                    if symbols.has_type("_PS_NTDLL_EXPORTS")
                    and symbols.has_field("_PS_NTDLL_EXPORTS", "KiUserCallbackDispatcherReturn")
                    else 0
                ),
                kernel_names_dispatcher=any(
                    symbols.has_symbol(n) for n in ("KeUserCallbackDispatcher", "PsNtdllExports")
                ),
            ),
            regions=self.regions,
            dispatcher_return=dispatcher_return,
            dispatcher_range=(dispatcher, dispatcher + 0x40),
            exe=self.exe,
            module=self.module,
            seed=scenario.seed,
            pdb_modules=frozenset(scenario.pdb_symbols),
            table_size=scenario.callback_table_size,
        )
        self._modules: dict[str, ModuleImage] = {
            m.name: m for m in (ntdll, self.ctx.win32u, self.ctx.user32)
        }
        self._exes: dict[str, ModuleImage] = {}
        self.kernel.write_dispatcher_globals(dispatcher, self.ctx.dispatcher_return)

    # -- modules -------------------------------------------------------------------------------
    def module(self, name: str) -> ModuleImage:
        if name not in self._modules:
            if name == "wow64win.dll":
                self._modules[name] = build_wow64win(self.scenario.callback_table_size)
                return self._modules[name]
            if name == "kernel32.dll":
                base = MODULE_BASES[name]
            else:
                base = OTHER_DLL_BASE + 0x100000 * len(self._modules)
            self._modules[name] = build_plain(name, base, rf"\Windows\System32\{name}")
        return self._modules[name]

    def exe(self, name: str) -> ModuleImage:
        if name not in self._exes:
            self._exes[name] = build_plain(name, EXE_BASE, rf"\Windows\System32\{name}", dll=False)
        return self._exes[name]

    # -- build ---------------------------------------------------------------------------------
    def build(self) -> BuiltImage:
        k, sym, scenario = self.kernel, self.symbols, self.scenario
        system = self._system_process()
        k.write_system_process(system.eprocess)
        built = [system]
        for proc in scenario.processes:
            built.append(build_user_process(self.ctx, proc))
        by_pid = {b.pid: b for b in built}
        for foreign in scenario.damage.foreign_threads:
            self._foreign_thread(foreign, by_pid, built)
        head = k.symbol_address("PsActiveProcessHead")
        k.writer.list_ring(
            k.space,
            head,
            [b.eprocess + sym.offset("_EPROCESS", "ActiveProcessLinks") for b in built],
        )
        self.regions.add_virtual(("link", PROCESS_LIST, "head"), k.space, head, 16)
        for name in ("KeUserCallbackDispatcher", "PsNtdllExports"):
            if sym.has_symbol(name):
                self.regions.add_virtual(GLOBAL, k.space, k.symbol_address(name), 0x40)
        eprocesses = {b.pid: b.eprocess for b in built}
        order = [b.pid for b in built]
        if scenario.damage.process_list is not None:
            damage.redirect_process_link(k, scenario.damage.process_list, eprocesses)
            order = damage.process_list_order(order, scenario.damage.process_list)
        for space in self.ctx.spaces:
            space.share_kernel_half()
        paged = [p.pid for p in scenario.processes if "ntdll_exports" in p.page_out]
        for pid in paged:
            self.regions.process_dependents[pid] = [b.pid for b in built if b.pid not in (pid, 4)]
        self.regions.resolve()
        truth_doc = {
            "format": TRUTH_FORMAT,
            "scenario": scenario.name,
            "profile": {"guid": sym.guid, "age": sym.age, "build": k.build},
            "kernel_base": KERNEL_BASE,
            "dtb": k.space.pml4,
            "processes": [by_pid[pid].inventory for pid in order],
            "threads": [record for pid in order for record in by_pid[pid].records],
            "tables": [row for pid in order for row in by_pid[pid].tables],
            "damage": _damage_summary(scenario),
            "conditions": _conditions_summary(scenario),
        }
        loaded = {**self._modules, **self._exes}
        pdb_modules = [loaded[name] for name in scenario.pdb_symbols]
        return BuiltImage(scenario, sym, self.memory, k, truth_doc, self.regions, pdb_modules)

    def _system_process(self) -> BuiltProcess:
        k, ctx = self.kernel, self.ctx
        eproc = k.pool_object("_EPROCESS", b"Proc")
        ethreads: dict[int, int] = {}
        records, thread_inventory = [], []
        for index in range(self.scenario.system_threads):
            tid = 8 + 4 * index
            ethread = k.pool_object("_ETHREAD", b"Thre")
            start = KERNEL_BASE + 0x1000
            stack_start = k.stack_cursor
            stack = lay_out_kernel_thread(k)
            self.regions.add_virtual(
                ("thread", 4, tid), k.space, stack_start, k.stack_cursor - stack_start
            )
            ctx.sequence += 1
            executive.write_ethread(
                k,
                ethread,
                sequence=ctx.sequence,
                eproc=eproc,
                pid=4,
                tid=tid,
                state=STATE_WAITING,
                wait_reason="WrQueue",
                stack=stack,
                teb=0,
                start=start,
                user=False,
            )
            executive.record_ethread(self.regions, k, ethread, 4, tid)
            ethreads[tid] = ethread
            thread_inventory.append({"tid": tid, "start": start})
            records.append(
                truth.thread_record(
                    pid=4,
                    tid=tid,
                    process="System",
                    wow64=False,
                    state=STATE_WAITING,
                    wait_reason="WrQueue",
                    nesting=0,
                    rip=None,
                    rsp=None,
                    modules=ProcessSymbols(),
                    stub=(0, 0),
                    frames=[],
                    notes="no user-mode trap frame",
                )
                | {"table": None}  # no PEB, no callback table
                | {"stack": stack_truth.single_row("no user-mode trap frame")}
            )
        executive.write_eprocess(
            k,
            eproc,
            pid=4,
            ppid=0,
            name="System",
            dtb=k.space.pml4,
            peb=0,
            create_time=FILETIME_2024,
            threads=list(ethreads.values()),
        )
        executive.record_eprocess(self.regions, k, eproc, 4)
        inventory = {
            "pid": 4,
            "ppid": 0,
            "name": "System",
            "wow64": False,
            "threads": thread_inventory,
            "modules": [],
            "vads": [],
        }
        return BuiltProcess(4, eproc, ethreads, records, inventory)

    def _foreign_thread(
        self, foreign: ForeignThread, by_pid: dict[int, BuiltProcess], built: list[BuiltProcess]
    ) -> None:
        """A copy of thread ``foreign.tid``'s ETHREAD appended to process ``foreign.into``'s
        thread lists: it still names its own process in KTHREAD.Process."""
        k = self.kernel
        source = next(b for b in built if foreign.tid in b.ethreads)
        target = by_pid[foreign.into]
        clone = k.pool_object("_ETHREAD", b"Thre")
        size = self.symbols.size("_ETHREAD")
        k.space.write(clone, k.space.read(source.ethreads[foreign.tid], size))
        target.ethreads = {**target.ethreads, -foreign.tid: clone}
        executive.link_threads(k, target.eprocess, list(target.ethreads.values()))
        record = dict(next(r for r in source.records if r["tid"] == foreign.tid))
        target_record = target.records[0]
        note = f"mismatch: KTHREAD.Process is PID {source.pid}"
        record.update(
            pid=target.pid,
            process=target_record["process"],
            wow64=target_record["wow64"],
            notes="; ".join(n for n in (note, record["notes"]) if n),
        )
        target.records.append(record)


def _runtime_function(ntdll: ModuleImage, address: int) -> tuple[int, int]:
    """[BeginAddress, EndAddress) of the RUNTIME_FUNCTION (12-byte .pdata entry) the builder
    gave the code at ``address``; the contract's 0x100 bytes from it when it has none."""
    rva = address - ntdll.base
    start, size = ntdll.pdata
    for offset in range(start, start + size - 11, 12):
        begin, end, _unwind = struct.unpack_from("<III", ntdll.data, offset)
        if begin <= rva < end:
            return ntdll.base + begin, ntdll.base + end
    return address, address + 0x100


def _damage_summary(scenario: Scenario) -> list[dict[str, Any]]:
    """The damage the scenario asked for, for a reader of the truth file."""
    items: list[dict[str, Any]] = []
    d = scenario.damage
    if d.ntdll_exports:
        items.append({"scope": "image", "kind": f"ntdll_exports:{d.ntdll_exports}"})
    if d.process_list:
        items.append(
            {
                "scope": "image",
                "kind": f"process_list:{d.process_list.kind}",
                "pid": d.process_list.at,
            }
        )
    for f in d.foreign_threads:
        items.append({"scope": "image", "kind": "foreign_thread", "tid": f.tid, "pid": f.into})
    for proc in scenario.processes:
        if proc.damage.thread_list:
            items.append(
                {
                    "scope": "process",
                    "pid": proc.pid,
                    "kind": f"thread_list:{proc.damage.thread_list.kind}",
                    "tid": proc.damage.thread_list.at,
                }
            )
        if proc.damage.kernel_callback_table:
            items.append(
                {
                    "scope": "process",
                    "pid": proc.pid,
                    "kind": f"kernel_callback_table:{proc.damage.kernel_callback_table}",
                }
            )
        if proc.damage.unwind_data_paged_out:
            items.append(
                {
                    "scope": "process",
                    "pid": proc.pid,
                    "kind": "unwind_data_paged_out",
                    "module": proc.damage.unwind_data_paged_out,
                }
            )
        if proc.damage.unwind_info_corrupt:
            module, function = proc.damage.unwind_info_corrupt
            items.append(
                {
                    "scope": "process",
                    "pid": proc.pid,
                    "kind": "unwind_info_corrupt",
                    "module": module,
                    "function": function,
                }
            )
        for thread in proc.threads:
            for item in thread.damage:
                items.append(
                    {"scope": "thread", "pid": proc.pid, "tid": thread.tid, "kind": item.kind}
                )
    return items


def _conditions_summary(scenario: Scenario) -> list[dict[str, Any]]:
    """The conditions the scenario asked for, for a reader of the truth file."""
    items: list[dict[str, Any]] = []
    for proc in scenario.processes:
        for pc in proc.conditions:
            items.append(
                {"scope": "process", "pid": proc.pid, "kind": pc.kind, "module": pc.module}
            )
        for thread in proc.threads:
            for c in thread.conditions:
                item: dict[str, Any] = {
                    "scope": "thread",
                    "pid": proc.pid,
                    "tid": thread.tid,
                    "kind": c.kind,
                }
                item.update({k: v for k, v in (("at", c.at), ("level", c.level)) if v})
                if c.size:
                    item["size"] = c.size
                items.append(item)
    return items


def build_image(scenario: Scenario, symbols: SymbolTable, build_number: int) -> BuiltImage:
    return ImageBuilder(scenario, symbols, build_number).build()
