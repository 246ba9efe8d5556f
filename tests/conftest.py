"""Shared test fixtures: paths to the real third-party data and the class map."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("SM_FRAMEWORK", "tf.keras")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MPLBACKEND", "Agg")

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout (real slides, stain tiles, a QuPath export)."""
    if not SHARED.is_dir():
        pytest.fail(f"{SHARED} not found: the real test data must sit beside the checkout")
    return SHARED


@pytest.fixture(scope="session")
def class_map():
    from helpers.config import load_class_map

    return load_class_map(ROOT / "data" / "classes.yaml")


@pytest.fixture(autouse=True)
def _close_figures():
    """Helpers return figures for notebooks to show; tests close them so none pile up."""
    yield
    import sys

    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")


@pytest.fixture(scope="session")
def chain_workdir(tmp_path_factory) -> tuple[Path, dict[str, float]]:
    """Every numbered notebook run once, in order, on tiny parameters (``tests/params``).

    Shared by the chain test and the browser tests (which only read it: re-running a
    step with the same parameters reuses its results).
    """
    from helpers.pipeline import run_chain

    workdir = tmp_path_factory.mktemp("chain") / "wd"
    timings = run_chain(workdir, ROOT / "tests" / "params")
    return workdir, dict(timings)
