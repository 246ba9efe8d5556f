"""Run the numbered notebooks in order with papermill (``make demo``, the chain test).

Usage::

    python -m helpers.pipeline --workdir runs/demo --params data/params/demo [--only 00 01] [--overwrite]

Each notebook gets ``workdir`` (absolute) plus the values in ``<params>/<notebook>.yaml``
when that file exists; only parameters the notebook declares are passed. Executed
copies go to ``<workdir>/notebooks/``; the source notebooks are never written
(:func:`helpers.runner.run_notebook`).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path

import yaml

from helpers.errors import HistoUNetError
from helpers.runner import run_notebook, select_parameters

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
log = logging.getLogger("histo-unet")


def chain(notebooks_dir: Path = NOTEBOOKS) -> list[Path]:
    """The numbered notebooks ``NN_verb_object.ipynb``, in order."""
    return sorted(p for p in notebooks_dir.glob("*.ipynb") if re.match(r"^\d\d_", p.name))


def notebook_parameters(nb_path: Path, workdir: Path, params_dir: Path | None, overwrite: bool) -> dict:
    """Parameters to pass: workdir, overwrite, and the notebook's YAML values it declares."""
    values: dict = {"workdir": str(workdir.resolve())}
    if overwrite:
        values["overwrite"] = True
    source = None
    if params_dir is not None:
        source = params_dir / f"{nb_path.stem}.yaml"
        if source.is_file():
            values.update(yaml.safe_load(source.read_text()) or {})
    return select_parameters(nb_path, values, source, optional=("workdir", "overwrite"))


def run_chain(workdir: str | Path, params_dir: str | Path | None = None, only: list[str] | None = None,
              overwrite: bool = False, notebooks_dir: Path = NOTEBOOKS, timeout: int = 3600) -> list[tuple[str, float]]:
    """Execute the numbered notebooks in order; stop at the first failure.

    Returns:
        ``[(notebook name, seconds), ...]`` for the notebooks run.
    """
    workdir = Path(workdir)
    out_dir = workdir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    params_dir = Path(params_dir) if params_dir else None
    timings = []
    todo = [nb for nb in chain(notebooks_dir) if not only or nb.name[:2] in only or nb.stem in only]
    if not todo:
        raise HistoUNetError(f"{notebooks_dir}: no notebooks match {only}")
    for nb in todo:
        params = notebook_parameters(nb, workdir, params_dir, overwrite)
        print(f"==> {nb.name}  {params}", flush=True)
        dt = run_notebook(nb, out_dir / nb.name, params, timeout=timeout)
        timings.append((nb.name, dt))
        print(f"    done in {dt:.1f} s", flush=True)
    return timings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--params", default=None, help="folder of <notebook>.yaml parameter files")
    ap.add_argument("--only", nargs="*", default=None, help="notebook numbers or names to run")
    ap.add_argument("--overwrite", action="store_true", help="replace earlier results in the workdir")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        timings = run_chain(args.workdir, args.params, args.only, args.overwrite)
    except HistoUNetError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    total = time.perf_counter() - t0
    wd = Path(args.workdir)
    print("\nSteps:")
    for name, dt in timings:
        print(f"  {name:<32} {dt:7.1f} s")
    print(f"  {'total':<32} {total:7.1f} s\n")
    print(f"Results in {wd}/:")
    for label, pattern in [("executed notebooks", "notebooks/*.ipynb"), ("slides", "slides/*"),
                           ("GeoJSON for QuPath", "predictions/*/*.geojson"), ("training GIF", "gif/*.gif"),
                           ("metrics", "evaluation/*.csv"), ("model", "model/*.keras")]:
        found = sorted(wd.glob(pattern))
        if found:
            print(f"  {label:<20} " + ", ".join(str(p) for p in found[:4]) + (" ..." if len(found) > 4 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
