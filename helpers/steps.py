"""The work folder's step API: where each step writes, the overwrite guard, the done marker.

The work folder (``workdir``) is the only hand-over between notebooks. Each step writes
one sub-folder (see ``docs/workfolder.md``) and marks it finished by writing its
``manifest.csv`` last, atomically::

    workdir/
      slides/ annotations/ truth/      00 demo data (or the user's own)
      tiles/       01 image/label tile pairs + manifest.csv
      stain/       02 normalizer.json, normalized tiles + manifest.csv
      labels/      03 refined label tiles + manifest.csv
      augment/     04 augment.yaml + preview + manifest.csv
      model/       05 best.keras, last.keras, history.csv, ... + manifest.csv
      gif/         06 training.gif + manifest.csv
      predictions/ 07 one folder per slide, each with its manifest.csv
      evaluation/  08 tables and plots + manifest.csv
      suggestions/ 09 fields to annotate next: <slide>.geojson, suggestions.csv + manifest.csv

Steps whose output is a tile table (01-03) write one row per tile; the others list
their files (:func:`mark_done`). Every step guards its folder with
:func:`guard_output` before it writes anything.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from helpers.errors import HistoUNetError
from helpers.io import check_writable as guard_output  # noqa: F401 - the one refuse-to-overwrite rule, re-exported
from helpers.io import write_manifest

#: Sub-folder of the work folder written by each step.
STEP_DIRS: dict[str, str] = {
    "slides": "slides",
    "annotations": "annotations",
    "truth": "truth",
    "tiles": "tiles",
    "stain": "stain",
    "labels": "labels",
    "augment": "augment",
    "model": "model",
    "gif": "gif",
    "predictions": "predictions",
    "evaluation": "evaluation",
    "suggestions": "suggestions",
}

#: The notebook that writes each step folder (for "run X first" messages).
STEP_NOTEBOOKS: dict[str, str] = {
    "slides": "00_make_demo_data (or put your slides there)",
    "annotations": "00_make_demo_data (or export them from QuPath)",
    "truth": "00_make_demo_data",
    "tiles": "01_export_tiles",
    "stain": "02_normalize_stain",
    "labels": "03_refine_labels",
    "augment": "04_augment_tiles",
    "model": "05_train_model",
    "gif": "06_make_training_gif",
    "predictions": "07_infer_slide",
    "evaluation": "08_evaluate",
    "suggestions": "09_suggest_regions",
}

#: The done marker every finished step folder holds (written last).
DONE = "manifest.csv"

#: Tile-table steps, newest first: later steps refine or normalize the earlier ones.
TILE_STEPS: tuple[str, ...] = ("labels", "stain", "tiles")


def step_dir(workdir: str | Path, step: str, create: bool = False) -> Path:
    """Return the sub-folder of ``workdir`` that ``step`` writes.

    Args:
        workdir: The work folder shared by all notebooks.
        step: A key of :data:`STEP_DIRS` (e.g. ``"tiles"``).
        create: Create the folder (and parents) if missing.
    """
    if step not in STEP_DIRS:
        raise KeyError(f"unknown step {step!r}; known: {', '.join(STEP_DIRS)}")
    path = Path(workdir) / STEP_DIRS[step]
    if create:
        from helpers.io import make_dir

        make_dir(path)  # a read-only or full work folder: one line naming it
    return path


def is_done(folder: str | Path) -> bool:
    """True when ``folder`` holds a finished step (its done marker)."""
    return (Path(folder) / DONE).is_file()


def mark_done(folder: str | Path, table: pd.DataFrame | None = None) -> Path:
    """Write ``folder``'s done marker: ``table`` if given, else a list of its files.

    The file list has columns ``file`` (relative to ``folder``) and ``bytes``; hidden and
    partial files are left out. Written atomically, last.
    """
    folder = Path(folder)
    if table is None:
        rows = [
            {"file": p.relative_to(folder).as_posix(), "bytes": p.stat().st_size}
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != DONE and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        ]
        table = pd.DataFrame(rows, columns=["file", "bytes"])
    return write_manifest(table, folder / DONE, overwrite=True)


def step_manifest(workdir: str | Path, step: str) -> Path:
    """Path of a finished step's manifest; a missing one names the notebook to run."""
    path = step_dir(workdir, step) / DONE
    if not path.is_file():
        raise HistoUNetError(f"{path}: not found; run notebook {STEP_NOTEBOOKS[step]} first")
    return path


def read_step_manifest(workdir: str | Path, step: str) -> pd.DataFrame:
    """Read a finished step's manifest (see :func:`step_manifest`)."""
    return pd.read_csv(step_manifest(workdir, step))


def latest_tile_manifest(workdir: str | Path, steps: tuple[str, ...] = TILE_STEPS) -> tuple[Path, str]:
    """The newest tile table of the work folder: ``labels/`` (03), else ``stain/`` (02), else ``tiles/`` (01).

    Args:
        workdir: The work folder.
        steps: The steps to consider, newest first (e.g. ``("stain", "tiles")`` for 03's input).

    Returns:
        ``(manifest path, step name)``.
    """
    for step in steps:
        path = step_dir(workdir, step) / DONE
        if path.is_file():
            return path, step
    names = ", ".join(f"{STEP_DIRS[s]}/" for s in steps)
    raise HistoUNetError(f"{workdir}: no tile manifest in {names}; run notebook 01_export_tiles first")
