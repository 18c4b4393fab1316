"""Run Volatility plugins in-process on an image and return their rows as JSON-like dicts.

A thin wrapper over :mod:`kcbwait_batch.framework_runner`, the project's one implementation
of driving the framework (the batch command uses the same code): offline, a private cache,
and the checkout's ``volatility_plugins`` first on the plugin path, so the tests exercise the
plugin as checked out.  Rows have the JSON renderer's shape: column name -> value, absent
values as None, children under ``__children``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kcbwait_batch import framework_runner

PLUGIN_DIR = Path(__file__).resolve().parents[2] / "volatility_plugins"


def config(symbol_dirs: list[Path]) -> framework_runner.FrameworkConfig:
    """The framework settings every in-process test run uses."""
    return framework_runner.FrameworkConfig(
        symbol_dirs=tuple(str(Path(d).resolve()) for d in symbol_dirs),
        plugin_dirs=(str(PLUGIN_DIR),),
        offline=True,
        private_cache=True,
    )


def run_plugin(
    image: Path, plugin: str, symbol_dirs: list[Path], options: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Run ``plugin`` (e.g. ``windows.pslist.PsList``) on ``image``; rows as nested dicts.

    Volatility's exceptions propagate (``UnsatisfiedException`` when the image does not
    satisfy the plugin's requirements).
    """
    return framework_runner.run_plugin(image, plugin, config(symbol_dirs), options)
