#!/usr/bin/env bash
# Runs the whole test suite (lint included) in the project's virtual environment.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
.venv/bin/ruff check volatility_plugins imagebuilder kcbwait_batch tests scripts
# The plugin package runs inside Volatility on every Python it supports (3.8+); the tools
# (builder, batch) need 3.10.  vermin fails on any construct newer than the target.
.venv/bin/vermin --target=3.8- --no-tips --violations --backport dataclasses volatility_plugins
.venv/bin/python -m pytest -q "$@"
