"""Benchmark: windows.kcbwait and windows.kcbstack against windows.threads (and
windows.suspended_threads), with MemProcFS beside them.

    .venv/bin/python scripts/bench_plugins.py [--threads 1000 5000 20000]
        [--shares 0.01 0.2] [--runs 3] [--profile 19041] [--out build/bench]
        [--plugins kcbwait kcbstack threads suspended_threads memprocfs]

For each builder image (processes and threads per process scaled together, a share of the
threads inside callbacks) and each plugin, alternating plugins within each run:
1. end to end: wall time and peak RSS of the `vol` command;
2. analysis only: in a fresh interpreter, Volatility's automagic runs untimed, then only the
   TreeGrid population is timed (so the shared kernel-finding cost does not hide the
   plugin's own).
MemProcFS (the peer engine, tests/support/memprocfs_runner.py in a child process, offline)
on the same images in the same runs: end to end is the child's wall time and peak RSS;
"init" is opening the image (Vmm with -waitinitialize: kernel, processes); "analysis" is
thread enumeration with the trap frames' Rip/Rsp of every process plus the call stacks of
the callback threads (the truth file names them), the two also shown apart.  MemProcFS reads
only kernels its info.db knows: a real-table profile other than 20348, not the lab table.
Medians over the runs go to OUT/results.md (a Markdown table with the ratios kcbwait/threads
and kcbstack/threads)
and OUT/results.json; OUT/plugins.png plots threads against seconds, one line per plugin.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PLUGINS = {
    "kcbwait": "windows.kcbwait.KcbWait",
    "kcbstack": "windows.kcbstack.KcbStack",
    "threads": "windows.threads.Threads",
    "suspended_threads": "windows.suspended_threads.SuspendedThreads",
}
# Plugins of this project: their analysis is compared with windows.threads'.
OURS = ("kcbwait", "kcbstack")
# Engines other than Volatility, measured by their own runner.
PEERS = ("memprocfs",)


def shape(threads: int) -> tuple[int, int]:
    """Processes x threads per process, both growing with the total (400 x 50 at 20,000)."""
    processes = max(1, round(math.sqrt(threads * 8)))
    return processes, max(1, round(threads / processes))


def build_images(sizes: list[int], shares: list[float], profile_name: str, out: Path):
    from imagebuilder.build import build_image
    from imagebuilder.generate import generate_scenario
    from imagebuilder.isf import SymbolTable
    from imagebuilder.profiles import resolve
    from imagebuilder.scenario import parse_scenario

    profile = resolve(profile_name, out)
    symbols = SymbolTable.load(profile.isf_path)
    images = []
    for size in sizes:
        for share in shares:
            processes, per_process = shape(size)
            stem = f"bench-{processes}x{per_process}-{round(share * 100)}pct-{profile.name}"
            raw = out / "images" / f"{stem}.raw"
            if not raw.exists():
                data = generate_scenario(processes, per_process, share, seed=size)
                image = build_image(parse_scenario(data), symbols, profile.build)
                image.write(out / "images", stem, ("raw",))
            truth = json.loads((out / "images" / f"{stem}.truth.json").read_text())
            callbacks = [t["tid"] for t in truth["threads"] if t["nesting_level"]]
            images.append(
                {
                    "threads": processes * per_process,
                    "share": share,
                    "raw": raw,
                    "callbacks": callbacks,
                }
            )
    return images, profile.symbols_dir


def vol_command(image: Path, plugin: str, symbols: Path, cache: Path) -> list[str]:
    vol = Path(sys.executable).with_name("vol")
    return [
        str(vol),
        "-q",
        "--offline",
        "--cache-path",
        str(cache),
        "-s",
        str(symbols),
        "-p",
        str(ROOT / "volatility_plugins"),
        "-f",
        str(image),
        "-r",
        "json",
        plugin.rsplit(".", 1)[0],
    ]


def run_measured(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child process; its output is discarded."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # wait4 reaps the child and returns its own resource usage (ru_maxrss in KiB on Linux).
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command)} failed with status {proc.returncode}")
    return wall, usage.ru_maxrss / 1024


def run_memprocfs(image: dict) -> tuple[float, float, dict]:
    """(wall seconds, peak RSS MiB, the runner's timings) of MemProcFS on one image."""
    from tests.support import memprocfs_peer

    peer = memprocfs_peer.environment()
    command = [peer.python, str(memprocfs_peer.RUNNER), str(image["raw"]), "--summary"]
    if image["callbacks"]:
        command += ["--callstacks", ",".join(map(str, image["callbacks"]))]
    started = time.perf_counter()
    proc = subprocess.Popen(
        command, env=peer.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    lines = [line for line in out.splitlines() if line.startswith("{")]
    data = json.loads(lines[-1]) if lines else {"error": f"no output: {out[-500:]}"}
    if os.waitstatus_to_exitcode(status) or "error" in data:
        raise RuntimeError(f"MemProcFS failed on {image['raw']}: {data.get('error')}")
    return wall, usage.ru_maxrss / 1024, data


def analysis_child(image: str, plugin: str, symbols: str, cache: str) -> None:
    """Child mode: automagic untimed, then time the TreeGrid population only."""
    from kcbwait_batch import framework_runner as fr

    fr.prepare(
        fr.FrameworkConfig(
            symbol_dirs=(symbols,),
            plugin_dirs=(str(ROOT / "volatility_plugins"),),
            offline=True,
            cache_path=cache,
        )
    )
    grid = fr.construct(Path(image), fr.plugin_class(plugin)).run()
    rows = 0

    def visit(node, acc):
        nonlocal rows
        rows += 1

    started = time.perf_counter()
    grid.populate(visit, None)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "rows": rows, "rss_mib": peak}))


