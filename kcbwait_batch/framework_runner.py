"""Run a Volatility 3 plugin in-process on one image and return its rows as JSON-shaped dicts.

This is the one place in the project that drives the framework directly, the way Volatility's
own CLI does minus argument parsing: batch workers and the test suite both use it, so a run
costs the analysis and not an interpreter start-up.  Rows have the JSON renderer's shape:
column name -> value, absent values (unreadable or not applicable) as ``None``, ``Hex`` as a
plain int, child rows under ``__children``.

The framework keeps its settings in module globals (``constants``, the plugin and symbol
package paths), so :func:`prepare` configures the whole process; a worker process serves one
:class:`FrameworkConfig` for its lifetime (re-preparing with another configuration only
changes the symbol paths and cache; plugins, once imported, stay imported).
"""

from __future__ import annotations

import atexit
import datetime
import importlib
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import volatility3.plugins
import volatility3.symbols
from volatility3 import framework
from volatility3.framework import (
    automagic,
    constants,
    contexts,
    exceptions,
    interfaces,
    plugins,
)
from volatility3.framework.automagic import stacker
from volatility3.framework.configuration import requirements
from volatility3.framework.renderers import format_hints

from kcbwait_batch import kernel_identity, kernel_symbols, records

KCBWAIT_PLUGIN = "windows.kcbwait.KcbWait"
KCBSTACK_PLUGIN = "windows.kcbstack.KcbStack"
STACK_KEY = records.STACK_KEY

# A source checkout keeps the plugin in volatility_plugins/ beside this package; an installed
# package puts it straight into Volatility's own plugin namespace, where it is found anyway.
_CHECKOUT_PLUGINS = Path(__file__).resolve().parents[1] / "volatility_plugins"

Row = dict[str, Any]
StageCallback = Callable[[str], None]


def default_plugin_dirs() -> tuple[str, ...]:
    """The checkout's plugin directory when running from a source tree, else nothing."""
    if (_CHECKOUT_PLUGINS / "windows" / "kcbwait.py").is_file():
        return (str(_CHECKOUT_PLUGINS),)
    return ()


@dataclass(frozen=True)
class FrameworkConfig:
    """Process-wide Volatility settings for a run (what ``vol``'s global options set).

    The cache is ``cache_path`` if given; else, with ``private_cache``, a temporary directory
    of this process removed at exit (nothing leaks between runs: the tests' choice); else
    Volatility's own default on the machine that runs the analysis (``vol``'s choice, which
    keeps downloaded symbol tables between runs).
    """

    symbol_dirs: tuple[str, ...] = ()
    plugin_dirs: tuple[str, ...] = ()
    offline: bool = True
    cache_path: str | None = None
    private_cache: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "symbol_dirs": list(self.symbol_dirs),
            "plugin_dirs": list(self.plugin_dirs),
            "offline": self.offline,
            "cache_path": self.cache_path,
            "private_cache": self.private_cache,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FrameworkConfig:
        return cls(
            symbol_dirs=tuple(data.get("symbol_dirs", ())),
            plugin_dirs=tuple(data.get("plugin_dirs", ())),
            offline=bool(data.get("offline", True)),
            cache_path=data.get("cache_path"),
            private_cache=bool(data.get("private_cache", False)),
        )


class ImageError(Exception):
    """The image could not be analysed; the message is meant for the batch's status record."""


_prepared: FrameworkConfig | None = None
_DEFAULT_CACHE = constants.CACHE_PATH  # before any prepare() changes it
_plugin_paths_imported: set[str] = set()
_private_cache: str | None = None


def _private_cache_dir() -> str:
    global _private_cache
    if _private_cache is None:
        _private_cache = tempfile.mkdtemp(prefix="kcbwait-volcache-")
        atexit.register(shutil.rmtree, _private_cache, True)
    return _private_cache


