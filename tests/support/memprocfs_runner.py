"""Run MemProcFS on one image and print what it reads as JSON (one object on stdout).

python memprocfs_runner.py IMAGE [--callstacks TID,TID,...] [--summary] [--verbose]

Runs in its own process (tests/support/memprocfs_peer.py starts it with LD_LIBRARY_PATH set
for leechcore and libusb), so a crash in the native library cannot take pytest down.  Output:
{"init_seconds", "build", "processes": [{"pid", "ppid", "name", "threads": [{"tid",
"trap_frame", "rip", "rsp", "teb", "stack_base", "stack_limit", "state", "wait_reason"}]}],
"threads_seconds", "callstacks": {tid: [{"ret", "rsp", "base_sp", "type"}]},
"callstacks_seconds"}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("image")
    parser.add_argument("--callstacks", default="", help="comma-separated TIDs")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument(
        "--summary", action="store_true", help="counts and timings only (the benchmark)"
    )
    args = parser.parse_args(argv)
    try:
        import memprocfs
    except ImportError as exc:
        print(json.dumps({"error": f"import memprocfs failed: {exc}"}))
        return 3
    options = ["-device", f"file://{args.image}", "-disable-symbolserver", "-waitinitialize"]
    if args.verbose:
        options += ["-printf", "-v", "-vv"]
    started = time.perf_counter()
    try:
        vmm = memprocfs.Vmm(options)
    except Exception as exc:  # MemProcFS raises TypeError/RuntimeError on a refused image
        print(json.dumps({"error": f"MemProcFS refused the image: {exc}"}))
        return 2
    init_seconds = time.perf_counter() - started
    started = time.perf_counter()
    processes = []
    by_tid = {}
    for process in vmm.process_list():
        threads = []
        for t in process.maps.thread():
            threads.append(
                {
                    "tid": t["tid"],
                    "trap_frame": t.get("va-trapframe", 0),
                    "rip": t.get("reg-rip", 0),
                    "rsp": t.get("reg-rsp", 0),
                    "teb": t.get("va-teb", 0),
                    "stack_base": t.get("va-stackbase", 0),
                    "stack_limit": t.get("va-stacklimit", 0),
                    "kernel_stack_base": t.get("va-stackbase-kernel", 0),
                    "kernel_stack_limit": t.get("va-stacklimit-kernel", 0),
                    "state": t.get("state", 0),
                    "wait_reason": t.get("waitreason", 0),
                }
            )
            by_tid[t["tid"]] = process
        processes.append(
            {"pid": process.pid, "ppid": process.ppid, "name": process.name, "threads": threads}
        )
    threads_seconds = time.perf_counter() - started
    callstacks = {}
    started = time.perf_counter()
    for tid in filter(None, args.callstacks.split(",")):
        process = by_tid.get(int(tid))
        if process is None:
            continue
        try:
            frames = process.maps.thread_callstack(int(tid))
        except Exception as exc:
            callstacks[tid] = {"error": str(exc)}
            continue
        callstacks[tid] = [
            {
                "ret": f.get("va-retaddr", 0),
                "rsp": f.get("va-rsp", 0),
                "base_sp": f.get("va-base-sp", 0),
                "type": f.get("type", ""),
            }
            for f in frames
        ]
    callstacks_seconds = time.perf_counter() - started
    out = {
        "init_seconds": init_seconds,
        "build": vmm.kernel.build,
        "processes": processes,
        "threads_seconds": threads_seconds,
        "callstacks": callstacks,
        "callstacks_seconds": callstacks_seconds,
    }
    vmm.close()
    if args.summary:
        out["processes"] = len(processes)
        out["threads"] = sum(len(p["threads"]) for p in processes)
        out["callstacks"] = {
            "count": len(callstacks),
            "frames": sum(len(f) for f in callstacks.values() if isinstance(f, list)),
        }
    json.dump(out, sys.stdout, default=str)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
