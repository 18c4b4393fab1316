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
# MemProcFS (the peer engine of the `peer` tests and the benchmark) loads libusb-1.0.so.0.
# Without it on the system, unpack the Debian package into .deps/libusb (no root needed);
# tests/support/memprocfs_peer.py looks there.  Done once: fast when present.
libusb_dir="$root/.deps/libusb"
if ! { ldconfig -p 2>/dev/null | grep -q 'libusb-1\.0\.so\.0'; } \
        && [ ! -e "$libusb_dir/usr/lib/x86_64-linux-gnu/libusb-1.0.so.0" ]; then
    download="$(mktemp -d)"
    if (cd "$download" && apt-get download libusb-1.0-0 >/dev/null 2>&1); then
        mkdir -p "$libusb_dir"
        dpkg -x "$download"/libusb-1.0-0_*.deb "$libusb_dir"
    else
        echo "bootstrap: could not download libusb-1.0-0; the peer tests will fail" >&2
    fi
    rm -rf "$download"
fi