def prepare(config: FrameworkConfig) -> None:
    """Configures the framework for ``config`` (cheap when already prepared for it)."""
    global _prepared
    if _prepared == config:
        return
    framework.require_interface_version(2, 0, 0)
    constants.OFFLINE = config.offline
    if config.cache_path:
        constants.CACHE_PATH = config.cache_path
    else:
        constants.CACHE_PATH = _private_cache_dir() if config.private_cache else _DEFAULT_CACHE
    # vol creates its cache directory before use; the framework itself does not.
    os.makedirs(constants.CACHE_PATH, exist_ok=True)
    # One image per process at a time: Volatility's own worker pool would only compete with
    # the batch's processes for the same cores.
    constants.PARALLELISM = constants.Parallelism.Off
    # The checkout's plugins are looked up where the analysis runs (a Dask worker may have
    # the package installed elsewhere than the client): user directories, then ours, then
    # Volatility's own, each once.
    plugin_path = list(
        dict.fromkeys(
            [*map(_absolute, config.plugin_dirs), *default_plugin_dirs(), *constants.PLUGINS_PATH]
        )
    )
    volatility3.plugins.__path__ = plugin_path
    _put_first_in_os_packages(plugin_path)
    volatility3.symbols.__path__ = [
        *map(_absolute, config.symbol_dirs),
        *constants.SYMBOL_BASEPATHS,
    ]
    key = "\0".join(plugin_path)
    if key not in _plugin_paths_imported:
        # Imports every plugin module found, as vol does; broken third-party plugins are
        # skipped (their failures are only listed at debug level) rather than fatal.
        framework.import_files(volatility3.plugins, True)
        _plugin_paths_imported.add(key)
    _prepared = config


def _absolute(path: str) -> str:
    return str(Path(path).resolve())


def _value(value: Any) -> Any:
    """A TreeGrid cell as the JSON renderer would write it."""
    if isinstance(value, interfaces.renderers.BaseAbsentValue):
        return None
    if isinstance(value, format_hints.Hex):
        return int(value)
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex(" ")
    return value


def plugin_class(name: str) -> type[interfaces.plugins.PluginInterface]:
    """The plugin class registered as ``name`` (e.g. ``windows.pslist.PsList``)."""
    try:
        return framework.list_plugins()[name]
    except KeyError:
        raise ImageError(
            f"plugin {name} is not available to Volatility (installed package, or a checkout's "
            "volatility_plugins directory on the plugin path?)"
        ) from None


def construct(
    image: Path | str,
    plugin_cls: type[interfaces.plugins.PluginInterface],
    options: dict[str, Any] | None = None,
) -> interfaces.plugins.PluginInterface:
    """Stacks ``image``'s layers, finds its kernel and symbols, and builds the plugin.

    Raises Volatility's ``UnsatisfiedException`` when the plugin's requirements cannot be
    met (not a Windows image, truncated, no matching symbol table), as ``vol`` sees it.
    """
    ctx = contexts.Context()
    ctx.config["automagic.LayerStacker.single_location"] = (
        requirements.URIRequirement.location_from_file(str(image))
    )
    # automagic.available() imports the layer modules that choose_os_stackers lists, so it
    # must run first or the stacker list comes back empty.
    available = automagic.available(ctx)
    ctx.config["automagic.LayerStacker.stackers"] = stacker.choose_os_stackers(plugin_cls)
    for key, value in (options or {}).items():
        ctx.config[interfaces.configuration.path_join("plugins", plugin_cls.__name__, key)] = value
    automagics = automagic.choose_automagic(available, plugin_cls)
    return plugins.construct_plugin(ctx, automagics, plugin_cls, "plugins", None, None)


def _put_first_in_os_packages(plugin_path: list[str]) -> None:
    """Makes ``DIR/windows`` (etc.) win over an installed copy of the same plugin.

    ``volatility3.plugins.windows`` is a regular package whose ``__path__`` was fixed when it
    was first imported, so ``volatility3.plugins.windows.kcbwait`` would always be the
    installed copy (``pip install .`` puts ours there too), never the checkout's, however the
    plugin path is ordered.
    """
    for name in ("windows", "linux", "mac"):
        package = importlib.import_module(f"volatility3.plugins.{name}")
        wanted = [
            os.path.join(d, name) for d in plugin_path if os.path.isdir(os.path.join(d, name))
        ]
        package.__path__[:] = list(dict.fromkeys([*wanted, *package.__path__]))


def _missing_table(image: Path | str) -> str:
    """Names the kernel's PDB GUID and age, so the investigator knows which table to supply."""
    pdb = kernel_symbols.find_kernel_pdb(Path(image))
    if pdb is None:
        return "no kernel symbol table matched (check --symbols and --offline)"
    return (
        f"no symbol table for kernel {pdb.name} GUID {pdb.guid} age {pdb.age}: put "
        f"windows/{pdb.name}/{pdb.table_stem}.json.xz under a --symbols directory, or run "
        "without --offline to download it"
    )


def _unsatisfied_message(error: exceptions.UnsatisfiedException, image: Path | str) -> str:
    """vol's explanation of unsatisfied requirements, in one line."""
    kinds = {type(req) for req in error.unsatisfied.values()}
    if requirements.TranslationLayerRequirement in kinds:
        why = "no Windows kernel layer found (not a Windows memory image, truncated, or unreadable)"
    elif requirements.SymbolTableRequirement in kinds:
        why = _missing_table(image)
    else:
        why = "plugin requirements not satisfied"
    return f"{why}; unsatisfied: {', '.join(sorted(error.unsatisfied))}"


