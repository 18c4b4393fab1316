#!/usr/bin/env bash
# Creates (once) the project's virtual environment in .venv and installs the
# package with its test extras.  Sourced by demo.sh and test.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
# A non-editable install puts the plugin into Volatility's plugin namespace, so
# `vol windows.kcbwait` works without -p; tests still load the checkout's copy via -p.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$root[test]"
