"""A QuPath-style pixel classifier on the real-data benchmark: the baseline the U-Net has to beat.

Usage::

    python -m benchmarks.pixel_classifier_real [--data ../shared/data/real] [--sources ...]
        [--seeds 0 1 2] [--classifier rtrees ann] [--mpp 1.0] [--postprocess [07.yaml]]
        [--out benchmarks/results/pixel_classifier_real.csv]

QuPath's own answer to "learn this tissue from my strokes" is its pixel classifier
(*Classify > Pixel classification > Train pixel classifier*): multi-scale filter
features of the image's channels, fed to an OpenCV classifier (random trees or an
artificial neural network, ``ANN_MLP``) trained on the annotated pixels. This script
builds the same kind of classifier (our code, QuPath's recipe as documented) on exactly
the strokes :mod:`benchmarks.bench_real` gives the U-Net, and scores it on the same
held-out half, so the two figures compare directly:

* **Strokes**: :func:`benchmarks.bench_real.simulate_annotations` with the same source YAML
  and annotator seed (the raw strokes, as a QuPath user would train on them; the U-Net's
  chain also applies 03's refinement).
* **Resolution**: ``--mpp`` (default 1.0 um/px, the U-Net recipe's tile resolution); the
  image is resized with area averaging, the prediction is brought back to the truth's
  grid by nearest neighbour.
* **Features**: :func:`helpers.densify.pixel_features` (haematoxylin, eosin and grey; at sigma
  1, 2, 4, 8 um: Gaussian, Laplacian of Gaussian, gradient magnitude, Hessian and
  structure-tensor eigenvalues, weighted standard deviation: 96 features), the features
  03's ``densify: forest`` uses.
* **Training**: at most ``--per-class`` (default 20,000) random annotated pixels per class.
  ``rtrees``: a random forest (QuPath's "Random trees": 100 trees, depth 20, at least 5
  pixels per leaf); ``ann``: a multilayer perceptron (QuPath's "Artificial neural network":
  one hidden layer of 32 units, standardized features). QuPath uses OpenCV's classifiers;
  OpenCV 5 moved them to its contrib package, so scikit-learn's are used here (``[dev]``).
* **Post-processing** (``--postprocess``): the classifier's probabilities go through 07's smoothing,
  hole filling and small-region removal first, as the U-Net's ``bench_real`` figures do (07's labels).
* **Score**: per-class confusion of the held-out right half against the dense truth, pooled
  per source (:func:`benchmarks.bench_real.confusion`): the same figures as ``bench_real``.

Prints a table (headline IoU per source and seed, mean +- sd) and writes the CSV.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_real import (DATA, confusion, dense_truth, list_sources, load_source, read_mask, read_rgb,
                                   scores, simulate_annotations, train_part)
from helpers.densify import SIGMAS_UM, SoftVote, fit_forest, fit_mlp, pixel_features

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "pixel_classifier_real.csv"


def resize(img: np.ndarray, shape: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """``img`` resized to ``shape`` (h, w): area averaging, or nearest neighbour for labels."""
    import cv2

    if img.shape[:2] == shape:
        return img
    return cv2.resize(img, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA)


def train_classifier(x: np.ndarray, y: np.ndarray, kind: str, seed: int = 0):
    """A classifier trained on ``x`` (n, f) float32 with labels ``y`` (n,); returns ``predict(x) -> labels``."""
    if kind == "rtrees":
        model = fit_forest(x, y, seed, trees=100, depth=20)
        predict = lambda z: model.predict(z).astype(np.int64)  # noqa: E731
        predict.model = model  # type: ignore[attr-defined]
        return predict
    if kind in ("ann", "rtrees_ann"):
        # rtrees_ann: 03's densify "forest_mlp", with the baseline's forest size
        model = fit_mlp(x, y, seed) if kind == "ann" else SoftVote([fit_forest(x, y, seed, trees=100, depth=20),
                                                                      fit_mlp(x, y, seed)])
        predict = lambda z: np.asarray(model.predict(z)).astype(np.int64)  # noqa: E731
        predict.model = model  # type: ignore[attr-defined]
        return predict
    raise ValueError(f"classifier must be 'rtrees', 'ann' or 'rtrees_ann'; got {kind!r}")


def postprocessed(model, f: np.ndarray, class_map, mpp: float, settings: dict) -> np.ndarray:
    """Labels from the classifier's probabilities through 07's post-processing (``settings``: 07's YAML)."""
    from helpers.model import background_index
    from helpers.postprocess import postprocess_labels
    from helpers.teacher import class_probabilities

    h, w = f.shape[:2]
    full = class_probabilities(model, f.reshape(h * w, -1), class_map.n_classes)
    probs = np.rint(full * 255).astype(np.uint8).reshape(h, w, -1)  # 07's raster holds uint8 probabilities
    keys = ("smoothing", "smoothing_size", "opening_px", "closing_px", "fill_holes_um2", "min_area_um2")
    labels, _ = postprocess_labels(probs, mpp=mpp, background_label=background_index(class_map) + 1,
                                   **{k: settings[k] for k in keys if settings.get(k) is not None})
    return np.asarray(labels)


def run_source(source, class_map, seed: int, kinds: list[str], mpp: float = 1.0, per_class: int = 20_000,
               postprocess: dict | None = None, sigmas_um: tuple[float, ...] = SIGMAS_UM) -> list[dict]:
    """Train each classifier on one source's strokes (all images, left halves); pooled held-out scores.

    ``postprocess``: 07's settings (e.g. ``data/params/real/07_infer_slide.yaml``) to apply to the
    classifier's probabilities first, as the U-Net's figures have them; None: the plain argmax.
    ``sigmas_um``: the filter scales of the features (03's by default).
    """
    t0 = time.perf_counter()
    scale = source.mpp / mpp  # classifier px per image px
    feats, truths, strokes = {}, {}, {}
    for stem, img_path, mask_path in source.pairs():
        image, mask = read_rgb(img_path), read_mask(mask_path)
        truth = dense_truth(image, mask, source, class_map)
        labels, _ = simulate_annotations(truth, class_map, source.mpp, source.annotator, seed, stem)
        small = (max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale)))
        feats[stem] = pixel_features(resize(image, small), mpp, tuple(sigmas_um))
        strokes[stem] = resize(labels, small, nearest=True)
        truths[stem] = truth
    rng = np.random.default_rng(seed)
    xs = np.concatenate([feats[s][strokes[s] > 0] for s in feats])
    ys = np.concatenate([strokes[s][strokes[s] > 0] for s in feats])
    keep = np.concatenate([rng.permutation(np.flatnonzero(ys == c))[:per_class] for c in np.unique(ys)])
    x_train, y_train = xs[keep], ys[keep]
    t_feat = time.perf_counter() - t0
    n = class_map.n_classes
    rows = []
    for kind in kinds:
        t1 = time.perf_counter()
        predict = train_classifier(x_train, y_train, kind, seed)
        t_train = time.perf_counter() - t1
        pooled = np.zeros((n, n), np.int64)
        for stem, f in feats.items():
            if postprocess is None:
                pred = predict(f.reshape(-1, f.shape[-1])).reshape(f.shape[:2]).astype(np.uint8)
            else:
                pred = postprocessed(predict.model, f, class_map, mpp, postprocess)
            truth = truths[stem]
            pred = resize(pred, truth.shape, nearest=True)
            pooled += confusion(np.where(~train_part(truth.shape), truth, 0), pred, n)
        s = scores(pooled)
        head = class_map.headline.label - 1
        rows.append({"source": source.name, "seed": seed, "classifier": kind + ("+pp" if postprocess else ""),
                     "headline": source.headline,
                     "iou": float(s["iou"][head]), "precision": float(s["precision"][head]),
                     "recall": float(s["recall"][head]),
                     **{f"iou {name}": float(s["iou"][i]) for i, name in enumerate(class_map.names)
                        if s["truth_px"][i] > 0},
                     "training_pixels": int(len(y_train)), "feature_seconds": round(t_feat, 2),
                     "train_seconds": round(t_train, 2), "seconds": round(time.perf_counter() - t1 + t_feat, 2)})
        print(f"{source.name:<24} seed {seed} {kind:<7} {source.headline} IoU {rows[-1]['iou']:.3f} "
              f"(prec {rows[-1]['precision']:.2f} / rec {rows[-1]['recall']:.2f}), "
              f"{len(y_train)} training px, {rows[-1]['seconds']:.1f} s", flush=True)
    return rows


