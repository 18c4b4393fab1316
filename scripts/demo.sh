#!/usr/bin/env bash
# Builds the demo image (lab kernel profile, testdata/scenarios/basic.json) and runs
# `vol ... windows.kcbwait` on it, with the plugin installed into the virtual environment.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
out="$root/build/demo"
mkdir -p "$out/cache"
"$root/.venv/bin/kcbwait-build-image" build "$root/testdata/scenarios/basic.json" \
    --profile lab --out "$out" --stem demo
"$root/.venv/bin/vol" --offline --cache-path "$out/cache" -q -s "$out/symbols" \
    -f "$out/demo.raw" windows.kcbwait "$@"
