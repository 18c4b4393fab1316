"""Shared fixtures: builder images per (scenario, profile), built once per test session."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from imagebuilder.build import build_image
from imagebuilder.isf import SymbolTable
from imagebuilder.profiles import REAL_TABLES, SHARED_SYMBOLS, Profile, lab_profile, real_profile
from imagebuilder.scenario import load_scenario

SCENARIOS = Path(__file__).resolve().parents[1] / "testdata" / "scenarios"
PROFILES = ["lab", *map(str, REAL_TABLES)]


def profile_param(name: str) -> Any:
    marks = []
    if name != "lab":
        marks.append(pytest.mark.real_symbols)
        if not SHARED_SYMBOLS.is_dir():
            marks.append(
                pytest.mark.skip(
                    reason=f"real symbol tables not present at {SHARED_SYMBOLS} (third-party data "
                    "kept in ../shared/symbols, never in the repository)"
                )
            )
    return pytest.param(name, marks=marks, id=name)


ALL_PROFILES = [profile_param(p) for p in PROFILES]


class ImageCache:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[tuple[str, str], dict[str, Path]] = {}
        self._profiles: dict[str, Profile] = {}

    def profile(self, name: str) -> Profile:
        if name not in self._profiles:
            self._profiles[name] = (
                lab_profile(self.root / "symbols") if name == "lab" else real_profile(int(name))
            )
        return self._profiles[name]

    def get(self, scenario: str, profile: str) -> dict[str, Path]:
        key = (scenario, profile)
        if key not in self._built:
            prof = self.profile(profile)
            image = build_image(
                load_scenario(SCENARIOS / f"{scenario}.json"),
                SymbolTable.load(prof.isf_path),
                prof.build,
            )
            self._built[key] = image.write(
                self.root / "images", f"{scenario}-{profile}", ("raw", "dmp")
            )
            self._built[key]["symbols"] = prof.symbols_dir
        return self._built[key]

    def truth(self, scenario: str, profile: str) -> dict[str, Any]:
        return json.loads(self.get(scenario, profile)["truth"].read_text())


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> ImageCache:
    return ImageCache(tmp_path_factory.mktemp("kcbwait"))
