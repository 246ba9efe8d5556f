"""A cohort of slides on Dask: notebook 07 (or 01) once per slide, one Dask task per slide.

Usage::

    python -m helpers.batch --slides DIR --workdir WD [--workers N | --scheduler tcp://host:8786]
                            [--step 07|01] [--mpp 0.5] [--params p.yaml] [--overwrite]
    make batch SLIDES=DIR [WORKERS=n] [SCHEDULER=tcp://host:8786] [MPP=0.5] [WORKDIR=runs/demo]
    make batch-tiles SLIDES=DIR [ANNOTATIONS=DIR] [WORKERS=n] [SCHEDULER=...]

Each slide runs its notebook with papermill (:func:`helpers.runner.run_notebook`) on a Dask
worker and keeps the executed copy ``WD/notebooks/batch/<notebook>_<slide>.ipynb`` as its
report. The cluster is a LocalCluster on this machine by default, an existing one with
``--scheduler``, or none with ``--workers 0`` (sequential; see :mod:`helpers.cohort`).

Step 07 writes ``WD/predictions/<slide>/`` and the cohort table ``WD/predictions/cohort.csv``
(slide, status, seconds, worker, tumour fraction, areas, message). Step 01 writes one work
folder per slide, ``WD/tiles_by_slide/<slide>/tiles/``, then gathers them into the one
``WD/tiles/`` (tiles hard-linked, manifests concatenated in slide order) that 02-05 read,
identical to a single run of 01 over all slides.

Done slides are skipped (``--overwrite`` redoes them); a failing slide does not stop the
cohort: failures are listed at the end with their one-line reasons and the exit code is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import yaml

from helpers.errors import HistoUNetError, ParameterError
from helpers.steps import DONE, is_done, step_dir

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = {"07": ROOT / "notebooks" / "07_infer_slide.ipynb", "01": ROOT / "notebooks" / "01_export_tiles.ipynb"}
NOTEBOOK = NOTEBOOKS["07"]
#: Per-slide work folders of a cohort tile export (step 01).
TILES_BY_SLIDE = "tiles_by_slide"
#: Files of a prediction folder that an interrupted run may leave before its done marker.
PARTIAL_RESULTS = ("probabilities.tiff", "labels.tiff", "summary.json")
#: Hidden marker: ``tiles/`` was gathered by a cohort run (a later gather may replace it).
GATHERED = ".gathered"
log = logging.getLogger(__name__)


@dataclass
class SlideRun:
    """Outcome of one slide: ``done``, ``skipped`` or ``failed`` (with the one-line reason)."""

    slide: str
    status: str
    seconds: float = 0.0
    message: str = ""
    notebook: str = ""
    worker: str = ""


def _kill_when(path: Path, fault: Path) -> None:
    """Fault injection for the tests: kill this worker process once ``path`` appears (mid-slide)."""
    from helpers.cohort import worker_name

    fault.write_text(f"{worker_name()}\n")

    def watch() -> None:
        while not path.exists():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()


def slide_task(name: str, notebook: str, output: str, values: dict, done_dir: str, tf_threads: int | None = None,
               timeout: int = 24 * 3600, fault: str | None = None) -> dict:
    """One slide on a worker: run ``notebook`` with ``values`` into ``output``; never raises.

    Args:
        name: The slide's name (its file stem).
        notebook: Source notebook (07 or 01).
        output: The executed copy to write (the slide's report).
        values: Notebook parameters.
        done_dir: The folder whose done marker means the slide is finished.
        tf_threads: TensorFlow intra/inter-op threads for the notebook's kernel (None: unchanged).
        timeout: Seconds allowed per notebook cell.
        fault: Tests only: a flag file; if missing, it is created and this worker is killed mid-slide.

    Returns:
        A :class:`SlideRun` as a dict.
    """
    from helpers.cohort import worker_name
    from helpers.runner import run_notebook

    t0 = time.perf_counter()
    worker, done = worker_name(), Path(done_dir)
    if is_done(done) and not values.get("overwrite"):  # finished by an earlier attempt of this task
        return asdict(SlideRun(name, "skipped", 0.0, f"{done} is done", output, worker))
    note = ""
    if not values.get("overwrite") and any((done / f).exists() for f in PARTIAL_RESULTS):
        values = {**values, "overwrite": True}  # interrupted after its prediction: not done, so redo it
        note = "restarted: an earlier run stopped before its done marker"
    for stale in done.parent.glob(f".{done.name}.*.part"):  # an atomic folder a killed run left behind
        shutil.rmtree(stale, ignore_errors=True)
    if tf_threads:
        for var in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS"):
            os.environ[var] = str(tf_threads)
    if fault and not Path(fault).exists():
        _kill_when(done, Path(fault))
    try:
        run_notebook(notebook, output, values, timeout=timeout)
        return asdict(SlideRun(name, "done", time.perf_counter() - t0, note, output, worker))
    except HistoUNetError as exc:
        msg = str(exc)
    except Exception as exc:  # noqa: BLE001 - one slide's failure must not stop the cohort
        msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return asdict(SlideRun(name, "failed", time.perf_counter() - t0, msg, output, worker))


def _jobs(step: str, paths: list[Path], workdir: Path, values: dict, overwrite: bool, tf_threads: int | None,
          annotations: Path | None, fault: str | None) -> tuple[list[dict], list[SlideRun]]:
    """The tasks to run and the slides skipped before any runs (done, or no annotations for 01)."""
    notebook = NOTEBOOKS[step]
    out_dir = workdir / "notebooks" / "batch"
    jobs, skipped = [], []
    for path in paths:
        name = path.stem
        if step == "07":
            done = step_dir(workdir, "predictions") / name
            vals = {**values, "workdir": str(workdir), "slide": str(path.resolve()), "overwrite": overwrite}
        else:
            from helpers.annotations import find_annotation_file

            slide_wd = workdir / TILES_BY_SLIDE / name
            done = step_dir(slide_wd, "tiles")
            if find_annotation_file(annotations, name) is None:
                skipped.append(SlideRun(name, "skipped", message=f"no {name}.geojson in {annotations}"))
                continue
            vals = {**values, "workdir": str(slide_wd), "slides": str(path.resolve()),
                    "annotations": str(annotations), "overwrite": overwrite}
        if is_done(done) and not overwrite:
            skipped.append(SlideRun(name, "skipped", message=f"{done} is done"))
            continue
        jobs.append({"name": name, "notebook": str(notebook), "output": str(out_dir / f"{notebook.stem}_{name}.ipynb"),
                     "values": vals, "done_dir": str(done), "tf_threads": tf_threads, "fault": fault})
    return jobs, skipped


def run_cohort(slides: str | Path, workdir: str | Path, *, step: str = "07", workers: int | None = None,
               scheduler: str | None = None, mpp: float | None = None, params: dict | None = None,
               annotations: str | Path | None = None, overwrite: bool = False, tf_threads: int | None = None,
               progress: bool = True, fault: str | None = None, cluster=None) -> list[SlideRun]:
    """Run notebook ``step`` (07 inference, 01 tile export) on every slide, one Dask task per slide.

    Args:
        slides: Folder of slides (or one slide file).
        workdir: The work folder (``model/`` for 07; results are written there).
        step: ``"07"`` (predictions, ``predictions/cohort.csv``) or ``"01"`` (tiles per slide, gathered
            into ``tiles/``).
        workers: LocalCluster workers (None: half the cores; 0: sequential, no Dask).
        scheduler: ``tcp://host:8786`` of an existing Dask cluster (``workers`` is then ignored).
        mpp: Level-0 um/px for slides that store none (``slide_mpp``).
        params: Extra notebook parameters (overlap, blend, tile_size, ...).
        annotations: 01 only: folder of ``<slide>.geojson`` (default ``workdir/annotations``).
        overwrite: Redo slides that are done.
        tf_threads: TensorFlow threads per slide (see :func:`helpers.cohort.open_cluster`).
        progress: Show the progress bar and the dashboard address.
        fault: Tests only (see :func:`slide_task`).
        cluster: An open :class:`helpers.cohort.Cluster` to use instead of starting one.

    Returns:
        One :class:`SlideRun` per slide, in slide order.

    Raises:
        ParameterError, ClusterError, SlideError: no slides, unknown parameters, unreachable
            scheduler, a folder the workers cannot see.
    """
    from helpers.cohort import check_shared, open_cluster, run_tasks
    from helpers.runner import select_parameters
    from helpers.slides import find_slides

    if step not in NOTEBOOKS:
        raise ParameterError(f"step must be 07 or 01; got {step!r}")
    workdir = Path(workdir).resolve()
    paths = find_slides(slides)
    if not paths:
        raise ParameterError(f"{slides}: no slide files found (endings .svs, .tiff, .ndpi, .mrxs, ...)")
    values = select_parameters(NOTEBOOKS[step], dict(params or {}))
    if mpp is not None:
        values["slide_mpp"] = float(mpp)
    ann = Path(annotations).resolve() if annotations else step_dir(workdir, "annotations")
    (workdir / "notebooks" / "batch").mkdir(parents=True, exist_ok=True)
    if step == "07" and values.get("model_dir"):
        values["model_dir"] = str(Path(values["model_dir"]).resolve())  # the notebook runs in notebooks/
    needed = ann if step == "01" else Path(values.get("model_dir") or step_dir(workdir, "model"))
    if not needed.exists():
        fix = "put <slide>.geojson files there or pass --annotations" if step == "01" else \
            "run notebook 05_train_model first or set model_dir"
        raise ParameterError(f"{needed}: not found; {fix}")
    visible = [workdir, *(p.resolve() for p in paths), NOTEBOOKS[step], needed]
    with contextlib.ExitStack() as stack:
        if cluster is None:
            cluster = stack.enter_context(open_cluster(workers, scheduler, tf_threads))
        if progress:
            kind = "sequential" if cluster.client is None else f"{cluster.workers} Dask worker(s)"
            print(f"{len(paths)} slide(s) on {kind}; {cluster.dashboard}", flush=True)
        check_shared(cluster, visible, writable=[workdir])
        jobs, skipped = _jobs(step, paths, workdir, values, overwrite, cluster.tf_threads, ann, fault)
        rows = run_tasks(cluster, slide_task, jobs, desc=f"{step} slides", progress=progress)
    by_name = {r.slide: r for r in skipped} | {r["slide"]: SlideRun(**r) for r in rows}
    runs = [by_name[p.stem] for p in paths]
    if step == "07":
        write_cohort_table(runs, workdir)
    else:
        write_tile_table(runs, workdir)
        gather_tiles(workdir, [r.slide for r in runs if r.status != "skipped" or "is done" in r.message],
                     overwrite=overwrite, complete=not any(r.status == "failed" for r in runs))
    return runs


run_batch = run_cohort  # the earlier name


def cohort_table(runs: list[SlideRun], workdir: str | Path) -> pd.DataFrame:
    """slide, status, seconds, worker, tumour_fraction, area_mm2_<class>..., message, notebook."""
    from helpers.io import read_json

    rows = []
    for r in runs:
        row = {"slide": r.slide, "status": r.status, "seconds": round(r.seconds, 2), "worker": r.worker,
               "tumour_fraction": float("nan")}
        summary = step_dir(workdir, "predictions") / r.slide / "summary.json"
        if r.status != "failed" and summary.is_file():
            s = read_json(summary)
            row["tumour_fraction"] = s.get("tumour_fraction", float("nan"))  # the class map's headline class
            row.update({f"area_mm2_{k}": v for k, v in s.get("areas_mm2", {}).items()})
        rows.append(row | {"message": r.message, "notebook": r.notebook})
    table = pd.DataFrame(rows)
    front = ["slide", "status", "seconds", "worker", "tumour_fraction"]
    areas = [c for c in table.columns if c.startswith("area_mm2_")]
    return table[front + areas + ["message", "notebook"]]


def write_cohort_table(runs: list[SlideRun], workdir: str | Path) -> Path:
    """Write ``predictions/cohort.csv`` (replaced on every run: it is this run's report)."""
    from helpers.io import write_manifest

    return write_manifest(cohort_table(runs, workdir), step_dir(workdir, "predictions", create=True) / "cohort.csv",
                          overwrite=True)


def write_tile_table(runs: list[SlideRun], workdir: str | Path) -> Path:
    """Write ``tiles_by_slide/cohort.csv``: slide, status, seconds, worker, tiles, message, notebook."""
    from helpers.io import make_dir, write_manifest

    folder = Path(workdir) / TILES_BY_SLIDE
    rows = []
    for r in runs:
        manifest = step_dir(folder / r.slide, "tiles") / DONE
        tiles = len(pd.read_csv(manifest)) if r.status != "failed" and manifest.is_file() else 0
        rows.append({"slide": r.slide, "status": r.status, "seconds": round(r.seconds, 2), "worker": r.worker,
                     "tiles": tiles, "message": r.message, "notebook": r.notebook})
    make_dir(folder)
    return write_manifest(pd.DataFrame(rows), folder / "cohort.csv", overwrite=True)


def gather_tiles(workdir: str | Path, slides: list[str], overwrite: bool = False, complete: bool = True) -> Path | None:
    """Build ``workdir/tiles/`` from the per-slide tile folders, as one run of 01 over all slides writes it.

    Tiles are hard-linked (copied where links are impossible, e.g. across filesystems); the
    manifests are concatenated in slide order. Skipped when a slide failed (``complete`` False),
    or when nothing changed since the last gather.

    Returns:
        The tiles folder, or None if it was not (re)written.
    """
    from helpers.io import atomic_dir, write_manifest

    workdir = Path(workdir)
    out = step_dir(workdir, "tiles")
    parts = [step_dir(workdir / TILES_BY_SLIDE / s, "tiles") for s in slides]
    parts = [p for p in parts if is_done(p)]
    if not complete:
        log.warning("%s not written: some slides failed; fix them and run again (done slides are skipped)", out)
        return None
    if not parts:
        return None
    newest = max((p / DONE).stat().st_mtime for p in parts)
    gathered = (out / GATHERED).is_file()
    if is_done(out) and gathered and (out / DONE).stat().st_mtime >= newest and not overwrite:
        return None  # up to date
    tables = []
    with atomic_dir(out, overwrite=overwrite or gathered) as tmp:
        for part in parts:
            table = pd.read_csv(part / DONE)
            for rel in list(table["image"]) + list(table["label"]):
                src, dst = part.parent / rel, tmp / Path(rel).name
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copy2(src, dst)
            tables.append(table)
        (tmp / GATHERED).write_text("tiles/ gathered from tiles_by_slide/ by helpers.batch --step 01\n")
        write_manifest(pd.concat(tables, ignore_index=True), tmp / DONE)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", required=True, help="folder of slides, or one slide file")
    ap.add_argument("--workdir", required=True, help="work folder (model/ for 07); results are written there")
    ap.add_argument("--step", default="07", choices=sorted(NOTEBOOKS), help="07 inference (default) or 01 tile export")
    ap.add_argument("--workers", type=int, default=None, help="LocalCluster workers (default: cores/2; 0: no Dask)")
    ap.add_argument("--scheduler", default=None, help="tcp://host:8786 of a running Dask scheduler")
    ap.add_argument("--tf-threads", type=int, default=None, help="TensorFlow threads per slide (default: cores/workers)")
    ap.add_argument("--mpp", type=float, default=None, help="level-0 um/px for slides that store none")
    ap.add_argument("--annotations", default=None, help="01: folder of <slide>.geojson (default: workdir/annotations)")
    ap.add_argument("--params", default=None, help="YAML file of extra notebook parameters")
    ap.add_argument("--overwrite", action="store_true", help="redo slides that are done")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        params = yaml.safe_load(Path(args.params).read_text()) if args.params else None
        runs = run_cohort(args.slides, args.workdir, step=args.step, workers=args.workers, scheduler=args.scheduler,
                          mpp=args.mpp, params=params, annotations=args.annotations, overwrite=args.overwrite,
                          tf_threads=args.tf_threads, progress=not args.no_progress)
    except (HistoUNetError, OSError, yaml.YAMLError) as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2
    failed = [r for r in runs if r.status == "failed"]
    counts = {s: sum(r.status == s for r in runs) for s in ("done", "skipped", "failed")}
    where = "predictions/cohort.csv" if args.step == "07" else f"{TILES_BY_SLIDE}/cohort.csv, tiles/"
    print(f"\n{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed "
          f"(see {Path(args.workdir) / where})")
    for r in failed:
        print(f"FAILED {r.slide}: {r.message}" + ("" if not r.notebook or r.notebook in r.message
                                                 else f"  (see {r.notebook})"), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