def measure(images, symbols: Path, plugins: list[str], runs: int, cache: Path) -> list[dict]:
    results = []
    for image in images:
        samples: dict[str, dict[str, list[float]]] = {
            p: {
                "e2e": [],
                "e2e_rss": [],
                "analysis": [],
                "analysis_rss": [],
                "init": [],
                "threads": [],
                "callstacks": [],
            }
            for p in plugins
        }
        for run in range(runs):
            order = plugins if run % 2 == 0 else list(reversed(plugins))
            for name in order:
                if name == "memprocfs":
                    wall, rss, data = run_memprocfs(image)
                    s = samples[name]
                    s["e2e"].append(wall)
                    s["e2e_rss"].append(rss)
                    s["init"].append(data["init_seconds"])
                    s["threads"].append(data["threads_seconds"])
                    s["callstacks"].append(data["callstacks_seconds"])
                    s["analysis"].append(data["threads_seconds"] + data["callstacks_seconds"])
                    s["analysis_rss"].append(rss)
                    print(
                        f"  {image['threads']:>6} threads {image['share']:>4.0%} {name:<18} "
                        f"run {run + 1}: e2e {wall:6.2f}s {rss:6.0f} MiB, init "
                        f"{data['init_seconds']:6.2f}s, threads {data['threads_seconds']:6.2f}s,"
                        f" {len(image['callbacks'])} call stacks "
                        f"{data['callstacks_seconds']:6.2f}s",
                        flush=True,
                    )
                    continue
                plugin = PLUGINS[name]
                wall, rss = run_measured(vol_command(image["raw"], plugin, symbols, cache))
                samples[name]["e2e"].append(wall)
                samples[name]["e2e_rss"].append(rss)
                child = [
                    sys.executable,
                    __file__,
                    "--child",
                    str(image["raw"]),
                    plugin,
                    str(symbols),
                    str(cache),
                ]
                done = subprocess.run(child, capture_output=True, text=True, check=False)
                if done.returncode:
                    raise RuntimeError(f"{name} failed on {image['raw']}:\n{done.stderr[-2000:]}")
                out = done.stdout
                data = json.loads(out.strip().splitlines()[-1])
                samples[name]["analysis"].append(data["seconds"])
                samples[name]["analysis_rss"].append(data["rss_mib"])
                print(
                    f"  {image['threads']:>6} threads {image['share']:>4.0%} {name:<18} "
                    f"run {run + 1}: e2e {wall:6.2f}s {rss:6.0f} MiB, "
                    f"analysis {data['seconds']:6.2f}s",
                    flush=True,
                )
        for name in plugins:
            s = samples[name]
            results.append(
                {
                    "threads": image["threads"],
                    "share": image["share"],
                    "plugin": name,
                    "e2e_s": statistics.median(s["e2e"]),
                    "e2e_rss_mib": max(s["e2e_rss"]),
                    "analysis_s": statistics.median(s["analysis"]),
                    "analysis_rss_mib": max(s["analysis_rss"]),
                    "runs": runs,
                    **{
                        f"{part}_s": statistics.median(s[part])
                        for part in ("init", "threads", "callstacks")
                        if s[part]
                    },
                }
            )
    return results


