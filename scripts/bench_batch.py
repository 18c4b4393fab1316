"""Benchmark: kcbwait-batch throughput (images per minute) locally and on a Dask cluster.

    .venv/bin/python scripts/bench_batch.py [--images 16] [--processes 40] [--threads 20]
                                            [--format raw|dmp] [--scheduler tcp://HOST:PORT]

Builds ``--images`` different images from generated scenarios (lab profile, one seed each),
then runs the same batch, end to end as a user would (``python -m kcbwait_batch``), with 1
and 2 local worker processes and on a Dask cluster: the one at ``--scheduler`` if given
(images must then be at the same paths on its workers), else a loopback cluster of two
one-thread workers started here.  Every run must give the same records; the script prints a
table of wall time and images per minute.  Images and outputs go to a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from imagebuilder.build import build_image  # noqa: E402
from imagebuilder.generate import generate_scenario  # noqa: E402
from imagebuilder.isf import SymbolTable  # noqa: E402
from imagebuilder.profiles import lab_profile  # noqa: E402
from imagebuilder.scenario import parse_scenario  # noqa: E402
from kcbwait_batch.loopback_cluster import LoopbackCluster  # noqa: E402


def build_images(out: Path, count: int, processes: int, threads: int, fmt: str) -> Path:
    """``count`` images in ``out``; returns the symbols directory."""
    profile = lab_profile(out / "symbols")
    table = SymbolTable.load(profile.isf_path)
    for seed in range(1, count + 1):
        data = generate_scenario(processes, threads, 0.2, seed=seed, name=f"bench-{seed:03d}")
        image = build_image(parse_scenario(data), table, profile.build)
        image.write(out / "images", f"bench-{seed:03d}", (fmt,))
    return profile.symbols_dir


def run_batch(name: str, images: Path, symbols: Path, work: Path, *extra: str) -> dict:
    """One end-to-end batch run; wall time and the records (without run-dependent parts)."""
    out = work / f"{name}.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "kcbwait_batch", str(images), "-s", str(symbols),
            "--offline", "--cache-path", str(work / "cache"), "--out", str(out), "-q", *extra]
    started = time.perf_counter()
    result = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{name}: kcbwait-batch exited {result.returncode}:\n{result.stderr}")
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    statuses = [r for r in recs if r["record"] == "image"]
    return {
        "wall": wall,
        "images": len(statuses),
        "threads": sum(s["threads"] for s in statuses),
        "analysis": sum(s["run"]["seconds"] for s in statuses),
        "records": sorted(json.dumps({k: v for k, v in r.items() if k != "run"}) for r in recs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--processes", type=int, default=40, help="processes per image")
    parser.add_argument("--threads", type=int, default=20, help="threads per process")
    parser.add_argument("--format", choices=("raw", "dmp"), default="raw")
    parser.add_argument("--scheduler", help="existing Dask scheduler (default: loopback cluster)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kcbwait-bench-batch-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        symbols = build_images(work, args.images, args.processes, args.threads, args.format)
        built = time.perf_counter() - started
        images = work / "images"
        print(f"{args.images} {args.format} images, {args.processes} processes x {args.threads} "
              f"threads each (20% in callbacks), lab profile; built in {built:.1f}s; "
              f"{os.cpu_count()} CPUs")
        runs = {
            "local, 1 worker process": run_batch("local1", images, symbols, work, "-j", "1"),
            "local, 2 worker processes": run_batch("local2", images, symbols, work, "-j", "2"),
        }
        if args.scheduler:
            runs[f"Dask at {args.scheduler}"] = run_batch(
                "dask", images, symbols, work, "--scheduler", args.scheduler)
        else:
            up = time.perf_counter()
            with LoopbackCluster(workers=2, threads=1) as cluster:
                print(f"loopback Dask cluster up in {time.perf_counter() - up:.1f}s "
                      "(not counted below)")
                runs["Dask, loopback, 2 workers x 1 thread"] = run_batch(
                    "dask", images, symbols, work, "--scheduler", cluster.address)
                down = time.perf_counter()
            print(f"loopback Dask cluster stopped in {time.perf_counter() - down:.1f}s")
        reference = next(iter(runs.values()))["records"]
        assert all(r["records"] == reference for r in runs.values()), "outputs differ"
        print("\n| mode | wall s | images/minute | analysis s (sum) | threads reported |")
        print("|---|---|---|---|---|")
        for name, run in runs.items():
            rate = run["images"] * 60 / run["wall"]
            print(f"| {name} | {run['wall']:.1f} | {rate:.1f} | {run['analysis']:.1f} "
                  f"| {run['threads']} |")
        print("\nwall: whole command (start-up, analysis processes' start, writing); every "
              "mode produced the same records.")


if __name__ == "__main__":
    main()
