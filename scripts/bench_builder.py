"""Benchmark: build time and image size of the large generated scenario.

    .venv/bin/python scripts/bench_builder.py [--processes 400] [--threads 50] [--profile lab]

Prints one table row per phase; the image is written to a temporary directory and removed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imagebuilder.build import build_image  # noqa: E402
from imagebuilder.generate import generate_scenario  # noqa: E402
from imagebuilder.isf import SymbolTable  # noqa: E402
from imagebuilder.profiles import resolve  # noqa: E402
from imagebuilder.scenario import parse_scenario  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=400)
    parser.add_argument("--threads", type=int, default=50)
    parser.add_argument("--callback-share", type=float, default=0.2)
    parser.add_argument("--profile", default="lab")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        t0 = time.perf_counter()
        scenario = parse_scenario(generate_scenario(args.processes, args.threads,
                                                    args.callback_share))
        profile = resolve(args.profile, out)
        symbols = SymbolTable.load(profile.isf_path)
        t1 = time.perf_counter()
        image = build_image(scenario, symbols, profile.build)
        t2 = time.perf_counter()
        raw = image.write(out, "large", ("raw",))["raw"]
        t3 = time.perf_counter()
        dmp = image.write(out, "large", ("dmp",))["dmp"]
        t4 = time.perf_counter()
        threads = args.processes * args.threads
        print(f"scenario: {args.processes} processes x {args.threads} threads = {threads} "
              f"threads, {args.callback_share:.0%} in callbacks, profile {profile.name}")
        print("| phase | seconds |\n|---|---|")
        print(f"| generate + parse scenario, load table | {t1 - t0:.2f} |")
        print(f"| lay out memory | {t2 - t1:.2f} |")
        print(f"| write raw (sparse) | {t3 - t2:.2f} |")
        print(f"| write crash dump | {t4 - t3:.2f} |")
        used = len(image.memory.pages) * 4096
        print(f"\nphysical size {scenario.memory_mb} MiB; pages used {used / 2**20:.0f} MiB; "
              f"raw on disk {raw.stat().st_blocks * 512 / 2**20:.0f} MiB; "
              f"crash dump {dmp.stat().st_size / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