def table(results: list[dict]) -> str:
    lines = [
        "| threads | in callbacks | plugin | end to end (s) | peak RSS (MiB) "
        "| analysis (s) | analysis us/thread | analysis / threads' | RSS / threads' "
        "| init (s) | thread list (s) | call stacks (s) |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    index = {(r["threads"], r["share"], r["plugin"]): r for r in results}
    for r in results:
        base = index.get((r["threads"], r["share"], "threads"))
        ratio = rss_ratio = ""
        if r["plugin"] in OURS and base:
            ratio = f"{r['analysis_s'] / base['analysis_s']:.2f}"
            rss_ratio = f"{r['e2e_rss_mib'] / base['e2e_rss_mib']:.2f}"
        lines.append(
            f"| {r['threads']} | {r['share']:.0%} | {r['plugin']} | {r['e2e_s']:.2f} "
            f"| {r['e2e_rss_mib']:.0f} | {r['analysis_s']:.2f} "
            f"| {1e6 * r['analysis_s'] / r['threads']:.0f} | {ratio} | {rss_ratio} "
            + "".join(
                f"| {r[part]:.2f} " if part in r else "| "
                for part in ("init_s", "threads_s", "callstacks_s")
            )
            + "|"
        )
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return False
    shares = sorted({r["share"] for r in results})
    fig, axes = plt.subplots(1, len(shares), figsize=(6 * len(shares), 4.5), squeeze=False)
    for ax, share in zip(axes[0], shares, strict=True):
        for plugin in [*PLUGINS, *PEERS]:
            points = sorted(
                (r["threads"], r["analysis_s"])
                for r in results
                if r["plugin"] == plugin and r["share"] == share
            )
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=plugin)
        ax.set_title(f"analysis only, {share:.0%} of threads in callbacks")
        ax.set_xlabel("threads")
        ax.set_ylabel("seconds (median)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        analysis_child(*sys.argv[2:6])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--build":
        sizes, shares, profile, out = json.loads(sys.argv[2])
        images, symbols = build_images(sizes, shares, profile, Path(out))
        print(
            json.dumps(
                {"images": [{**i, "raw": str(i["raw"])} for i in images], "symbols": str(symbols)}
            )
        )
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--shares", type=float, nargs="+", default=[0.01, 0.2])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--plugins", nargs="+", default=[*PLUGINS, *PEERS], choices=[*PLUGINS, *PEERS]
    )
    parser.add_argument(
        "--profile", default="19041", help="lab or a real table (MemProcFS: not lab, 20348)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "bench")
    args = parser.parse_args()
    if "memprocfs" in args.plugins and args.profile in ("lab", "20348"):
        print(f"MemProcFS has no structure offsets for profile {args.profile}: left out")
        args.plugins = [p for p in args.plugins if p != "memprocfs"]
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / "cache"
    cache.mkdir(exist_ok=True)
    # Images are built in a child process: a forked child's peak RSS includes what its parent
    # held at fork time, so the measuring parent must stay small.
    built = subprocess.run(
        [
            sys.executable,
            __file__,
            "--build",
            json.dumps([args.threads, args.shares, args.profile, str(args.out)]),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    listing = json.loads(built.strip().splitlines()[-1])
    images = [{**i, "raw": Path(i["raw"])} for i in listing["images"]]
    volatility = [p for p in args.plugins if p in PLUGINS]
    symbols = Path(listing["symbols"])
    # One untimed run fills Volatility's symbol identifier cache.
    if volatility:
        run_measured(vol_command(images[0]["raw"], PLUGINS["threads"], symbols, cache))
    results = measure(images, symbols, args.plugins, args.runs, cache)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    text = table(results)
    (args.out / "results.md").write_text(text)
    print("\n" + text)
    if plot(results, args.out / "plugins.png"):
        print(f"plot: {args.out / 'plugins.png'}")


if __name__ == "__main__":
    main()
