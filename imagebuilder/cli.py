"""``kcbwait-build-image``: build synthetic Windows memory images from scenarios."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from imagebuilder.build import build_image
from imagebuilder.isf import IsfError, SymbolTable
from imagebuilder.memory import OutOfMemory
from imagebuilder.profiles import ProfileError, resolve
from imagebuilder.scenario import ScenarioError, load_scenario


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kcbwait-build-image",
        description="Build a synthetic Windows x64 memory image and its ground-truth file.",
    )
    parser.add_argument("scenario", type=Path, help="scenario JSON file")
    parser.add_argument(
        "--profile",
        default="lab",
        help="kernel symbol table: 'lab' or a build number (14393 ... 22000)",
    )
    parser.add_argument("--out", type=Path, default=Path("build/images"), help="output directory")
    parser.add_argument(
        "--format",
        dest="formats",
        action="append",
        choices=("raw", "dmp"),
        help="image format(s); default raw",
    )
    parser.add_argument("--stem", help="output file stem (default: scenario name + profile)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        scenario = load_scenario(args.scenario)
        profile = resolve(args.profile, args.out)
        image = build_image(scenario, SymbolTable.load(profile.isf_path), profile.build)
        stem = args.stem or f"{scenario.name}-{profile.name}"
        paths = image.write(args.out, stem, tuple(args.formats or ["raw"]))
    except (ScenarioError, ProfileError, IsfError, OutOfMemory, OSError) as exc:
        print(f"kcbwait-build-image: error: {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    print(f"symbols: {profile.symbols_dir}")
    print(f"built in {elapsed:.2f}s, {len(image.memory.pages)} pages used")
    return 0


if __name__ == "__main__":
    sys.exit(main())
