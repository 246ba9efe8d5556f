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
:func:`reuse_or_guard` before it writes anything: a finished folder made with the same
parameters and inputs (its ``params.json`` fingerprint) is reused, a different one is
refused with the way out (``overwrite=True`` or another workdir).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from helpers.errors import HistoUNetError, OutputExistsError
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

#: The fingerprint file of a step folder: the parameters and input ids that made it.
PARAMS = "params.json"

log = logging.getLogger("histo-unet")

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


# --------------------------------------------------------------------------- re-run rule


def file_id(path: str | Path) -> list:
    """A file's identity for fingerprints: ``[resolved path, bytes, mtime in ns]`` (None, None when missing)."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return [str(path.resolve()), None, None]
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def fingerprint_of(params: dict[str, Any], inputs: Iterable[str | Path] = ()) -> dict:
    """A step's fingerprint: the parameters that change its outputs and the ids of its input files.

    Values are normalised through JSON (tuples become lists, paths strings), so a
    fingerprint compares equal to the one read back from ``params.json``.
    """
    fp = {"params": params, "inputs": [file_id(p) for p in inputs]}
    return json.loads(json.dumps(fp, sort_keys=True, default=str))


def read_fingerprint(folder: str | Path, record: str = PARAMS) -> dict | None:
    """The fingerprint recorded in ``folder`` (None when there is none or it is unreadable)."""
    try:
        return json.loads((Path(folder) / record).read_text())
    except (OSError, ValueError):
        return None


def record_fingerprint(folder: str | Path, fingerprint: dict, record: str = PARAMS) -> Path:
    """Write ``fingerprint`` to ``folder/params.json`` (atomically); call it before the done marker."""
    from helpers.io import write_json

    return write_json(json.loads(json.dumps(fingerprint, sort_keys=True, default=str)), Path(folder) / record,
                      overwrite=True)


def _changed(old: dict | None, new: dict) -> str:
    if old is None:
        return f"made without a {PARAMS} record"
    def flat(d: dict) -> dict:  # one level of nesting (e.g. training's config) named as its keys
        out: dict = {}
        for k, v in d.items():
            out.update({kk: vv for kk, vv in v.items()} if isinstance(v, dict) else {k: v})
        return out

    params_old, params_new = flat(old.get("params", {})), flat(new.get("params", {}))
    keys = sorted(k for k in set(params_old) | set(params_new) if params_old.get(k) != params_new.get(k))
    if old.get("inputs") != new.get("inputs"):
        keys.append("its inputs")
    return "made with other " + ("parameters" if not keys else "settings: " + ", ".join(keys))


def reuse_or_guard(folder: str | Path, fingerprint: dict, overwrite: bool = False, what: str = "", *,
                   done: str = DONE, record: str | None = PARAMS, in_place: bool = False, guard: bool = True) -> bool:
    """The one re-run rule of every step: reuse a finished folder made the same way, else refuse or redo.

    * ``overwrite``: redo (returns False).
    * ``folder`` is finished (``done`` exists) and its recorded fingerprint equals
      ``fingerprint``: log one line and return True; the step loads its results.
    * finished with another fingerprint: :class:`OutputExistsError` naming what changed
      and the way out (``overwrite=True`` or another workdir).
    * not finished: the refuse-to-overwrite guard (:func:`guard_output` on ``folder``)
      unless ``guard`` is False (steps that resume partial work guard themselves).

    Args:
        folder: The step's output folder.
        fingerprint: From :func:`fingerprint_of`.
        overwrite: Redo the step.
        what: Named in the error (e.g. ``"tile export"``).
        done: The file that marks the folder finished.
        record: The fingerprint file name.
        in_place: The step writes into ``folder`` itself (not a temporary folder moved into
            place): when it will redo, the stale done marker is removed and the new
            fingerprint recorded now, so an interrupted redo never looks finished.
            Otherwise the step calls :func:`record_fingerprint` on its temporary folder.
        guard: Apply :func:`guard_output` to an unfinished, non-empty folder.

    Returns:
        True to reuse the existing results, False to (re)do the step.
    """
    folder = Path(folder)
    fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
    finished = (folder / done).is_file()
    if finished and not overwrite:
        old = read_fingerprint(folder, record) if record else None
        name = f"{folder.name}/"
        if old == fingerprint:
            log.info("%s is up to date with these parameters; reusing it (overwrite=True to redo)", name)
            return True
        label = f" ({what})" if what else ""
        raise OutputExistsError(f"{folder}{label} already exists, {_changed(old, fingerprint)}; pass overwrite=True "
                                "to replace it or choose another workdir")
    if not finished and guard and not overwrite:
        guard_output(folder, overwrite, what)
    if in_place:
        start_in_place(folder, fingerprint, done, record)
    return False


def start_in_place(folder: str | Path, fingerprint: dict, done: str = DONE, record: str | None = PARAMS) -> None:
    """Before a step (re)writes ``folder`` in place: drop its stale done marker, record the new fingerprint.

    Steps that validate their inputs after :func:`reuse_or_guard` call this (with
    ``in_place=False`` there) once the inputs are known good, so bad input leaves nothing behind.
    """
    from helpers.io import make_dir

    folder = Path(folder)
    make_dir(folder)
    (folder / done).unlink(missing_ok=True)
    if record:
        record_fingerprint(folder, json.loads(json.dumps(fingerprint, sort_keys=True, default=str)), record)
