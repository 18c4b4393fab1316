"""Property-based fuzzing of windows.kcbwait over builder images (hypothesis).

Each case writes one to three byte mutations into the physical memory of a base image, aimed at
the structures the plugin reads (trap frames, _KSTACK_CONTROLs, KCALLOUT_FRAMEs, UCALLOUT_FRAMEs
and their return slots, TEBs, KTHREADs, EPROCESSes, PEBs, loader data, ntdll's headers and
export directory, list links, page-table entries) or at any used page, and reruns the plugin
in-process (tests/test_fuzz_harness.py).  For every case:
- the plugin finishes within CASE_TIMEOUT and no exception escapes it;
- every thread whose structures the mutations did not touch (the builder's region map) is
  reported exactly as in the truth file.

Profiles (KCBWAIT_FUZZ_PROFILE):
- ``ci`` (default): 100 derandomized cases per base image, 300 in all, in the normal test run;
- ``long``: 3,400 random cases per base image (10,200 in all), run with
  ``KCBWAIT_FUZZ_PROFILE=long .venv/bin/python -m pytest -q -s tests/test_fuzz_images.py``.
``KCBWAIT_FUZZ_EXAMPLES`` overrides the per-image count.  With ``-s`` a summary (cases, slowest
case, threads touched) is printed per image.
"""

from __future__ import annotations

import os
import struct
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_fuzz_harness import FuzzImage, Mutation

PROFILE = os.environ.get("KCBWAIT_FUZZ_PROFILE", "ci")
PER_IMAGE = {"ci": 100, "long": 3400}
EXAMPLES = int(os.environ.get("KCBWAIT_FUZZ_EXAMPLES", PER_IMAGE.get(PROFILE, 100)))
BASE_IMAGES = ["basic", "nt-only", "fuzz-deep"]

QWORDS = (
    0,
    1,
    0x10,
    0x33,
    0x1000,
    0x7FFF_FFFF_FFFF,
    0x8000_0000_0000,
    0xFFFF_8000_0000_0000,
    0xFFFF_F780_0000_0000,
    0x7FFF_FFFF_FFFF_FFFF,
    0x8000_0000_0000_0000,
    0xFFFF_FFFF_FFFF_FFFF,
)
DWORDS = (0, 1, 31, 32, 255, 0x400, 0x1000, 0x10000, 0x7FFF_FFFF, 0xFFFF_FFFF)

STATS: dict[str, Counter] = {}


@st.composite
def mutation(draw, image: FuzzImage) -> Mutation:
    index = image.index
    where = draw(st.sampled_from(["target", "target", "target", "owner", "page"]))
    if where == "target":
        label = draw(st.sampled_from(sorted(index.targets)))
        start, end = draw(st.sampled_from(index.targets[label]))
    elif where == "owner":
        _owner, spans = draw(st.sampled_from(index.owners))
        start, end = draw(st.sampled_from(spans))
    else:
        start = draw(st.sampled_from(index.used_pages))
        end = start + 0x1000
    address = draw(st.integers(start, end - 1))
    op = draw(st.sampled_from(["bytes", "zero", "ones", "bitflip", "qword", "dword", "shift"]))
    if op == "bytes":
        return address, draw(st.binary(min_size=1, max_size=16))
    if op in ("zero", "ones"):
        return address, (b"\0" if op == "zero" else b"\xff") * draw(st.integers(1, 16))
    if op == "bitflip":
        original = image.original_bytes(address, 1)[0]
        return address, bytes([original ^ (1 << draw(st.integers(0, 7)))])
    if op == "dword":
        return address & ~3, struct.pack("<I", draw(st.sampled_from(DWORDS)))
    address &= ~7
    original = struct.unpack("<Q", image.original_bytes(address, 8))[0]
    if op == "shift":  # a pointer (or count) off by a little
        value = (original + draw(st.integers(-0x100, 0x100))) & (2**64 - 1)
    else:
        value = draw(st.sampled_from(QWORDS + tuple(index.pointers)))
    return address, struct.pack("<Q", value)


@pytest.fixture(scope="module", params=BASE_IMAGES)
def base_image(request, tmp_path_factory) -> FuzzImage:
    image = FuzzImage(request.param, tmp_path_factory.mktemp(f"fuzz-{request.param}"))
    STATS[image.name] = Counter()
    yield image
    stats = STATS[image.name]
    print(
        f"\nfuzz {image.name}: {stats['cases']} cases, slowest {stats['slowest_ms']} ms, "
        f"{stats['touched']} touched thread-cases, {stats['untouched']} checked exactly"
    )


def test_fuzzed_images_never_crash_hang_or_lose_untouched_threads(base_image):
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=PROFILE == "ci",
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.lists(mutation(base_image), min_size=1, max_size=3))
    def case(mutations):
        touched, seconds = base_image.check(mutations)
        stats = STATS[base_image.name]
        stats["cases"] += 1
        stats["slowest_ms"] = max(stats["slowest_ms"], int(seconds * 1000))
        stats["touched"] += len(touched)
        stats["untouched"] += len(base_image.records) - len(touched)

    case()
