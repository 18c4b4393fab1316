"""Scenario + symbol table in, memory image + ground truth out."""

from __future__ import annotations

import json
import random
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagebuilder import truth
from imagebuilder.crashdump import write_crash_dump
from imagebuilder.isf import SymbolTable
from imagebuilder.kernel_layout import KERNEL_BASE, Kernel
from imagebuilder.memory import PhysicalMemory
from imagebuilder.process_layout import (
    FILETIME_2024,
    HEAP_ADDRESS,
    HEAP_SIZE,
    PEB_ADDRESS,
    PRIVATE_MEMORY,
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
from imagebuilder.scenario import Process, Scenario, Thread
from imagebuilder.thread_layout import lay_out_kernel_thread, lay_out_user_thread
from imagebuilder.user_modules import (
    EXE_BASE,
    MODULE_BASES,
    OTHER_DLL_BASE,
    SYSCALL_RETURN,
    WIN32U_SYSCALLS,
    ModuleImage,
    build_ntdll,
    build_plain,
    build_user32,
    build_win32u,
)

TRUTH_FORMAT = "kcbwait-truth/1"
_STATE_WAITING, _STATE_TERMINATED = "Waiting", "Terminated"


@dataclass
class BuiltImage:
    scenario: Scenario
    symbols: SymbolTable
    memory: PhysicalMemory
    kernel: Kernel
    truth: dict[str, Any]

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
        return paths


class ImageBuilder:
    def __init__(self, scenario: Scenario, symbols: SymbolTable, build_number: int) -> None:
        self.scenario = scenario
        self.symbols = symbols
        self.rng = random.Random(scenario.seed)
        self.memory = PhysicalMemory(scenario.memory_mb * 1024 * 1024)
        self.kernel = Kernel(symbols, self.memory, scenario.seed, build_number)
        self.mapper = ModuleMapper(self.kernel)
        self.ntdll = build_ntdll(scenario.ntdll_zw_alias)
        self.win32u = build_win32u()
        self.user32 = build_user32(scenario.callback_table_size)
        self._modules: dict[str, ModuleImage] = {
            m.name: m for m in (self.ntdll, self.win32u, self.user32)
        }
        self._exes: dict[str, ModuleImage] = {}
        self.stub = truth.callback_return_range(self.ntdll)
        dispatcher = self.ntdll.address("KiUserCallbackDispatcher")
        self.dispatcher_return = self.ntdll.base + self.ntdll.extras["dispatcher_return"]
        self.dispatcher_range = (dispatcher, dispatcher + 0x40)
        self.kernel.write_dispatcher_globals(dispatcher, self.dispatcher_return)
        self._tid_time = 0
        self._layouts: list = []

    # -- modules -------------------------------------------------------------------------------
    def module(self, name: str) -> ModuleImage:
        if name not in self._modules:
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
        k, sym = self.kernel, self.symbols
        records: list[dict[str, Any]] = []
        inventory: list[dict[str, Any]] = []
        system = k.pool_object("_EPROCESS", b"Proc")
        eprocesses = [system]
        system_threads = self._system_process(system, records, inventory)
        del system_threads
        for proc in self.scenario.processes:
            eprocesses.append(self._user_process(proc, records, inventory))
        k.writer.list_ring(
            k.space,
            k.symbol_address("PsActiveProcessHead"),
            [e + sym.offset("_EPROCESS", "ActiveProcessLinks") for e in eprocesses],
        )
        for layout in self._layouts:
            layout.share_kernel_half()
        truth_doc = {
            "format": TRUTH_FORMAT,
            "scenario": self.scenario.name,
            "profile": {"guid": sym.guid, "age": sym.age, "build": k.build},
            "kernel_base": KERNEL_BASE,
            "dtb": k.space.pml4,
            "processes": inventory,
            "threads": records,
        }
        return BuiltImage(self.scenario, sym, self.memory, k, truth_doc)

    def _eprocess(
        self,
        eproc: int,
        *,
        pid: int,
        ppid: int,
        name: str,
        dtb: int,
        peb: int,
        create_time: int,
        threads: list[int],
        kthreads: list[int],
        wow64: int = 0,
    ) -> None:
        k, sym = self.kernel, self.symbols
        k.writer.put(
            k.space,
            eproc,
            "_EPROCESS",
            {
                "Pcb.Header.Type": 3,
                "Pcb.Header.Size": sym.size("_KPROCESS") // 4 & 0xFF,
                "Pcb.DirectoryTableBase": dtb,
                "UniqueProcessId": pid,
                "InheritedFromUniqueProcessId": ppid,
                "ImageFileName": name.encode("latin-1")[:14],
                "CreateTime.QuadPart": create_time,
                "Peb": peb,
                "ActiveThreads": len(threads),
            },
            optional=True,
        )
        if wow64:
            field = sym.field("_EPROCESS", "WoW64Process")
            if field.type.get("subtype", {}).get("name") == "_EWOW64PROCESS":
                ewow = k.pool_object("_EWOW64PROCESS", b"PsWo")
                k.writer.put(
                    k.space, ewow, "_EWOW64PROCESS", {"Peb": wow64, "Machine": 0x14C}, optional=True
                )
                wow64 = ewow
            k.writer.put(k.space, eproc, "_EPROCESS", {"WoW64Process": wow64})
        k.writer.list_ring(
            k.space,
            eproc + sym.offset("_EPROCESS", "ThreadListHead"),
            [t + sym.offset("_ETHREAD", "ThreadListEntry") for t in threads],
        )
        k.writer.list_ring(
            k.space,
            eproc + sym.offset("_KPROCESS", "ThreadListHead"),
            [t + sym.offset("_KTHREAD", "ThreadListEntry") for t in kthreads],
        )

    def _ethread(
        self,
        ethread: int,
        *,
        eproc: int,
        pid: int,
        tid: int,
        state: str,
        wait_reason: str,
        stack: dict[str, int],
        teb: int,
        start: int,
        user: bool,
        exit_time: int = 0,
    ) -> None:
        k, sym = self.kernel, self.symbols
        self._tid_time += 1
        values = {f"Tcb.{name}": value for name, value in stack.items()}
        values.update(
            {
                "Tcb.Header.Type": 6,
                "Tcb.Teb": teb,
                "Tcb.Process": eproc,
                "Tcb.ApcState.Process": eproc,
                "Tcb.State": sym.enum_value("_KTHREAD_STATE", state),
                "Tcb.WaitReason": sym.enum_value("_KWAIT_REASON", wait_reason),
                "Tcb.PreviousMode": 1 if user else 0,
                "Cid.UniqueProcess": pid,
                "Cid.UniqueThread": tid,
                "CreateTime.QuadPart": FILETIME_2024 + 10_000_000 * (60 + self._tid_time),
                "ExitTime.QuadPart": exit_time,
                "StartAddress": start,
                "Win32StartAddress": start,
            }
        )
        k.writer.put(k.space, ethread, "_ETHREAD", values, optional=True)

    def _system_process(self, eproc: int, records: list, inventory: list) -> list[int]:
        k = self.kernel
        threads = []
        thread_inventory = []
        for index in range(self.scenario.system_threads):
            tid = 8 + 4 * index
            ethread = k.pool_object("_ETHREAD", b"Thre")
            start = KERNEL_BASE + 0x1000
            self._ethread(
                ethread,
                eproc=eproc,
                pid=4,
                tid=tid,
                state=_STATE_WAITING,
                wait_reason="WrQueue",
                stack=lay_out_kernel_thread(k),
                teb=0,
                start=start,
                user=False,
            )
            threads.append(ethread)
            thread_inventory.append({"tid": tid, "start": start})
            records.append(
                truth.thread_record(
                    pid=4,
                    tid=tid,
                    process="System",
                    wow64=False,
                    state=_STATE_WAITING,
                    wait_reason="WrQueue",
                    nesting=0,
                    rip=None,
                    rsp=None,
                    modules=[],
                    stub=self.stub,
                    frames=[],
                    notes="no user-mode trap frame",
                )
            )
        self._eprocess(
            eproc,
            pid=4,
            ppid=0,
            name="System",
            dtb=k.space.pml4,
            peb=0,
            create_time=FILETIME_2024,
            threads=threads,
            kthreads=threads,
        )
        inventory.append(
            {
                "pid": 4,
                "ppid": 0,
                "name": "System",
                "wow64": False,
                "threads": thread_inventory,
                "modules": [],
                "vads": [],
            }
        )
        return threads

    def _user_process(self, proc: Process, records: list, inventory: list) -> int:
        k = self.kernel
        space = k.new_process_space()
        self._layouts.append(space)
        eproc = k.pool_object("_EPROCESS", b"Proc")
        modules = [self.module(name) for name in proc.modules]
        layout = ProcessLayout(
            proc.pid, proc.name, eproc, space, PEB_ADDRESS, modules, self.exe(proc.name)
        )
        for module in [layout.exe, *modules]:
            self.mapper.map(space, module, private_data=module is self.user32)
            layout.vads.append(Vad(module.base, module.base + module.size - 1, module))
        if "ntdll_exports" in proc.page_out:
            start, size = self.ntdll.export_dir
            for page in range(start & ~0xFFF, start + size, 0x1000):
                space.page_out(self.ntdll.base + page)
        # Loader heap, PEB + TEBs, stacks: private memory.
        layout.vads.append(Vad(HEAP_ADDRESS, HEAP_ADDRESS + HEAP_SIZE - 1))
        teb_region = PEB_ADDRESS + 0x1000 + TEB_STRIDE * len(proc.threads)
        layout.vads.append(Vad(PEB_ADDRESS, teb_region - 1))
        table = 0
        if self.user32 in modules:
            table = self.user32.base + self.user32.extras["callback_table"]
            for api, target in proc.callback_overrides.items():
                handler = self._override_target(layout, target)
                space.write(table + 8 * api, struct.pack("<Q", handler))
        if any(t == "private" for t in proc.callback_overrides.values()):
            layout.vads.append(Vad(PRIVATE_MEMORY, PRIVATE_MEMORY + 0xFFFF))
        layout.callback_table = table
        ldr = write_loader_data(k, layout)
        k.writer.put(
            space,
            PEB_ADDRESS,
            "_PEB",
            {
                "Ldr": ldr,
                "ImageBaseAddress": layout.exe.base,
                "KernelCallbackTable": table,
                "NumberOfProcessors": 2,
                "OSMajorVersion": 10,
                "OSBuildNumber": k.build & 0xFFFF,
            },
            optional=True,
        )
        wow64 = 0
        if proc.wow64:
            wow64 = WOW64_PEB32
            space.write(WOW64_PEB32, bytes(0x480))
            layout.vads.append(Vad(WOW64_PEB32, WOW64_PEB32 + 0xFFF))
        ethreads, thread_inventory = [], []
        all_modules = [layout.exe, *modules]
        for index, thread in enumerate(proc.threads):
            ethread = k.pool_object("_ETHREAD", b"Thre")
            teb = PEB_ADDRESS + 0x1000 + TEB_STRIDE * index
            stack_base = STACKS_ADDRESS + USER_STACK_RESERVE * (index + 1)
            start = self.ntdll.address("RtlUserThreadStart")
            record, stack, state, wait_reason, exit_time = self._thread(
                layout, thread, teb, stack_base, all_modules, proc
            )
            if thread.kind == "user":
                layout.vads.append(Vad(stack_base - USER_STACK_RESERVE, stack_base - 1))
            self._ethread(
                ethread,
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
            ethreads.append(ethread)
            thread_inventory.append({"tid": thread.tid, "start": start})
            records.append(record)
        root = write_vad_tree(k, self.mapper, layout)
        self._eprocess(
            eproc,
            pid=proc.pid,
            ppid=proc.ppid,
            name=proc.name,
            dtb=space.pml4,
            peb=PEB_ADDRESS,
            create_time=FILETIME_2024 + 10_000_000 * 30,
            threads=ethreads,
            kthreads=ethreads,
            wow64=wow64,
        )
        k.writer.put(k.space, eproc, "_EPROCESS", {"VadRoot.Root": root}, optional=True)
        inventory.append(
            {
                "pid": proc.pid,
                "ppid": proc.ppid,
                "name": proc.name,
                "wow64": proc.wow64,
                "threads": thread_inventory,
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
                "exports": {
                    m.name: {n: m.base + r for n, r in m.exports.items()} for m in all_modules
                },
            }
        )
        return eproc

    def _override_target(self, layout: ProcessLayout, target: str) -> int:
        if target == "private":
            handler = layout.private_next
            layout.space.write(handler, b"\x48\x83\xec\x48\xcc")
            layout.private_next += 0x100
            return handler
        module = layout.module_named(target)
        assert module is not None
        return module.base + module.extras.get("payload", 0x1000)

    def _syscall_rip(self, name: str) -> int:
        module = self.win32u if name in WIN32U_SYSCALLS else self.ntdll
        if name == "ZwCallbackReturn" and name not in module.exports:
            name = "NtCallbackReturn"
        return module.address(name) + SYSCALL_RETURN

    def _thread(
        self,
        layout: ProcessLayout,
        thread: Thread,
        teb: int,
        stack_base: int,
        modules: list[ModuleImage],
        proc: Process,
    ):
        k = self.kernel
        space = layout.space
        if thread.kind != "user":
            stack = lay_out_kernel_thread(k)
            state = _STATE_TERMINATED if thread.kind == "terminated" else _STATE_WAITING
            exit_time = FILETIME_2024 + 10_000_000 * 3600 if thread.kind == "terminated" else 0
            wait_reason = "WrTerminated" if thread.kind == "terminated" else thread.wait_reason
            k.writer.put(
                space,
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
                stub=self.stub,
                frames=[],
                notes="no user-mode trap frame",
            )
            return record, stack, state, wait_reason, exit_time
        table = layout.callback_table
        calls = []
        for cb in thread.callbacks:
            handler = struct.unpack("<Q", space.read(table + 8 * cb.api, 8))[0] if table else 0
            calls.append((cb.api, handler, cb.length))
        rips = [self._syscall_rip(cb.syscall) for cb in thread.callbacks]
        rips.append(self._syscall_rip(thread.wait))
        caller = layout.exe.base + 0x1000 + 0x10
        facts, stack = lay_out_user_thread(
            k,
            space,
            self.rng,
            stack_base=stack_base,
            syscall_rips=rips,
            caller_return=caller,
            calls=calls,
            dispatcher_return=self.dispatcher_return,
            dispatcher_range=self.dispatcher_range,
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
        frames = [
            truth.frame_record(
                level=f.level,
                rip=f.rip,
                rsp=f.rsp,
                frame=f.frame,
                api=f.api,
                handler=f.handler,
                buffer=f.buffer,
                length=f.length,
                modules=modules,
            )
            for f in facts.frames
        ]
        record = truth.thread_record(
            pid=proc.pid,
            tid=thread.tid,
            process=proc.name,
            wow64=proc.wow64,
            state=_STATE_WAITING,
            wait_reason=thread.wait_reason,
            nesting=len(calls),
            rip=facts.rip,
            rsp=facts.rsp,
            modules=modules,
            stub=self.stub,
            frames=frames,
            notes="",
        )
        return record, stack, _STATE_WAITING, thread.wait_reason, 0


def build_image(scenario: Scenario, symbols: SymbolTable, build_number: int) -> BuiltImage:
    return ImageBuilder(scenario, symbols, build_number).build()
