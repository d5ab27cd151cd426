"""Access to ``shared/golden`` (manifests, cases, the comparison helper) for the tests."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest

CONFIGS = ("DERIS-B-grefcoco", "DERIS-B-refcoco", "DERIS-L-grefcoco", "DERIS-L-refcoco")


def shared_dir() -> Path | None:
    candidates = [os.environ.get("DERIS_SHARED"), Path(__file__).resolve().parents[2] / "shared"]
    for c in candidates:
        if c and (Path(c) / "golden").is_dir():
            return Path(c)
    return None


def golden_dir() -> Path:
    shared = shared_dir()
    if shared is None:
        if os.environ.get("DERIS_REQUIRE_GOLDEN"):
            pytest.fail("shared/golden not found: set DERIS_SHARED to the folder holding golden/")
        pytest.skip("shared/golden not found (set DERIS_SHARED)")
    return shared / "golden"


def golden_check() -> ModuleType:
    """The shared comparison helper, loaded from its file (it is not a package)."""
    path = golden_dir() / "golden_check.py"
    spec = importlib.util.spec_from_file_location("golden_check", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def case_paths(config: str) -> list[Path]:
    """Every golden case of a config present in shared/golden (case A ships; others may be added)."""
    return sorted(golden_dir().glob(f"golden_{config}_case*.npz"))


def case_params() -> list[object]:
    """Every golden case .npz, for ``pytest.mark.parametrize`` at collection time (where skipping
    is not allowed). Without shared/golden this is one ``None`` parameter that :func:`require_case`
    turns into a skip, or a failure under DERIS_REQUIRE_GOLDEN."""
    shared = shared_dir()
    paths = sorted((shared / "golden").glob("golden_*_case*.npz")) if shared else []
    return [pytest.param(p, id=p.stem) for p in paths] or [pytest.param(None, id="no-golden-cases")]


def require_case(path: Path | None) -> Path:
    if path is None:
        folder = golden_dir()  # skips, or fails under DERIS_REQUIRE_GOLDEN
        pytest.fail(f"no golden case files (golden_*_case*.npz) in {folder}")
    return path
