"""Scenario generator for large images: many processes, many threads, a share in callbacks."""

from __future__ import annotations

import random
from typing import Any

from imagebuilder.user_modules import WIN32U_SYSCALLS

_GUI_MODULES = ["ntdll.dll", "kernel32.dll", "win32u.dll", "user32.dll"]
_WAITS = [
    "NtWaitForSingleObject",
    "NtWaitForMultipleObjects",
    "NtDelayExecution",
    "NtRemoveIoCompletion",
    "NtUserGetMessage",
]
# Physical memory a thread costs at most: user stack pages, TEB, kernel stack pages per
# callout level and page tables, with room to spare (pages are only written where used).
_BYTES_PER_THREAD = 48 * 1024
_BYTES_PER_LEVEL = 12 * 1024


def generate_scenario(
    processes: int = 400,
    threads_per_process: int = 50,
    callback_share: float = 0.2,
    at_return_share: float = 0.5,
    max_nesting: int = 3,
    seed: int = 1,
    name: str | None = None,
) -> dict[str, Any]:
    """A scenario (as JSON data) with ``processes`` x ``threads_per_process`` user threads.

    ``callback_share`` of the threads are inside 1..``max_nesting`` callbacks; of those,
    ``at_return_share`` rest at ZwCallbackReturn.  Same arguments, same scenario.
    """
    rng = random.Random(seed)
    procs = []
    levels_total = 0
    tid = 1000
    for index in range(processes):
        pid = 1000 + 4 * threads_per_process * 2 * index + 4 * index
        threads = []
        for _ in range(threads_per_process):
            tid += 4
            if tid == pid:
                tid += 4
            thread: dict[str, Any] = {
                "tid": tid,
                "wait": rng.choice(_WAITS),
                "wait_reason": "UserRequest",
            }
            if rng.random() < callback_share:
                depth = rng.randint(1, max_nesting)
                levels_total += depth
                thread["callbacks"] = [
                    {
                        "api": rng.randrange(0, 100),
                        "syscall": rng.choice(WIN32U_SYSCALLS),
                        "length": 8 * rng.randint(1, 16),
                    }
                    for _ in range(depth)
                ]
                if rng.random() < at_return_share:
                    thread["wait"] = "ZwCallbackReturn"
            threads.append(thread)
        procs.append(
            {
                "pid": pid,
                "name": f"app{index:04d}.exe",
                "ppid": 4,
                "modules": _GUI_MODULES,
                "threads": threads,
            }
        )
    threads_total = processes * threads_per_process
    memory = 64 * 2**20 + threads_total * _BYTES_PER_THREAD + levels_total * _BYTES_PER_LEVEL
    return {
        "name": name or f"large-{processes}x{threads_per_process}",
        "seed": seed,
        "memory_mb": (memory + 2**20 - 1) // 2**20,
        "processes": procs,
    }
