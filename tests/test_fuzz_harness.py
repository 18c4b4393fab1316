"""In-process fuzzing harness for windows.kcbwait, and the harness's own checks.

A ``FuzzImage`` builds one builder image (lab profile, so no third-party data is needed), asks
Volatility once to stack its layers and find its kernel, and constructs the plugin on it.  Each
case then overlays a few byte mutations on the physical layer (the file layer's ``read``),
drops Volatility's translation and read caches, reruns the plugin and returns its rows: no
re-stacking, no new interpreter, so thousands of cases are cheap.

``touched_threads`` says, from the builder's region map (imagebuilder/regions.py), which
threads a set of mutated physical ranges can legitimately change; every other thread must be
reported exactly as in the truth file.  List links are the one shared structure: the plugin
walks every list in both directions (and threads through two lists), so one node's broken links
hide nothing, while links broken at two nodes of a list (or at the process list's head) may
hide the entries between them.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from volatility3 import framework
from volatility3.framework import automagic, contexts, interfaces, plugins
from volatility3.framework.automagic import stacker
from volatility3.framework.configuration import requirements
from volatility3.framework.layers import intel, linear

from imagebuilder.build import build_image
from imagebuilder.isf import SymbolTable
from imagebuilder.profiles import lab_profile
from imagebuilder.regions import PROCESS_LIST
from imagebuilder.scenario import parse_scenario
from kcbwait_batch.framework_runner import grid_rows
from tests.conftest import SCENARIOS
from tests.support.volrun import run_plugin
from tests.test_kcbwait_truth import as_truth

PLUGIN = "windows.kcbwait.KcbWait"
# A clean run of a base image takes ~0.05 s; a case that needs this long is a hang.
CASE_TIMEOUT = 20.0

Mutation = tuple[int, bytes]  # physical address, bytes written there
ThreadKey = tuple[int, int]


class CaseTimeout(BaseException):
    """A case ran longer than CASE_TIMEOUT (BaseException: no ``except Exception`` in the
    framework may swallow it)."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Interrupts the block with CaseTimeout after ``seconds`` of wall-clock time."""

    def expire(_signum, _frame):
        raise CaseTimeout(f"case ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def clear_framework_caches() -> None:
    """Volatility caches page-table pages, translations and reads per layer class; a mutated
    physical byte must be seen by the next case."""
    intel.Intel._translate_entry.cache_clear()
    intel.Intel._get_valid_table.cache_clear()
    interfaces.layers.TranslationLayerInterface.read.cache_clear()
    linear.LinearlyMappedLayer.read.cache_clear()


@dataclass
class RegionIndex:
    """The builder's region map, indexed for ``touched_threads``."""

    owners: list[tuple[tuple[Any, ...], list[tuple[int, int]]]]
    dependents: dict[int, list[int]]
    threads_of: dict[int, list[ThreadKey]]
    targets: dict[str, list[tuple[int, int]]]
    pointers: list[int]
    used_pages: list[int] = field(default_factory=list)

    def touched_threads(self, ranges: Iterable[tuple[int, int]]) -> set[ThreadKey]:
        ranges = list(ranges)
        everyone = {key for keys in self.threads_of.values() for key in keys}
        touched: set[ThreadKey] = set()
        nodes: dict[str, set[Any]] = {}
        for owner, spans in self.owners:
            if not any(s < end and start < e for s, e in spans for start, end in ranges):
                continue
            kind = owner[0]
            if kind == "global":
                return everyone
            if kind == "thread":
                touched.add((owner[1], owner[2]))
            elif kind == "process":
                touched |= set(self.threads_of.get(owner[1], []))
                for pid, deps in self.dependents.items():
                    if owner[1] in deps:
                        touched |= set(self.threads_of.get(pid, []))
            elif kind == "link":
                nodes.setdefault(owner[1], set()).add(owner[2])
        for name, hit in nodes.items():
            if name == PROCESS_LIST:
                if "head" in hit or len(hit) >= 2:
                    return everyone
            elif len(hit) >= 2:
                touched |= set(self.threads_of.get(int(name.split(":")[1]), []))
        return touched


def region_index(regions, truth: dict[str, Any], pages: Iterable[int]) -> RegionIndex:
    threads_of: dict[int, list[ThreadKey]] = {}
    for record in truth["threads"]:
        threads_of.setdefault(record["pid"], []).append((record["pid"], record["tid"]))
    merged = regions.to_json()
    return RegionIndex(
        owners=[(tuple(o["owner"]), [tuple(r) for r in o["ranges"]]) for o in merged["owners"]],
        dependents={int(k): v for k, v in merged["process_dependents"].items()},
        threads_of=threads_of,
        targets={k: list(v) for k, v in regions.targets.items()},
        pointers=list(regions.pointers),
        used_pages=sorted(pages),
    )


class FuzzImage:
    """One base image, analysed again and again under different physical-byte mutations."""

    def __init__(self, scenario: str, workdir: Path, plugin: str = PLUGIN) -> None:
        profile = lab_profile(workdir / "symbols")
        data = json.loads((SCENARIOS / f"{scenario}.json").read_text())
        image = build_image(parse_scenario(data), SymbolTable.load(profile.isf_path), profile.build)
        self.name = scenario
        self.paths = image.write(workdir, scenario, ("raw",))
        self.symbols = profile.symbols_dir
        # windows.kcbwait's records: without what windows.kcbstack reports ("stack").
        threads = [{k: v for k, v in t.items() if k != "stack"} for t in image.truth["threads"]]
        self.truth = {**image.truth, "threads": threads}
        self.full_truth = image.truth
        self.records = {(t["pid"], t["tid"]): t for t in threads}
        self.index = region_index(image.regions, image.truth, (p << 12 for p in image.memory.pages))
        self.original = {pfn << 12: bytes(page) for pfn, page in image.memory.pages.items()}
        # The first run prepares the framework (plugin and symbol paths) the way the tests do.
        symbol_dirs = [self.symbols]
        if "pdb_symbols" in self.paths:
            symbol_dirs.append(self.paths["pdb_symbols"])
        rows = run_plugin(self.paths["raw"], plugin, symbol_dirs, {"all-threads": True})
        if plugin == PLUGIN:
            assert as_truth(rows) == self.truth["threads"]
        self.plugin_name = plugin
        self.clean_rows = rows
        self._construct()

    def _construct(self) -> None:
        plugin_cls = framework.list_plugins()[self.plugin_name]
        ctx = contexts.Context()
        ctx.config["automagic.LayerStacker.single_location"] = (
            requirements.URIRequirement.location_from_file(str(self.paths["raw"]))
        )
        available = automagic.available(ctx)
        ctx.config["automagic.LayerStacker.stackers"] = stacker.choose_os_stackers(plugin_cls)
        ctx.config[f"plugins.{plugin_cls.__name__}.all-threads"] = True
        chosen = automagic.choose_automagic(available, plugin_cls)
        self.plugin = plugins.construct_plugin(ctx, chosen, plugin_cls, "plugins", None, None)
        self.context = ctx
        kernel = ctx.modules[self.plugin.config["kernel"]]
        physical = ctx.layers[ctx.layers[kernel.layer_name].config["memory_layer"]]
        self._patches: list[Mutation] = []
        original_read = physical.read

        def read(offset: int, length: int, pad: bool = False) -> bytes:
            data = original_read(offset, length, pad)
            if not self._patches:
                return data
            end = offset + len(data)
            out = None
            for address, patch in self._patches:
                if address < end and offset < address + len(patch):
                    out = out if out is not None else bytearray(data)
                    start = max(address, offset)
                    stop = min(address + len(patch), end)
                    out[start - offset : stop - offset] = patch[start - address : stop - address]
            return data if out is None else bytes(out)

        physical.read = read  # the overlay: every layer above reads through it
        self._base_layers = set(ctx.layers)

    def original_bytes(self, address: int, length: int) -> bytes:
        page = self.original.get(address & ~0xFFF, bytes(0x1000))
        start = address & 0xFFF
        return page[start : start + length]

    def run(self, mutations: list[Mutation]) -> tuple[list[dict[str, Any]], float]:
        """(rows, seconds) of one analysis under ``mutations``; the image is restored after."""
        self._patches = list(mutations)
        clear_framework_caches()
        started = time.perf_counter()
        try:
            with time_limit(CASE_TIMEOUT):
                rows = grid_rows(self.plugin.run())
        finally:
            self._patches = []
            clear_framework_caches()
            for name in set(self.context.layers) - self._base_layers:
                self.context.layers.del_layer(name)
        return rows, time.perf_counter() - started

    def check(self, mutations: list[Mutation]) -> tuple[set[ThreadKey], float]:
        """Runs one case and asserts the property; returns (touched threads, seconds)."""
        rows, seconds = self.run(mutations)
        reported = as_truth(rows)
        touched = self.index.touched_threads((a, a + len(b)) for a, b in mutations)
        lost = [
            key
            for key, record in self.records.items()
            if key not in touched and record not in reported
        ]
        assert not lost, f"untouched threads not reported exactly: {lost} under {mutations}"
        return touched, seconds


@pytest.fixture(scope="module")
def basic_image(tmp_path_factory) -> FuzzImage:
    return FuzzImage("basic", tmp_path_factory.mktemp("fuzz-basic"))


def test_unmutated_image_equals_truth_in_process(basic_image):
    rows, _ = basic_image.run([])
    assert as_truth(rows) == basic_image.truth["threads"]


def test_overlay_is_seen_and_undone(basic_image):
    """Zeroing thread 1248's trap frames changes its row; the next clean run is exact again."""
    frames = basic_image.index.targets["trap_frame"]
    mutations = [(start, bytes(end - start)) for start, end in frames]
    rows, _ = basic_image.run(mutations)
    assert as_truth(rows) != basic_image.truth["threads"]
    rows, _ = basic_image.run([])
    assert as_truth(rows) == basic_image.truth["threads"]


def exclusive_span(index: RegionIndex, owner: tuple[Any, ...]) -> tuple[int, int]:
    """A range of ``owner`` that no other owner shares (shared page-table entries are owned
    by everything they map)."""
    others = [span for o, spans in index.owners if o != owner for span in spans]
    for start, end in dict(index.owners)[owner]:
        if not any(s < end and start < e for s, e in others):
            return start, end
    raise AssertionError(f"{owner} has no range of its own")


def test_touched_threads_follow_owners_and_list_rules(basic_image):
    index = basic_image.index
    thread = exclusive_span(index, ("thread", 1232, 1240))
    assert index.touched_threads([thread]) == {(1232, 1240)}
    link = exclusive_span(index, ("link", "threads:1232", 1244))
    assert index.touched_threads([link]) == set()
    other = exclusive_span(index, ("link", "threads:1232", 1252))
    assert index.touched_threads([link, other]) == set(index.threads_of[1232])
    head = exclusive_span(index, ("link", PROCESS_LIST, "head"))
    assert len(index.touched_threads([head])) == len(basic_image.records)
    # notepad reads ntdll's exports from another process's copy.
    explorer = exclusive_span(index, ("process", 1232))
    assert (2468, 2472) in index.touched_threads([explorer])


def test_a_damaged_thread_does_not_change_the_others(basic_image):
    """Smash every byte the plugin reads for thread 1248 alone (not the page-table entries it
    shares with others): its row changes, every other row stays exact."""
    index = basic_image.index
    others = [span for o, spans in index.owners if o != ("thread", 1232, 1248) for span in spans]
    mutations = [
        (start, b"\xa5" * (end - start))
        for start, end in dict(index.owners)[("thread", 1232, 1248)]
        if not any(s < end and start < e for s, e in others)
    ]
    touched, _ = basic_image.check(mutations)
    assert touched == {(1232, 1248)}
    rows, _ = basic_image.run(mutations)
    assert basic_image.records[(1232, 1248)] not in as_truth(rows)


def test_hang_guard_interrupts():
    with pytest.raises(CaseTimeout), time_limit(0.05):
        while True:
            pass


def test_regression_two_smeared_thread_headers(basic_image):
    """Found by the long fuzz profile: zeroing the dispatcher-header Type of explorer's first
    and third threads stopped every walk of both thread lists at them, losing thread 1240."""
    kthreads = basic_image.index.targets["kthread"]  # System's 2 threads, then explorer's
    mutations = [(kthreads[2][0], b"\0"), (kthreads[4][0], b"\0")]
    touched, _ = basic_image.check(mutations)
    assert touched == {(1232, 1236), (1232, 1244)}


@pytest.fixture(scope="module")
def nt_only_image(tmp_path_factory) -> FuzzImage:
    return FuzzImage("nt-only", tmp_path_factory.mktemp("fuzz-nt-only"))


def test_regression_one_process_page_table_entry_poisoned_another(nt_only_image):
    """Found by the long fuzz profile: a smeared PTE of winlogon's ntdll export page made
    winlogon read the wrong page; the parse, cached per (base, path), then gave svchost an
    export table without NtCallbackReturn ('invalid: ntdll exports', ntdll.dll+RVA symbols).
    Parses are now shared only between processes that map the same physical pages."""
    (pte, _end) = nt_only_image.index.targets["ntdll_export_pte:712"][0]
    touched, _ = nt_only_image.check([(pte, b"\xff\xff")])
    assert touched == {(712, 716), (712, 720), (712, 724)}
