"""Run Volatility plugins in-process on an image and return their rows as JSON-like dicts.

Driving the framework directly (as Volatility's own CLI does, minus argument parsing) makes
each run cost the analysis, not an interpreter start-up, so tests can afford many images.
Rows have the JSON renderer's shape: column name -> value, absent values as None, children
under ``__children``.
"""

from __future__ import annotations

import datetime
import tempfile
from pathlib import Path
from typing import Any

import volatility3.plugins
import volatility3.symbols
from volatility3 import framework
from volatility3.framework import automagic, constants, contexts, interfaces, plugins
from volatility3.framework.automagic import stacker
from volatility3.framework.configuration import requirements
from volatility3.framework.renderers import format_hints

PLUGIN_DIR = Path(__file__).resolve().parents[2] / "volatility_plugins"
_CACHE = tempfile.mkdtemp(prefix="kcbwait-volcache-")
_prepared: tuple[str, ...] | None = None


def _prepare(symbol_dirs: tuple[str, ...]) -> None:
    global _prepared
    if _prepared == symbol_dirs:
        return
    framework.require_interface_version(2, 0, 0)
    constants.OFFLINE = True
    constants.CACHE_PATH = _CACHE
    constants.PARALLELISM = constants.Parallelism.Off
    volatility3.plugins.__path__ = [str(PLUGIN_DIR), *constants.PLUGINS_PATH]
    volatility3.symbols.__path__ = [*symbol_dirs, *constants.SYMBOL_BASEPATHS]
    framework.import_files(volatility3.plugins, True)
    _prepared = symbol_dirs


def _value(value: Any) -> Any:
    if isinstance(value, interfaces.renderers.BaseAbsentValue):
        return None
    if isinstance(value, format_hints.Hex):
        return int(value)
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex(" ")
    return value


def run_plugin(
    image: Path, plugin: str, symbol_dirs: list[Path], options: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Run ``plugin`` (e.g. ``windows.pslist.PsList``) on ``image``; rows as nested dicts."""
    _prepare(tuple(str(Path(d).resolve()) for d in symbol_dirs))
    plugin_cls = framework.list_plugins()[plugin]
    ctx = contexts.Context()
    ctx.config["automagic.LayerStacker.single_location"] = (
        requirements.URIRequirement.location_from_file(str(image))
    )
    available = automagic.available(ctx)  # imports the stackers choose_os_stackers lists
    ctx.config["automagic.LayerStacker.stackers"] = stacker.choose_os_stackers(plugin_cls)
    for key, value in (options or {}).items():
        ctx.config[interfaces.configuration.path_join("plugins", plugin_cls.__name__, key)] = value
    automagics = automagic.choose_automagic(available, plugin_cls)
    constructed = plugins.construct_plugin(ctx, automagics, plugin_cls, "plugins", None, None)
    grid = constructed.run()
    columns = [c.name for c in grid.columns]
    roots: list[dict[str, Any]] = []
    by_path: dict[str, dict[str, Any]] = {}

    def visit(node: interfaces.renderers.TreeNode, acc: None) -> None:
        row = {name: _value(v) for name, v in zip(columns, node.values, strict=True)}
        row["__children"] = []
        parent = by_path.get(node.parent.path) if node.parent else None
        (parent["__children"] if parent is not None else roots).append(row)
        by_path[node.path] = row
        return acc

    grid.populate(visit, None)
    return roots