def grid_rows(grid: interfaces.renderers.TreeGrid) -> list[Row]:
    """Populates ``grid`` and returns its rows as nested JSON-shaped dicts."""
    columns = [c.name for c in grid.columns]
    roots: list[Row] = []
    by_path: dict[str, Row] = {}

    def visit(node: interfaces.renderers.TreeNode, acc: None) -> None:
        row = {name: _value(v) for name, v in zip(columns, node.values, strict=True)}
        row["__children"] = []
        parent = by_path.get(node.parent.path) if node.parent else None
        (parent["__children"] if parent is not None else roots).append(row)
        by_path[node.path] = row
        return acc

    grid.populate(visit, None)
    return roots


def run_plugin(
    image: Path | str,
    plugin: str,
    config: FrameworkConfig,
    options: dict[str, Any] | None = None,
) -> list[Row]:
    """Runs ``plugin`` on ``image``; rows as nested dicts (see the module docstring).

    Volatility's exceptions propagate unchanged (``UnsatisfiedException`` for an image the
    plugin cannot run on)."""
    prepare(config)
    constructed = construct(image, plugin_class(plugin), options)
    return grid_rows(constructed.run())


@dataclass
class KcbwaitRun:
    """One image's windows.kcbwait output and what identifies the kernel it came from."""

    rows: list[Row]
    kernel: kernel_identity.KernelIdentity
    plugin_version: str
    volatility_version: str


def versions() -> tuple[str, str]:
    """(plugin version, Volatility version) of the code that would analyse an image."""
    plugin_cls = plugin_class(KCBWAIT_PLUGIN)
    return ".".join(map(str, plugin_cls.version)), constants.PACKAGE_VERSION


def run_kcbwait(
    image: Path | str,
    config: FrameworkConfig,
    options: dict[str, Any] | None = None,
    on_stage: StageCallback | None = None,
    stacks: bool = False,
) -> KcbwaitRun:
    """Runs windows.kcbwait on ``image`` exactly as ``vol`` would, plus the kernel identity;
    with ``stacks``, each thread row also carries its windows.kcbstack rows (``STACK_KEY``)."""
    stage = on_stage or (lambda _name: None)
    stage("loading framework")
    prepare(config)
    plugin_cls = plugin_class(KCBWAIT_PLUGIN)
    stage("finding kernel")
    try:
        constructed = construct(image, plugin_cls, options)
    except exceptions.UnsatisfiedException as error:
        raise ImageError(_unsatisfied_message(error, image)) from None
    kernel_name = constructed.config["kernel"]
    identity = kernel_identity.identify(constructed.context, kernel_name)
    stage("analysing threads")
    rows = grid_rows(constructed.run())
    if stacks:
        stage("walking stacks")
        attach_stacks(rows, _stack_rows(constructed.context, kernel_name, options or {}))
    plugin_version, volatility_version = versions()
    return KcbwaitRun(rows, identity, plugin_version, volatility_version)


def _stack_rows(
    context: interfaces.context.ContextInterface, kernel_name: str, options: dict[str, Any]
) -> list[Row]:
    """windows.kcbstack's rows on the context windows.kcbwait already stacked (no second
    automagic pass: the kernel module and its symbols are there)."""
    stack_cls = plugin_class(KCBSTACK_PLUGIN)
    base = interfaces.configuration.path_join("plugins", stack_cls.__name__)
    context.config[interfaces.configuration.path_join(base, "kernel")] = kernel_name
    for key, value in options.items():
        context.config[interfaces.configuration.path_join(base, key)] = value
    plugin = plugins.construct_plugin(context, [], stack_cls, "plugins", None, None)
    return grid_rows(plugin.run())


def attach_stacks(thread_rows: list[Row], stack_rows: list[Row]) -> None:
    """Gives each thread row its frames: both plugins list the same threads in the same
    order, and a thread's frames start with Frame 0 (or its single row with Frame null)."""
    groups: list[list[Row]] = []
    for row in stack_rows:
        if row.get("Frame") in (0, None) or not groups:
            groups.append([])
        groups[-1].append({k: v for k, v in row.items() if k != "__children"})
    if len(groups) != len(thread_rows):
        raise ImageError(
            f"windows.kcbstack listed {len(groups)} threads, windows.kcbwait {len(thread_rows)}"
        )
    for thread, frames in zip(thread_rows, groups, strict=True):
        thread[STACK_KEY] = frames
