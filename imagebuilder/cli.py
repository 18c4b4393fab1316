"""``kcbwait-build-image``: build synthetic Windows memory images from scenarios.

kcbwait-build-image build SCENARIO.json [--profile lab|14393|...|22000] [--out DIR]
                    [--format raw] [--format dmp]
kcbwait-build-image generate --processes 400 --threads 50 [--callback-share 0.2] -o S.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from imagebuilder.build import build_image
from imagebuilder.generate import generate_scenario
from imagebuilder.isf import IsfError, SymbolTable
from imagebuilder.memory import OutOfMemory
from imagebuilder.profiles import ProfileError, resolve
from imagebuilder.scenario import ScenarioError, load_scenario


def _build(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    scenario = load_scenario(args.scenario)
    profile = resolve(args.profile, args.out)
    image = build_image(scenario, SymbolTable.load(profile.isf_path), profile.build)
    stem = args.stem or f"{scenario.name}-{profile.name}"
    paths = image.write(args.out, stem, tuple(args.formats or ["raw"]))
    elapsed = time.perf_counter() - started
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    print(f"symbols: {profile.symbols_dir}")
    threads = sum(len(p.threads) for p in scenario.processes)
    print(
        f"built {len(scenario.processes)} processes, {threads} threads in {elapsed:.2f}s; "
        f"{len(image.memory.pages) * 4} KiB of {scenario.memory_mb} MiB used"
    )
    return 0


def _generate(args: argparse.Namespace) -> int:
    data = generate_scenario(
        args.processes,
        args.threads,
        args.callback_share,
        args.at_return_share,
        args.max_nesting,
        args.seed,
    )
    text = json.dumps(data, indent=1) + "\n"
    if args.output:
        args.output.write_text(text)
        print(f"scenario: {args.output}")
    else:
        sys.stdout.write(text)
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="kcbwait-build-image",
        description="Build synthetic Windows x64 memory images and their ground-truth files.",
    )
    sub = top.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build an image from a scenario")
    build.add_argument("scenario", type=Path, help="scenario JSON file")
    build.add_argument(
        "--profile",
        default="lab",
        help="kernel symbol table: 'lab' or a build number (14393 ... 22000)",
    )
    build.add_argument("--out", type=Path, default=Path("build/images"), help="output directory")
    build.add_argument(
        "--format",
        dest="formats",
        action="append",
        choices=("raw", "dmp"),
        help="image format; repeat for both (default raw)",
    )
    build.add_argument("--stem", help="output file name stem (default SCENARIO-PROFILE)")
    build.set_defaults(func=_build)
    gen = sub.add_parser("generate", help="write a large generated scenario")
    gen.add_argument("--processes", type=int, default=400)
    gen.add_argument("--threads", type=int, default=50, help="threads per process")
    gen.add_argument(
        "--callback-share", type=float, default=0.2, help="share of threads inside callbacks (0..1)"
    )
    gen.add_argument(
        "--at-return-share",
        type=float,
        default=0.5,
        help="share of those resting at ZwCallbackReturn (0..1)",
    )
    gen.add_argument("--max-nesting", type=int, default=3)
    gen.add_argument("--seed", type=int, default=1)
    gen.add_argument("-o", "--output", type=Path, help="scenario file (default stdout)")
    gen.set_defaults(func=_generate)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (ScenarioError, ProfileError, IsfError, OutOfMemory, OSError) as exc:
        print(f"kcbwait-build-image: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
