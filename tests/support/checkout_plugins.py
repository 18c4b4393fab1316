"""Makes the checkout's plugin package the one ``volatility3.plugins.windows`` imports.

Volatility imports plugins as ``volatility3.plugins.<relpath>``, and an installed copy of this
project sits in that namespace too: unit tests must test the checkout, so its directories go
first on both package paths and any kcbwait module imported earlier is forgotten.
"""

from __future__ import annotations

import sys
from pathlib import Path

PLUGIN_DIR = str(Path(__file__).resolve().parents[2] / "volatility_plugins")
WINDOWS_DIR = str(Path(PLUGIN_DIR) / "windows")


def use_checkout_plugins() -> None:
    import volatility3.plugins
    import volatility3.plugins.windows

    if PLUGIN_DIR not in volatility3.plugins.__path__:
        volatility3.plugins.__path__.insert(0, PLUGIN_DIR)
    if WINDOWS_DIR not in volatility3.plugins.windows.__path__:
        volatility3.plugins.windows.__path__.insert(0, WINDOWS_DIR)
    for name in [m for m in sys.modules if m.startswith("volatility3.plugins.windows.kcb")]:
        if not getattr(sys.modules[name], "__file__", "") or not str(
            sys.modules[name].__file__
        ).startswith(WINDOWS_DIR):
            del sys.modules[name]
