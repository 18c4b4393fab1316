#!/usr/bin/env bash
# Runs the whole test suite (lint included) in the project's virtual environment.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
.venv/bin/ruff check volatility_plugins imagebuilder kcbwait_batch tests scripts
.venv/bin/python -m pytest -q "$@"