def summary(rows: list[dict]):
    """Headline IoU per classifier and source: mean +- sd over seeds, and the mean over sources per seed."""
    import pandas as pd

    df = pd.DataFrame(rows)
    per = df.groupby(["classifier", "source"])["iou"].agg(["mean", "std", "count"]).reset_index()
    means = df.groupby(["classifier", "seed"])["iou"].mean().groupby("classifier").agg(["mean", "std"])
    return per, means


def main(argv: list[str] | None = None) -> list[dict]:
    from helpers.config import load_class_map
    from helpers.errors import HistoUNetError

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DATA), help="folder of sources (as bench_real)")
    ap.add_argument("--sources", nargs="*", default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="annotator seeds")
    ap.add_argument("--classifier", nargs="+", default=["rtrees", "ann"], choices=["rtrees", "ann", "rtrees_ann"],
                    help="rtrees: random forest; ann: small neural network; rtrees_ann: the mean of the two's probabilities")
    ap.add_argument("--mpp", type=float, default=1.0, help="um/px the classifier works at")
    ap.add_argument("--per-class", type=int, default=20_000, help="training pixels per class (at most)")
    ap.add_argument("--postprocess", nargs="?", const=str(ROOT / "data" / "params" / "real" / "07_infer_slide.yaml"),
                    default=None, metavar="YAML", help="apply 07's post-processing (smoothing, hole filling, small "
                    "regions) from this YAML first, as the U-Net's figures have it (default YAML: the real recipe's)")
    ap.add_argument("--sigmas", type=float, nargs="+", default=list(SIGMAS_UM), metavar="UM",
                    help="filter scales of the features in um (default: 03's)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    data = Path(args.data)
    if not data.is_dir():
        raise SystemExit(f"ERROR: {data}: data folder not found; pass --data <folder of image + mask pairs>")
    cmap = load_class_map()
    settings = None
    if args.postprocess:
        import yaml

        pp_file = Path(args.postprocess)
        if not pp_file.is_file():
            raise SystemExit(f"ERROR: {pp_file}: 07 settings not found; pass --postprocess <07_infer_slide.yaml>")
        settings = yaml.safe_load(pp_file.read_text()) or {}
    rows: list[dict] = []
    try:
        for seed in args.seeds:
            for name in args.sources or list_sources(data):
                rows += run_source(load_source(data, name), cmap, seed, args.classifier, args.mpp, args.per_class,
                                   settings, tuple(args.sigmas))
    except HistoUNetError as exc:
        raise SystemExit(f"ERROR: {exc}") from None
    import pandas as pd

    from helpers.io import write_text

    per, means = summary(rows)
    print("\nHeld-out headline IoU (right half), mean +- sd over annotator seeds:")
    print(per.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print("\nMean over sources, then mean +- sd over seeds:")
    print(means.to_string(float_format=lambda v: f"{v:.3f}"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(pd.DataFrame(rows).to_csv(index=False), out, overwrite=True)  # a benchmark's result: replaced
    print(f"written: {out}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
