"""Property-based fuzzing of windows.kcbstack over builder images (hypothesis).

The same in-process harness as windows.kcbwait's (tests/test_fuzz_harness.py): one to three
byte mutations in the physical memory of a base image, aimed at the structures the walk reads
(trap frames, UCALLOUT_FRAMEs and their return slots, TEBs, user stacks near Rsp) or at any
used page (unwind data, code, page tables).  For every case:
- the plugin finishes within CASE_TIMEOUT and no exception escapes it;
- every thread's rows are a well-formed stack: one row with Frame null, or Frames 0, 1, 2, ...
  at most MAX_FRAMES (+ the WoW64 rows), callback levels never increasing along the walk.
The clean image's stacks equal the truth (tests/test_kcbstack_truth.py checks every profile).

``KCBWAIT_FUZZ_PROFILE=long`` runs 2,000 random cases per base image instead of 60.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_fuzz_harness import FuzzImage
from tests.test_fuzz_images import mutation
from tests.test_kcbstack_truth import expected, threads_of

PLUGIN = "windows.kcbstack.KcbStack"
PROFILE = os.environ.get("KCBWAIT_FUZZ_PROFILE", "ci")
EXAMPLES = {"ci": 60, "long": 2000}.get(PROFILE, 60)
BASE_IMAGES = ["stacks", "basic"]
MAX_FRAMES = 512
MAX_FRAMES32 = 256


@pytest.fixture(scope="module", params=BASE_IMAGES)
def stack_image(request, tmp_path_factory) -> FuzzImage:
    image = FuzzImage(request.param, tmp_path_factory.mktemp(f"fuzz-stack-{request.param}"), PLUGIN)
    assert threads_of(image.clean_rows) == expected(image.full_truth, lambda t: True)
    return image


def assert_well_formed(rows) -> int:
    threads = threads_of(rows)
    for pid, tid, _process, frames in threads:
        where = f"PID {pid} TID {tid}"
        if frames[0]["frame"] is None:
            assert len(frames) == 1 and frames[0]["how"] is None, where
            continue
        assert [f["frame"] for f in frames] == list(range(len(frames))), where
        assert len(frames) <= MAX_FRAMES + MAX_FRAMES32, where
        levels = [f["callback_level"] for f in frames if f["how"] != "frame pointer"]
        assert all(a >= b for a, b in zip(levels, levels[1:], strict=False)), where
        assert frames[0]["how"] == "trap frame", where
    return len(threads)


def test_fuzzed_stacks_never_crash_hang_or_go_malformed(stack_image):
    stats: Counter = Counter()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=PROFILE == "ci",
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.lists(mutation(stack_image), min_size=1, max_size=3))
    def case(mutations):
        rows, seconds = stack_image.run(mutations)
        stats["threads"] += assert_well_formed(rows)
        stats["cases"] += 1
        stats["slowest_ms"] = max(stats["slowest_ms"], int(seconds * 1000))

    case()
    print(f"\nfuzz kcbstack {stack_image.name}: {dict(stats)}")
