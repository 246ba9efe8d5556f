"""Test-time augmentation on a finished ``bench_real`` run: held-out headline IoU without and with TTA.

Usage::

    python -m benchmarks.tta_real --workdir runs/bench_real_p2_all [--sources glas_colon] [--modes none flips d4]

Per source and mode, every slide is predicted again with 07's settings (``params/07_infer_slide.yaml``:
overlap, blend) through :func:`helpers.predict.predict_slide`, its per-tile model call wrapped by
:func:`helpers.tta.with_tta` (the one-line change 07 would need), into ``tta/<mode>/<slide>/``.
The argmax of the probabilities (no post-processing, for every mode alike) is read onto the truth grid and
scored on the held-out right half, as :mod:`benchmarks.bench_real` scores. Seconds per mode are printed.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_real import confusion, scores, train_part

ROOT = Path(__file__).resolve().parent.parent


def run(wd: Path, mode: str, cmap) -> dict:
    import cv2
    import yaml

    import helpers.predict as predict
    from helpers.rasters import read_raster
    from helpers.tta import with_tta

    p07 = yaml.safe_load((wd / "params" / "07_infer_slide.yaml").read_text()) or {}
    original = predict._make_predict_fn
    predict._make_predict_fn = lambda *a, **k: with_tta(original(*a, **k), mode)
    n = cmap.n_classes
    cm = np.zeros((n, n), np.int64)
    t0 = time.perf_counter()
    try:
        for slide in sorted((wd / "slides").glob("*.tiff")):
            out = wd / "tta" / mode / slide.stem
            predict.predict_slide(slide, wd / "model", out, overlap=int(p07.get("overlap", 16)),
                                  blend=p07.get("blend", "gaussian"), batch_size=int(p07.get("batch_size", 8)),
                                  overwrite=True, progress=False)
            truth = np.asarray(read_raster(wd / "truth" / slide.name, downsample=1.0))
            prob = predict.read_probabilities(out)
            pred = (np.argmax(prob, -1) + 1).astype(np.uint8)
            pred = cv2.resize(pred, (truth.shape[1], truth.shape[0]), interpolation=cv2.INTER_NEAREST)
            cm += confusion(np.where(train_part(truth.shape), 0, truth), pred, n)
    finally:
        predict._make_predict_fn = original
    s = scores(cm)
    return {"mode": mode, "headline_iou": float(s["iou"][cmap.headline.label - 1]),
            "mean_iou": float(np.nanmean(s["iou"])), "seconds": round(time.perf_counter() - t0, 1),
            "load": round(os.getloadavg()[0], 1)}


def main(argv: list[str] | None = None) -> list[dict]:
    import pandas as pd

    from helpers.config import load_class_map

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "bench_real"))
    ap.add_argument("--sources", nargs="*", default=None)
    ap.add_argument("--modes", nargs="*", default=["none", "flips", "d4"])
    args = ap.parse_args(argv)
    cmap = load_class_map()
    rows = []
    for wd in sorted(p for p in Path(args.workdir).iterdir() if p.is_dir() and (not args.sources or p.name in args.sources)):
        if not (wd / "model" / "best.keras").is_file():
            continue
        for mode in args.modes:
            r = {"source": wd.name, **run(wd, mode, cmap)}
            print(r, flush=True)
            rows.append(r)
    print(pd.DataFrame(rows).round(3).to_string(index=False))
    return rows


if __name__ == "__main__":
    main()
