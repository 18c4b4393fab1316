"""How much work windows.kcbwait does: per-image facts resolved once, small reads per thread,
progress reported per process."""

from __future__ import annotations

import sys

import pytest

from imagebuilder.build import build_image
from imagebuilder.generate import generate_scenario
from imagebuilder.isf import SymbolTable
from imagebuilder.scenario import parse_scenario
from imagebuilder.user_modules import MODULE_BASES
from kcbwait_batch import framework_runner
from tests.support import volrun

PLUGIN = "windows.kcbwait.KcbWait"


@pytest.fixture(scope="module")
def scaled_images(images, tmp_path_factory):
    """The same generated workload at two process counts (lab profile)."""
    profile = images.profile("lab")
    symbols = SymbolTable.load(profile.isf_path)
    out = tmp_path_factory.mktemp("work")
    built = {}
    for processes in (4, 16):
        data = generate_scenario(processes, 6, callback_share=0.5, seed=processes)
        image = build_image(parse_scenario(data), symbols, profile.build)
        built[processes] = image.write(out, f"work-{processes}", ("raw",))["raw"]
    return built, profile.symbols_dir


def _stats_after_run(image, symbols_dir):
    """Every thread's result and the run's own work counters (one ReadStats per run)."""
    framework_runner.prepare(volrun.config([symbols_dir]))
    plugin_cls = framework_runner.plugin_class(PLUGIN)
    constructed = framework_runner.construct(image, plugin_cls)
    stats_cls = sys.modules["volatility3.plugins.windows.kcbwait_analysis.read_stats"].ReadStats
    stats = stats_cls()
    rows = list(
        plugin_cls.analyse_threads(constructed.context, constructed.config["kernel"], stats=stats)
    )
    return rows, stats


def test_ntdll_exports_parsed_a_constant_number_of_times_per_image(scaled_images):
    built, symbols_dir = scaled_images
    parses = {}
    for processes, image in built.items():
        rows, stats = _stats_after_run(image, symbols_dir)
        assert len(rows) == processes * 6 + 2  # every thread (and the System threads)
        assert stats.threads == len(rows)
        parses[processes] = stats.export_parses[MODULE_BASES["ntdll.dll"]]
    # ntdll sits at one base in every process of a boot: its export directory is parsed
    # once per image, however many processes map it.
    assert parses[4] == parses[16] == 1


def test_reads_per_thread_are_small_and_flat(scaled_images):
    built, symbols_dir = scaled_images
    per_thread = {}
    for processes, image in built.items():
        _, stats = _stats_after_run(image, symbols_dir)
        per_thread[processes] = stats.bytes_read / stats.threads
    # Small windows, not whole stacks (a user stack reserve is 1 MiB) ...
    assert all(value < 32 * 1024 for value in per_thread.values()), per_thread
    # ... and no term that grows with the number of processes.
    assert per_thread[16] <= 1.25 * per_thread[4], per_thread


def test_progress_is_reported_per_process(scaled_images):
    built, symbols_dir = scaled_images
    framework_runner.prepare(volrun.config([symbols_dir]))
    plugin_cls = framework_runner.plugin_class(PLUGIN)
    constructed = framework_runner.construct(built[4], plugin_cls)
    calls: list[tuple[float, str]] = []
    results = list(
        plugin_cls.analyse_threads(
            constructed.context,
            constructed.config["kernel"],
            progress_callback=lambda percent, text: calls.append((percent, text)),
        )
    )
    assert len(results) == 4 * 6 + 2
    assert [text for _, text in calls][:2] == [
        "Analysing threads of PID 4",
        f"Analysing threads of PID {results[2].process.pid}",
    ]
    assert len(calls) == 5  # System and the four processes
    percents = [p for p, _ in calls]
    assert percents == sorted(percents) and percents[0] >= 0 and percents[-1] < 100
