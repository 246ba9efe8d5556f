"""Batch inference: run ``notebooks/07_infer_slide.ipynb`` once per slide with papermill.

Usage::

    python -m helpers.batch --slides DIR_OR_FILE --workdir WD [--mpp 0.5] [--params p.yaml] [--overwrite]
    make batch SLIDES=DIR [MPP=0.5] [WORKDIR=runs/demo]

Each slide gets its own executed copy ``WD/notebooks/batch/07_infer_slide_<slide>.ipynb``
(the source notebook is never written; :func:`helpers.runner.run_notebook`). A slide whose
``WD/predictions/<slide>/`` is done (holds its ``manifest.csv``) is skipped unless
``--overwrite``. A failing slide does not stop the batch: the failures are listed at the
end and the exit code is 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from helpers.errors import HistoUNetError, ParameterError
from helpers.runner import run_notebook, select_parameters
from helpers.steps import is_done, step_dir

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "07_infer_slide.ipynb"
log = logging.getLogger(__name__)


@dataclass
class SlideRun:
    """Outcome of one slide: ``done``, ``skipped`` or ``failed`` (with the one-line reason)."""

    slide: str
    status: str
    seconds: float = 0.0
    message: str = ""
    notebook: str = ""


def run_batch(slides: str | Path, workdir: str | Path, *, mpp: float | None = None, params: dict | None = None,
              overwrite: bool = False, notebook: Path = NOTEBOOK, timeout: int = 24 * 3600,
              progress: bool = True) -> list[SlideRun]:
    """Run notebook 07 on every slide of ``slides`` (a folder or one file).

    Args:
        slides: Folder of slides (or a single slide file).
        workdir: The work folder holding ``model/`` (and ``stain/``); predictions go to
            ``workdir/predictions/<slide>/``.
        mpp: Level-0 um/px override for slides that store none (``slide_mpp``).
        params: Extra notebook parameters (overlap, blend, smoothing, ...).
        overwrite: Predict slides that already have results again.
        notebook: The notebook to run (07_infer_slide).
        timeout: Seconds allowed per cell.
        progress: Print one line per slide.

    Returns:
        One :class:`SlideRun` per slide, in order.
    """
    from helpers.slides import find_slides

    workdir = Path(workdir).resolve()
    paths = find_slides(slides)
    if not paths:
        raise ParameterError(f"{slides}: no slide files found (endings .svs, .tiff, .ndpi, .mrxs, ...)")
    out_dir = workdir / "notebooks" / "batch"
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = select_parameters(notebook, dict(params or {}))
    runs: list[SlideRun] = []
    for i, path in enumerate(paths, 1):
        name = path.stem
        pred_dir = step_dir(workdir, "predictions") / name
        if is_done(pred_dir) and not overwrite:
            runs.append(SlideRun(name, "skipped", message=f"{pred_dir} is done"))
            if progress:
                print(f"[{i}/{len(paths)}] {name}: skipped (already done)", flush=True)
            continue
        values = {**extra, "workdir": str(workdir), "slide": str(path.resolve()), "overwrite": bool(overwrite)}
        if mpp is not None:
            values["slide_mpp"] = float(mpp)
        nb_out = out_dir / f"{notebook.stem}_{name}.ipynb"
        t0 = time.perf_counter()
        try:
            run_notebook(notebook, nb_out, values, timeout=timeout)
            runs.append(SlideRun(name, "done", time.perf_counter() - t0, notebook=str(nb_out)))
        except HistoUNetError as exc:
            runs.append(SlideRun(name, "failed", time.perf_counter() - t0, str(exc), str(nb_out)))
        except Exception as exc:  # noqa: BLE001 - one slide's failure must not stop the batch
            runs.append(SlideRun(name, "failed", time.perf_counter() - t0, f"{type(exc).__name__}: {exc}",
                                 str(nb_out)))
        if progress:
            r = runs[-1]
            print(f"[{i}/{len(paths)}] {name}: {r.status} in {r.seconds:.1f} s" + (f" ({r.message})" if r.message else ""),
                  flush=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", required=True, help="folder of slides, or one slide file")
    ap.add_argument("--workdir", required=True, help="work folder with model/ (predictions are written there)")
    ap.add_argument("--mpp", type=float, default=None, help="level-0 um/px for slides that store none")
    ap.add_argument("--params", default=None, help="YAML file of extra 07_infer_slide parameters")
    ap.add_argument("--overwrite", action="store_true", help="predict slides that already have results again")
    args = ap.parse_args(argv)
    try:
        params = yaml.safe_load(Path(args.params).read_text()) if args.params else None
        runs = run_batch(args.slides, args.workdir, mpp=args.mpp, params=params, overwrite=args.overwrite)
    except (HistoUNetError, OSError, yaml.YAMLError) as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2
    failed = [r for r in runs if r.status == "failed"]
    counts = {s: sum(r.status == s for r in runs) for s in ("done", "skipped", "failed")}
    print(f"\n{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed "
          f"(results in {Path(args.workdir) / 'predictions'})")
    for r in failed:
        print(f"FAILED {r.slide}: {r.message}" + ("" if r.notebook in r.message else f"  (see {r.notebook})"),
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
