"""Declarative scenarios: which processes, modules and threads an image holds.

A scenario is JSON (or the same structure as Python data).  ``parse_scenario`` checks every
field and raises ``ScenarioError`` naming the bad one, so a typo never becomes a traceback
deep inside the layout code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagebuilder.conditions_spec import (
    ProcessCondition,
    ThreadCondition,
    parse_process_conditions,
    parse_thread_conditions,
)
from imagebuilder.damage_spec import (
    ProcessDamage,
    ScenarioDamage,
    ThreadDamage,
    parse_process_damage,
    parse_scenario_damage,
    parse_thread_damage,
)
from imagebuilder.spec_fields import FieldError
from imagebuilder.tables_spec import (
    TableSpec,
    check_wow64_modules,
    parse_table_spec,
    target,
)

# Modules the builder knows how to write.  Any other name becomes a plain DLL with a few
# exports, so a scenario can place a KernelCallbackTable entry in a foreign module.
KNOWN_MODULES = (
    "ntdll.dll",
    "win32u.dll",
    "user32.dll",
    "kernel32.dll",
    "wow64.dll",
    "wow64win.dll",
    "wow64cpu.dll",
)
MAX_CALLBACK_NESTING = 31  # KeUserModeCallback fails beyond 31 with STATUS_STACK_OVERFLOW
THREAD_KINDS = ("user", "system", "terminated")
PAGE_OUT_TARGETS = ("ntdll_exports", "ntdll_codeview", "user32_codeview")
CHAINED_PART = "chained"


class ScenarioError(ValueError):
    """A scenario field is missing or wrong; the message names it."""


@dataclass(frozen=True)
class Callback:
    """One active user-mode callback, outermost first in ``Thread.callbacks``."""

    api: int
    syscall: str  # the win32u/ntdll system call this callback interrupted
    length: int


@dataclass(frozen=True)
class CodeTarget:
    """A hijacked KernelCallbackTable entry that points into a module's own code:
    ``function`` (a name the module's PDB or exports give it) + ``offset``, counted from the
    start of the function's chained secondary part when ``part`` is "chained"."""

    module: str
    function: str
    offset: int = 0
    part: str | None = None
    where: str = ""  # the field path, for errors only the built module can detect


@dataclass(frozen=True)
class Thread:
    tid: int
    kind: str = "user"
    wait: str = "NtWaitForSingleObject"  # syscall the innermost user frame sits in
    callbacks: tuple[Callback, ...] = ()
    wait_reason: str = "UserRequest"
    damage: tuple[ThreadDamage, ...] = ()
    conditions: tuple[ThreadCondition, ...] = ()


@dataclass(frozen=True)
class Process:
    pid: int
    name: str
    ppid: int
    modules: tuple[str, ...]
    threads: tuple[Thread, ...]
    wow64: bool = False
    # ApiNumber -> module name, "private" or "private_rwx" (memory no module maps), or code
    # in a module (a CodeTarget)
    callback_overrides: dict[int, str | CodeTarget] = field(default_factory=dict)
    page_out: tuple[str, ...] = ()
    damage: ProcessDamage = ProcessDamage()
    conditions: tuple[ProcessCondition, ...] = ()
    tables: TableSpec = TableSpec()


@dataclass(frozen=True)
class Scenario:
    name: str
    processes: tuple[Process, ...]
    seed: int = 1
    memory_mb: int = 64
    system_threads: int = 2
    ntdll_zw_alias: bool = True  # ntdll exports ZwCallbackReturn beside NtCallbackReturn
    callback_table_size: int = 128
    damage: ScenarioDamage = ScenarioDamage()
    # Modules the builder writes a PDB symbol table (ISF) for, beside the image.
    pdb_symbols: tuple[str, ...] = ()


def load_scenario(path: str | Path) -> Scenario:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ScenarioError(f"{path}: not valid JSON ({exc})") from exc
    return parse_scenario(data)


def parse_scenario(data: Any) -> Scenario:
    try:
        return _scenario(data)
    except FieldError as exc:
        raise ScenarioError(str(exc)) from None


def _scenario(data: Any) -> Scenario:
    where = "scenario"
    obj = _mapping(data, where)
    _only(
        obj,
        where,
        {
            "name",
            "processes",
            "seed",
            "memory_mb",
            "system_threads",
            "ntdll_zw_alias",
            "callback_table_size",
            "damage",
            "pdb_symbols",
        },
    )
    table_size = _int(obj.get("callback_table_size", 128), f"{where}.callback_table_size", 1, 4096)
    processes = tuple(
        _process(p, f"{where}.processes[{i}]", table_size)
        for i, p in enumerate(_list(obj.get("processes"), f"{where}.processes"))
    )
    scenario = Scenario(
        name=_str(obj.get("name"), f"{where}.name"),
        processes=processes,
        seed=_int(obj.get("seed", 1), f"{where}.seed", 0, 2**32 - 1),
        memory_mb=_int(obj.get("memory_mb", 64), f"{where}.memory_mb", 32, 1 << 20),
        system_threads=_int(obj.get("system_threads", 2), f"{where}.system_threads", 1, 64),
        ntdll_zw_alias=_bool(obj.get("ntdll_zw_alias", True), f"{where}.ntdll_zw_alias"),
        callback_table_size=table_size,
        pdb_symbols=_pdb_symbols(obj.get("pdb_symbols", []), f"{where}.pdb_symbols", processes),
    )
    _check_unique(scenario)
    if "damage" in obj:
        threads_of = {t.tid: p.pid for p in processes for t in p.threads if t.kind == "user"}
        damage = parse_scenario_damage(
            obj["damage"], f"{where}.damage", [p.pid for p in processes], threads_of
        )
        for index, foreign in enumerate(damage.foreign_threads):
            target = next(p for p in processes if p.pid == foreign.into)
            if target.damage.thread_list is not None:
                raise ScenarioError(
                    f"{where}.damage.foreign_threads[{index}].into: process {foreign.into} has"
                    " a damaged thread list; a foreign thread goes into an intact one"
                )
        scenario = Scenario(**{**scenario.__dict__, "damage": damage})
    return scenario


def _process(data: Any, where: str, table_size: int) -> Process:
    obj = _mapping(data, where)
    _only(
        obj,
        where,
        {
            "pid",
            "name",
            "ppid",
            "modules",
            "threads",
            "wow64",
            "callback_overrides",
            "page_out",
            "damage",
            "conditions",
            "callback_table",
            "callback_overrides32",
            "instrumentation_callback",
        },
    )
    pid = _int(obj.get("pid"), f"{where}.pid", 8, 0xFFFFFFFC)
    if pid % 4:
        raise ScenarioError(f"{where}.pid: {pid} is not a multiple of 4 (Windows ids are)")
    modules = tuple(
        _str(m, f"{where}.modules[{i}]")
        for i, m in enumerate(
            _list(obj.get("modules", list(KNOWN_MODULES[:3])), f"{where}.modules")
        )
    )
    for required in ("ntdll.dll",):
        if required not in modules:
            raise ScenarioError(f"{where}.modules: every user process maps {required}")
    if len(set(m.lower() for m in modules)) != len(modules):
        raise ScenarioError(f"{where}.modules: a module is listed twice")
    wow64 = _bool(obj.get("wow64", False), f"{where}.wow64")
    check_wow64_modules(modules, wow64, where)
    overrides: dict[int, str | CodeTarget] = {}
    for key, value in _mapping(
        obj.get("callback_overrides", {}), f"{where}.callback_overrides"
    ).items():
        api = _int(
            _as_int(key, f"{where}.callback_overrides key"),
            f"{where}.callback_overrides key",
            0,
            table_size - 1,
        )
        if isinstance(value, dict):
            overrides[api] = _code_target(value, f"{where}.callback_overrides[{key}]", modules)
            continue
        overrides[api] = target(
            _str(value, f"{where}.callback_overrides[{key}]"),
            f"{where}.callback_overrides[{key}]",
            modules,
        )
    page_out = tuple(
        _str(p, f"{where}.page_out[{i}]")
        for i, p in enumerate(_list(obj.get("page_out", []), f"{where}.page_out"))
    )
    for index, item in enumerate(page_out):
        if item not in PAGE_OUT_TARGETS:
            raise ScenarioError(
                f"{where}.page_out: unknown target {item!r}; known: {', '.join(PAGE_OUT_TARGETS)}"
            )
        needed = item.split("_", 1)[0] + ".dll"
        if needed not in modules:
            raise ScenarioError(
                f"{where}.page_out[{index}]: {item} needs {needed}, which the process lacks"
            )
    threads = tuple(
        _thread(t, f"{where}.threads[{i}]", modules, table_size)
        for i, t in enumerate(_list(obj.get("threads"), f"{where}.threads"))
    )
    if not threads:
        raise ScenarioError(f"{where}.threads: a process needs at least one thread")
    name = _str(obj.get("name"), f"{where}.name")
    try:
        encoded = name.encode("latin-1")
    except UnicodeEncodeError:
        raise ScenarioError(
            f"{where}.name: EPROCESS.ImageFileName holds bytes; use characters U+0000..U+00FF"
        ) from None
    if not 0 < len(encoded) <= 14 or "\0" in name:
        raise ScenarioError(f"{where}.name: 1 to 14 characters (EPROCESS.ImageFileName), no NUL")
    tables = parse_table_spec(obj, where, modules, wow64, table_size)
    damage = ProcessDamage()
    if "damage" in obj:
        damage = parse_process_damage(obj["damage"], f"{where}.damage", [t.tid for t in threads])
    return Process(
        pid=pid,
        name=name,
        ppid=_int(obj.get("ppid", 4), f"{where}.ppid", 0, 2**32),
        modules=modules,
        threads=threads,
        wow64=wow64,
        callback_overrides=overrides,
        page_out=page_out,
        damage=damage,
        conditions=parse_process_conditions(
            obj.get("conditions", []), f"{where}.conditions", modules
        ),
        tables=tables,
    )


def _thread(data: Any, where: str, modules: tuple[str, ...], table_size: int) -> Thread:
    obj = _mapping(data, where)
    _only(obj, where, {"tid", "kind", "wait", "callbacks", "wait_reason", "damage", "conditions"})
    tid = _int(obj.get("tid"), f"{where}.tid", 4, 0xFFFFFFFC)
    if tid % 4:
        raise ScenarioError(f"{where}.tid: {tid} is not a multiple of 4 (Windows ids are)")
    kind = _str(obj.get("kind", "user"), f"{where}.kind")
    if kind not in THREAD_KINDS:
        raise ScenarioError(f"{where}.kind: {kind!r} is not one of {', '.join(THREAD_KINDS)}")
    callbacks = tuple(
        _callback(c, f"{where}.callbacks[{i}]", table_size)
        for i, c in enumerate(_list(obj.get("callbacks", []), f"{where}.callbacks"))
    )
    if len(callbacks) > MAX_CALLBACK_NESTING:
        raise ScenarioError(f"{where}.callbacks: at most {MAX_CALLBACK_NESTING} nested callbacks")
    if callbacks and kind != "user":
        raise ScenarioError(f"{where}.callbacks: only user threads run callbacks")
    needs_win32u = [c.syscall for c in callbacks]
    wait = _str(obj.get("wait", "NtWaitForSingleObject"), f"{where}.wait")
    for name in [*needs_win32u, wait]:
        _check_syscall(name, where, modules)
    if wait in ("NtCallbackReturn", "ZwCallbackReturn") and not callbacks:
        pass  # allowed: an anomaly the plugin must still report as at-return
    return Thread(
        tid=tid,
        kind=kind,
        wait=wait,
        callbacks=callbacks,
        wait_reason=_str(obj.get("wait_reason", "UserRequest"), f"{where}.wait_reason"),
        damage=parse_thread_damage(obj.get("damage", []), f"{where}.damage", len(callbacks), kind),
        conditions=parse_thread_conditions(
            obj.get("conditions", []),
            f"{where}.conditions",
            len(callbacks),
            kind,
            bool(obj.get("damage")),
        ),
    )


def _callback(data: Any, where: str, table_size: int) -> Callback:
    obj = _mapping(data, where)
    _only(obj, where, {"api", "syscall", "length"})
    return Callback(
        api=_int(obj.get("api"), f"{where}.api", 0, table_size - 1),
        syscall=_str(obj.get("syscall", "NtUserDispatchMessage"), f"{where}.syscall"),
        length=_int(obj.get("length", 0x30), f"{where}.length", 0, 0x800),
    )


def _code_target(data: dict[str, Any], where: str, modules: tuple[str, ...]) -> CodeTarget:
    _only(data, where, {"module", "function", "offset", "part"})
    module = _str(data.get("module"), f"{where}.module")
    if module not in modules:
        raise ScenarioError(f"{where}.module: {module} is not one of the process's modules")
    part = data.get("part")
    if part is not None and part != CHAINED_PART:
        raise ScenarioError(f"{where}.part: {part!r} is not {CHAINED_PART!r}")
    return CodeTarget(
        module=module,
        function=_str(data.get("function"), f"{where}.function"),
        offset=_int(data.get("offset", 0), f"{where}.offset", 0, 0xFFFF),
        part=part,
        where=where,
    )


def _pdb_symbols(data: Any, where: str, processes: tuple[Process, ...]) -> tuple[str, ...]:
    """Modules (or process images) whose PDB symbol table the builder writes."""
    loaded = {m for p in processes for m in p.modules} | {p.name for p in processes}
    names: list[str] = []
    for index, value in enumerate(_list(data, where)):
        name = _str(value, f"{where}[{index}]")
        if name not in loaded:
            raise ScenarioError(f"{where}[{index}]: {name} is not a module of any process")
        if name in names:
            raise ScenarioError(f"{where}[{index}]: {name} is listed twice")
        names.append(name)
    return tuple(names)


def _check_syscall(name: str, where: str, modules: tuple[str, ...]) -> None:
    from imagebuilder.user_modules import NTDLL_SYSCALLS, WIN32U_SYSCALLS

    if name in NTDLL_SYSCALLS or name in ("ZwCallbackReturn",):
        return
    if name in WIN32U_SYSCALLS:
        if "win32u.dll" not in modules:
            raise ScenarioError(f"{where}: {name} lives in win32u.dll, which the process lacks")
        return
    raise ScenarioError(f"{where}: unknown system call {name!r}")


def _check_unique(scenario: Scenario) -> None:
    pids: set[int] = set()
    tids: set[int] = set(range(8, 8 + 4 * scenario.system_threads, 4))
    for i, proc in enumerate(scenario.processes):
        if proc.pid in pids:
            raise ScenarioError(f"scenario.processes[{i}].pid: {proc.pid} is used twice")
        pids.add(proc.pid)
        for j, thread in enumerate(proc.threads):
            if thread.tid in tids:
                raise ScenarioError(
                    f"scenario.processes[{i}].threads[{j}].tid: {thread.tid} is used twice"
                    " (system threads take 8, 12, ...)"
                )
            tids.add(thread.tid)


# -- field helpers -----------------------------------------------------------------------
def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ScenarioError(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        raise ScenarioError(f"{where}: missing")
    if not isinstance(value, list):
        raise ScenarioError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ScenarioError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ScenarioError(f"{where}: expected true or false, got {value!r}")
    return value


def _as_int(value: Any, where: str) -> int:
    try:
        return int(value, 0) if isinstance(value, str) else int(value)
    except (TypeError, ValueError) as exc:
        raise ScenarioError(f"{where}: {value!r} is not a number") from exc


def _int(value: Any, where: str, low: int, high: int) -> int:
    if value is None:
        raise ScenarioError(f"{where}: missing")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScenarioError(f"{where}: expected an integer, got {value!r}")
    if not low <= value <= high:
        raise ScenarioError(f"{where}: {value} is outside {low}..{high}")
    return value


def _only(obj: dict[str, Any], where: str, allowed: set[str]) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ScenarioError(
            f"{where}: unknown field {unknown[0]!r} (known: {', '.join(sorted(allowed))})"
        )
