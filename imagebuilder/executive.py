"""EPROCESS and ETHREAD, written field by field through the kernel's symbol table."""

from __future__ import annotations

from imagebuilder.kernel_layout import Kernel
from imagebuilder.process_layout import FILETIME_2024
from imagebuilder.regions import PROCESS_LIST, Owner, RegionMap, thread_list

PROCESS_OBJECT, THREAD_OBJECT = 3, 6  # KOBJECTS: the dispatcher-header Type


def link_threads(kernel: Kernel, eproc: int, ethreads: list[int]) -> None:
    """Both thread rings of a process: EPROCESS.ThreadListHead (ETHREAD.ThreadListEntry) and
    KPROCESS.ThreadListHead (KTHREAD.ThreadListEntry); Pcb and Tcb sit at offset 0."""
    sym = kernel.symbols
    kernel.writer.list_ring(
        kernel.space,
        eproc + sym.offset("_EPROCESS", "ThreadListHead"),
        [t + sym.offset("_ETHREAD", "ThreadListEntry") for t in ethreads],
    )
    kernel.writer.list_ring(
        kernel.space,
        eproc + sym.offset("_KPROCESS", "ThreadListHead"),
        [t + sym.offset("_KTHREAD", "ThreadListEntry") for t in ethreads],
    )


def write_eprocess(
    kernel: Kernel,
    eproc: int,
    *,
    pid: int,
    ppid: int,
    name: str,
    dtb: int,
    peb: int,
    create_time: int,
    threads: list[int],
    wow64: int = 0,
) -> int:
    """Writes the EPROCESS and links its threads; returns the _EWOW64PROCESS block (or 0)."""
    k, sym = kernel, kernel.symbols
    k.writer.put(
        k.space,
        eproc,
        "_EPROCESS",
        {
            "Pcb.Header.Type": PROCESS_OBJECT,
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
    ewow = 0
    if wow64:
        field = sym.field("_EPROCESS", "WoW64Process")
        if field.type.get("subtype", {}).get("name") == "_EWOW64PROCESS":
            ewow = k.pool_object("_EWOW64PROCESS", b"PsWo")
            k.writer.put(
                k.space, ewow, "_EWOW64PROCESS", {"Peb": wow64, "Machine": 0x14C}, optional=True
            )
            wow64 = ewow
        k.writer.put(k.space, eproc, "_EPROCESS", {"WoW64Process": wow64})
    link_threads(kernel, eproc, threads)
    return ewow


def write_ethread(
    kernel: Kernel,
    ethread: int,
    *,
    sequence: int,
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
    """Writes the ETHREAD (``stack``: KTHREAD stack fields); ``sequence`` orders CreateTime."""
    k, sym = kernel, kernel.symbols
    values = {f"Tcb.{name}": value for name, value in stack.items()}
    values.update(
        {
            "Tcb.Header.Type": THREAD_OBJECT,
            "Tcb.Teb": teb,
            "Tcb.Process": eproc,
            "Tcb.ApcState.Process": eproc,
            "Tcb.State": sym.enum_value("_KTHREAD_STATE", state),
            "Tcb.WaitReason": sym.enum_value("_KWAIT_REASON", wait_reason),
            "Tcb.PreviousMode": 1 if user else 0,
            "Cid.UniqueProcess": pid,
            "Cid.UniqueThread": tid,
            "CreateTime.QuadPart": FILETIME_2024 + 10_000_000 * (60 + sequence),
            "ExitTime.QuadPart": exit_time,
            "StartAddress": start,
            "Win32StartAddress": start,
        }
    )
    k.writer.put(k.space, ethread, "_ETHREAD", values, optional=True)


def record_eprocess(
    regions: RegionMap, kernel: Kernel, eproc: int, pid: int, ewow: int = 0
) -> None:
    """The EPROCESS for its process, its three list links for the lists they belong to."""
    sym = kernel.symbols
    holes: list[tuple[Owner, int, int]] = [
        (("link", PROCESS_LIST, pid), eproc + sym.offset("_EPROCESS", "ActiveProcessLinks"), 16),
        (
            ("link", thread_list(pid), "ethread-head"),
            eproc + sym.offset("_EPROCESS", "ThreadListHead"),
            16,
        ),
        (
            ("link", thread_list(pid), "kthread-head"),
            eproc + sym.offset("_KPROCESS", "ThreadListHead"),
            16,
        ),
    ]
    regions.add_excluding(("process", pid), kernel.space, eproc, sym.size("_EPROCESS"), holes)
    regions.add_target("eprocess", kernel.space, eproc, sym.size("_EPROCESS"))
    for _owner, address, size in holes:
        regions.add_target("list_link", kernel.space, address, size)
    if ewow:
        regions.add_virtual(("process", pid), kernel.space, ewow, sym.size("_EWOW64PROCESS"))


def record_ethread(regions: RegionMap, kernel: Kernel, ethread: int, pid: int, tid: int) -> None:
    """The ETHREAD for its thread, its two list links for the thread lists."""
    sym = kernel.symbols
    node: Owner = ("link", thread_list(pid), tid)
    holes = [
        (node, ethread + sym.offset("_ETHREAD", "ThreadListEntry"), 16),
        (node, ethread + sym.offset("_KTHREAD", "ThreadListEntry"), 16),
    ]
    regions.add_excluding(("thread", pid, tid), kernel.space, ethread, sym.size("_ETHREAD"), holes)
    regions.add_target("kthread", kernel.space, ethread, sym.size("_KTHREAD"))
    for _owner, address, size in holes:
        regions.add_target("list_link", kernel.space, address, size)
