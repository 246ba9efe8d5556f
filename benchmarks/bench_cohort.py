"""A cohort on Dask: slides/hour for 1 and 2 workers, and Dask's scheduling overhead per slide.

Run ``python -m benchmarks.bench_cohort [N]`` from the repository root. It writes a cohort of
N tiny synthetic slides (default 4, 320x240 px) and the per-pixel colour model of
``tests/slide_fixtures.py``, then runs notebook 07 on every slide with :mod:`helpers.batch`:

* sequentially, without Dask (``workers=0``): the reference;
* on a LocalCluster of 1 worker and of 2 workers (loopback; cluster start timed apart);

and reports slides/hour of each, and the scheduling overhead per slide: wall time minus the
time spent inside the slides' tasks, divided by N (Dask's submit/ship/collect/progress cost;
the sequential run's own bookkeeping shown beside it). A second overhead figure sends 50
empty tasks through the same path (:func:`helpers.cohort.run_tasks`). Every run's outputs
are checked bit-identical to the sequential run's.

Target (issue 14): scheduling overhead below 1 s per slide. On a shared machine the slide
times swing with the load (printed); the overhead figures do not depend on the slide time.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARAMS = {"overlap": 1, "batch_size": 4, "min_area_um2": 100.0}


def _cohort(root: Path, n: int) -> Path:
    """N tiny slides and the colour model in ``root``."""
    sys.path.insert(0, str(ROOT / "tests"))
    from slide_fixtures import make_colour_model, synthetic_image, write_slide

    from helpers.config import load_class_map

    make_colour_model(root / "model", load_class_map(ROOT / "data" / "classes.yaml"), mpp=1.0, tile_size=64)
    for i in range(n):
        write_slide(root / "slides" / f"slide{i:03d}.tiff", synthetic_image(320, 240, seed=i)[0], mpp=0.5)
    return root / "slides"


def _noop(name: str) -> dict:
    return {"slide": name, "status": "done", "seconds": 0.0, "worker": "", "message": ""}


def _run(slides: Path, root: Path, label: str, workers: int) -> dict:
    """One cohort run in a fresh work folder; wall seconds (without cluster start) and in-task seconds."""
    from helpers.batch import run_cohort
    from helpers.cohort import open_cluster

    wd = root / label
    shutil.copytree(root / "model", wd / "model")
    t_start = time.perf_counter()
    with open_cluster(workers, dashboard_address=None) as cluster:
        t0 = time.perf_counter()
        runs = run_cohort(slides, wd, params=PARAMS, cluster=cluster, progress=False)
        wall = time.perf_counter() - t0
        noop = None
        if cluster.client is not None:
            from helpers.cohort import run_tasks

            t1 = time.perf_counter()
            run_tasks(cluster, _noop, [{"name": f"n{i}"} for i in range(50)], progress=False)
            noop = (time.perf_counter() - t1) / 50
    bad = [r for r in runs if r.status != "done"]
    if bad:
        raise RuntimeError(f"{label}: {bad[0].slide} {bad[0].status}: {bad[0].message}")
    in_task = sum(r.seconds for r in runs)
    return {"wd": wd, "wall": wall, "start": t0 - t_start, "in_task": in_task, "noop": noop, "n": len(runs)}


def _identical(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in (a / "predictions").iterdir() if p.is_dir())
    return all((a / "predictions" / s / f).read_bytes() == (b / "predictions" / s / f).read_bytes()
               for s in names for f in ("probabilities.tiff", "labels.tiff"))


def main(n: int = 4) -> dict:
    from helpers.cohort import cpu_count

    root = Path(tempfile.mkdtemp(prefix="bench_cohort."))
    try:
        slides = _cohort(root, n)
        load0 = os.getloadavg()[0]
        seq = _run(slides, root, "sequential", 0)
        one = _run(slides, root, "dask1", 1)
        two = _run(slides, root, "dask2", 2)
        load1 = os.getloadavg()[0]
        res = {
            "slides": n, "cores": cpu_count(), "load_1min": f"{load0:.1f} -> {load1:.1f}",
            "sequential_slides_per_hour": round(n / seq["wall"] * 3600, 1),
            "dask_1_worker_slides_per_hour": round(n / one["wall"] * 3600, 1),
            "dask_2_workers_slides_per_hour": round(n / two["wall"] * 3600, 1),
            "speedup_2_vs_1_worker": round(one["wall"] / two["wall"], 2),
            "seconds_per_slide_in_task_seq_dask1_dask2": [round(r["in_task"] / n, 1) for r in (seq, one, two)],
            "overhead_s_per_slide_sequential": round((seq["wall"] - seq["in_task"]) / n, 3),
            "overhead_s_per_slide_dask_1_worker": round((one["wall"] - one["in_task"]) / n, 3),
            "dask_overhead_vs_sequential_s_per_slide": round(((one["wall"] - one["in_task"])
                                                              - (seq["wall"] - seq["in_task"])) / n, 3),
            "dask_empty_task_round_trip_s": round(one["noop"], 4),
            "cluster_start_s_1_2_workers": [round(one["start"], 1), round(two["start"], 1)],
            "bit_identical_to_sequential": _identical(seq["wd"], one["wd"]) and _identical(seq["wd"], two["wd"]),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for k, v in res.items():
        print(f"{k}: {v}")
    return res


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4)
