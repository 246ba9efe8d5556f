"""Diagnose a finished ``bench_real`` run (issue 11): split losses, label refinement, Background collapse.

Usage::

    python -m benchmarks.diagnose_real [--workdir runs/bench_real] [--sources ocdc_oral ...] [--bn]

Reads each source's work folder (``model/split.csv``, ``model/history.csv``,
``labels/manifest.csv``, ``truth/``) and prints, per source:

* **split**: tiles and labelled pixels per side (train / val / excluded);
* **labels vs truth** (03's rules measured against the dense mask): share of labelled pixels
  whose label is wrong before (01's rasterized strokes) and after refinement (03), Background
  labels put on tissue (truth not Background: lumen, fat, vacuoles), and bright unsaturated
  pixels (:func:`helpers.labels.glass_mask`, any size) that keep a tissue label;
* **validation Background**: labelled Background pixels in validation and their IoU per epoch;
* **white areas**: on the held-out half, glass-like areas touching the image border (open
  glass) and enclosed by tissue (lumen, fat, vacuoles): their truth and what the raw argmax
  and the post-processed labels say;
* with ``--bn``: validation IoU of ``best.keras`` in inference mode (batch-norm moving
  statistics) vs training mode (the batch's own statistics): a large gap means the moving
  statistics, not the weights, are what fails.
* with ``--checkpoint last`` only: held-out headline IoU of ``best.keras`` (what 07 predicted) and of
  another checkpoint of the same run (``last.keras``), predicted again with 07's recipe settings into
  ``<run>/checkpoint_last/`` (the run's own outputs are left alone).
* with ``--post`` only: held-out IoU of the stored probabilities under post-processing variants
  (:data:`POST_VARIANTS`: 07's ``fill_holes_um2`` sizes, and Background holes enclosed by the
  headline class filled with it, :func:`fill_enclosed_background`), without predicting again.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent


def split_summary(wd: Path, names: list[str]) -> pd.DataFrame:
    """Tiles and labelled pixels per split side."""
    df = pd.read_csv(wd / "model" / "split.csv")
    px = [f"px_{n}" for n in names]
    g = df.groupby("split")
    out = g.size().to_frame("tiles")
    out["labelled_px"] = g[px].sum().sum(axis=1)
    for n in names:
        out[n] = g[f"px_{n}"].sum()
    return out


def label_vs_truth(wd: Path, cmap) -> dict:
    """03's refinement measured against the dense truth (labelled pixels only)."""
    from helpers.io import read_image
    from helpers.labels import glass_mask, truth_tile
    from helpers.tiles import read_label_tile

    man = pd.read_csv(wd / "labels" / "manifest.csv")
    bg = cmap.background.label
    acc = {"before_labelled": 0, "before_wrong": 0, "after_labelled": 0, "after_wrong": 0,
           "bg_label_on_tissue": 0, "bg_label": 0, "bright_tissue_labelled": 0, "bright_tissue_labelled_headline": 0}
    img_col = "image_raw" if "image_raw" in man.columns else "image"
    for r in man.to_dict("records"):
        raw, ref = read_label_tile(wd / r["label_raw"]), read_label_tile(wd / r["label"])
        t = truth_tile(wd, r, raw.shape)
        image = read_image(wd / r[img_col])
        for key, lab in (("before", raw), ("after", ref)):
            m = (lab > 0) & (t > 0)
            acc[f"{key}_labelled"] += int(m.sum())
            acc[f"{key}_wrong"] += int((lab[m] != t[m]).sum())
        acc["bg_label"] += int((ref == bg).sum())
        acc["bg_label_on_tissue"] += int(((ref == bg) & (t > 0) & (t != bg)).sum())
        bright = glass_mask(image, min_area=1)
        acc["bright_tissue_labelled"] += int((bright & (ref > 0) & (ref != bg)).sum())
        acc["bright_tissue_labelled_headline"] += int((bright & (ref == cmap.headline.label)).sum())
    acc["wrong_before"] = acc["before_wrong"] / max(1, acc["before_labelled"])
    acc["wrong_after"] = acc["after_wrong"] / max(1, acc["after_labelled"])
    return acc


#: 03's rule sets compared by :func:`rules_vs_truth` (item 3 of issue 11).
RULE_SETS = {
    "03 default": {},
    "glass in tissue unlabelled": {"glass_in_tissue_unlabelled": True},
    "open free glass only": {"free_glass_min_area": 2500},
    "recipe (both)": {"glass_in_tissue_unlabelled": True, "free_glass_min_area": 2500},
}


def rules_vs_truth(wd: Path, cmap, rule_sets: dict[str, dict] | None = None) -> pd.DataFrame:
    """Label error against the dense truth of 01's raw labels and of 03's rules re-applied per rule set.

    Rows: ``raw (01)`` and each rule set; columns: labelled pixels (with a truth label),
    wrong pixels, wrong share, labelled share of the tiles, Background labels on tissue.
    """
    from helpers.io import read_image
    from helpers.labels import refine_label, truth_tile
    from helpers.tiles import read_label_tile

    rule_sets = RULE_SETS if rule_sets is None else rule_sets
    man = pd.read_csv(wd / "labels" / "manifest.csv")
    img_col = "image_raw" if "image_raw" in man.columns else "image"
    bg = cmap.background.label
    acc = {k: np.zeros(4, np.int64) for k in ["raw (01)", *rule_sets]}
    for r in man.to_dict("records"):
        raw = read_label_tile(wd / r["label_raw"])
        t = truth_tile(wd, r, raw.shape)
        image = read_image(wd / r[img_col])
        labs = {"raw (01)": raw}
        labs.update({k: refine_label(image, raw, cmap, **v) for k, v in rule_sets.items()})
        for k, lab in labs.items():
            m = (lab > 0) & (t > 0)
            acc[k] += [int(m.sum()), int((lab[m] != t[m]).sum()), lab.size, int(((lab == bg) & (t > 0) & (t != bg)).sum())]
    rows = [{"labels": k, "labelled_px": int(a[0]), "wrong_px": int(a[1]), "wrong": a[1] / max(1, a[0]),
             "labelled_share": a[0] / max(1, a[2]), "bg_on_tissue_px": int(a[3])} for k, a in acc.items()]
    return pd.DataFrame(rows).set_index("labels")


def bn_check(wd: Path, cmap) -> dict:
    """Validation IoU of best.keras with moving statistics (inference) vs batch statistics."""
    from helpers.model import load_trained, preprocess
    from helpers.train import _fit_multiple, _read_image, _read_label, confusion_matrix, iou_from_confusion

    split = pd.read_csv(wd / "model" / "split.csv")
    val = split[split["split"] == "val"]
    model, _ = load_trained(wd / "model")  # best.keras, as 07 uses it
    out = {}
    for mode in (False, True):
        cm = 0
        for r in val.to_dict("records"):
            img = _fit_multiple(_read_image(str(wd / r["image"])))
            lab = _fit_multiple(_read_label(str(wd / r["label"])))
            p = np.argmax(model(preprocess(img[None]), training=mode).numpy()[0], -1) + 1
            cm = cm + confusion_matrix(lab, p, cmap.n_classes)
        iou = iou_from_confusion(cm)
        out["training_mode" if mode else "inference_mode"] = {n: round(float(v), 3) for n, v in zip(cmap.names, iou)}
        out[("training_mode" if mode else "inference_mode") + "_pred_share"] = {
            n: round(float(v), 3) for n, v in zip(cmap.names, cm.sum(0) / max(1, cm.sum()))}
    return out


def main(argv: list[str] | None = None) -> dict:
    from helpers.config import load_class_map

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "bench_real"))
    ap.add_argument("--sources", nargs="*", default=None)
    ap.add_argument("--bn", action="store_true", help="also compare batch-norm inference vs training mode")
    ap.add_argument("--rules", action="store_true", help="only: 03's rule sets (RULE_SETS) against the dense truth")
    ap.add_argument("--post", action="store_true", help="only: post-processing variants (POST_VARIANTS), held-out IoU")
    ap.add_argument("--checkpoint", default=None, metavar="NAME",
                    help="only: held-out IoU of best.keras vs model/NAME.keras (e.g. last), predicted with 07's recipe")
    ap.add_argument("--ensemble", nargs="*", default=None, metavar="RUN",
                    help="only: held-out IoU of the mean probabilities of --workdir and these runs (same sources)")
    args = ap.parse_args(argv)
    cmap = load_class_map()
    base = Path(args.workdir)
    result = {}
    for wd in sorted(p for p in base.iterdir() if p.is_dir() and (not args.sources or p.name in args.sources)):
        if args.checkpoint and (wd / "model" / f"{args.checkpoint}.keras").is_file():
            res = checkpoint_scores(wd, cmap, args.checkpoint)
            print(f"{wd.name}: held-out headline IoU best.keras {res['best']:.3f}, {args.checkpoint}.keras "
                  f"{res[args.checkpoint]:.3f}", flush=True)
            result[wd.name] = res
            continue
        if args.ensemble is not None and (wd / "predictions").is_dir():
            runs = [wd, *(Path(r) / wd.name for r in args.ensemble)]
            pv = postprocess_variants(wd, cmap, {"07 recipe": ({}, None)}, others=runs[1:])
            print(f"\n===== {wd.name}: held-out IoU of the mean probabilities of {[str(r) for r in runs]}")
            print(pv.round(3).to_string())
            result[wd.name] = {"ensemble": pv.reset_index().to_dict("records")}
            continue
        if args.post and (wd / "predictions").is_dir():
            pv = postprocess_variants(wd, cmap)
            print(f"\n===== {wd.name}: held-out IoU per post-processing variant (stored probabilities)")
            print(pv.round(3).to_string())
            result[wd.name] = {"post": pv.reset_index().to_dict("records")}
            continue
        if args.rules and (wd / "labels" / "manifest.csv").is_file():
            rv = rules_vs_truth(wd, cmap)
            print(f"\n===== {wd.name}: label error against the dense truth (tiles of labels/manifest.csv)")
            print(rv.round(4).to_string())
            result[wd.name] = {"rules": rv.reset_index().to_dict("records")}
            continue
        if not (wd / "model" / "split.csv").is_file():
            continue
        print(f"\n===== {wd.name}")
        s = split_summary(wd, cmap.names)
        print(s.to_string())
        lv = label_vs_truth(wd, cmap)
        print("labels vs truth:", json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in lv.items()}))
        h = pd.read_csv(wd / "model" / "history.csv")
        cols = ["epoch", "loss"] + [c for c in h.columns if c.startswith("val_iou_")] + ["val_mean_iou"]
        print(h[cols].round(3).to_string(index=False))
        tp = wd / "model" / "training_params.yaml"
        if tp.is_file():
            import yaml

            p = yaml.safe_load(tp.read_text())
            print("class weights:", p.get("class_weights"), " best epoch:", p.get("best_epoch"))
        white = white_predictions(wd, cmap)
        print("held-out glass-like areas (open glass vs white enclosed by tissue), share predicted per class:")
        print(white.to_string())
        res = {"split": s.to_dict(), "labels": lv, "white": white.reset_index().to_dict("records")}
        if args.bn:
            res["bn"] = bn_check(wd, cmap)
            print("batch norm:", json.dumps(res["bn"]))
        result[wd.name] = res
    return result



def checkpoint_scores(wd: Path, cmap, which: str = "last", recipe: Path = ROOT / "data" / "params" / "real") -> dict:
    """Held-out headline IoU of the run's ``best.keras`` (its own predictions) and of ``model/<which>.keras``.

    The other checkpoint is predicted and exported like 07 (``<recipe>/07_infer_slide.yaml``) into
    ``<wd>/checkpoint_<which>/`` (a model folder whose ``best.keras`` is that checkpoint, and predictions).
    """
    import shutil

    import yaml

    from benchmarks.bench_real import score_image, scores
    from helpers.export import export_prediction
    from helpers.model import headline_index
    from helpers.predict import predict_slide

    p07 = yaml.safe_load((recipe / "07_infer_slide.yaml").read_text()) or {}
    tmp = wd / f"checkpoint_{which}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "model").mkdir(parents=True)
    for d in ("truth", "slides", "stain"):  # the normalizer path is relative to the model folder's parent
        if (wd / d).exists():
            (tmp / d).symlink_to(wd / d)
    for f in (wd / "model").iterdir():
        if f.is_file() and f.suffix != ".keras" and not f.name.startswith("model.onnx"):
            shutil.copy(f, tmp / "model" / f.name)
    shutil.copy(wd / "model" / f"{which}.keras", tmp / "model" / "best.keras")
    stems = sorted(s.stem for s in (wd / "slides").glob("*.tiff"))
    for stem in stems:
        d = tmp / "predictions" / stem
        predict_slide(wd / "slides" / f"{stem}.tiff", tmp / "model", d, normalizer="auto", class_map=cmap,
                      overlap=p07.get("overlap", 16), blend=p07.get("blend", "mean"), batch_size=8,
                      overwrite=True, progress=False)
        export_prediction(d, class_map=cmap, smoothing=p07.get("smoothing", "gaussian"),
                          smoothing_size=p07.get("smoothing_size", 4.0), fill_holes_um2=p07.get("fill_holes_um2"),
                          min_area_um2=p07.get("min_area_um2"), overwrite=True)
    h = headline_index(cmap)

    def headline(run: Path) -> float:
        return float(scores(sum(score_image(run, stem, cmap.n_classes) for stem in stems))["iou"][h])
    return {"best": headline(wd), which: headline(tmp)}


def white_predictions(wd: Path, cmap, min_area_um2: float = 100.0) -> pd.DataFrame:
    """What the model says on glass-like (bright, unsaturated) areas of the held-out half.

    Glass-like regions (:func:`helpers.labels.glass_mask`) of at least ``min_area_um2`` are
    split into *open* glass (touching the image border) and *enclosed* white (holes inside
    tissue: lumen, fat, vacuoles), with the truth under them. Rows: kind x (raw argmax of
    ``probabilities.tiff`` | post-processed ``labels.tiff``) -> share of pixels per class.
    """
    import cv2

    from benchmarks.bench_real import train_part
    from helpers.labels import glass_mask
    from helpers.rasters import raster_info, read_raster

    rows = []
    for truth_path in sorted((wd / "truth").glob("*.tiff")):
        stem = truth_path.stem
        truth = np.asarray(read_raster(truth_path, downsample=1.0))
        h, w = truth.shape
        image = np.asarray(read_raster(wd / "slides" / f"{stem}.tiff", downsample=1.0))[:h, :w]
        mpp = raster_info(truth_path)["mpp"]
        pd_dir = wd / "predictions" / stem
        post = np.asarray(read_raster(pd_dir / "labels.tiff", downsample=1.0, region=(0, 0, w, h)))
        prob = np.asarray(read_raster(pd_dir / "probabilities.tiff", downsample=1.0, region=(0, 0, w, h)))
        raw = np.argmax(prob, -1).astype(np.uint8) + 1
        glass = glass_mask(image).astype(np.uint8)
        n, comp, stats, _ = cv2.connectedComponentsWithStats(glass, connectivity=8)
        held = ~train_part(truth.shape)
        for i in range(1, n):
            x, y, bw, bh, area = stats[i]
            if area * mpp * mpp < min_area_um2:
                continue
            kind = "open" if x == 0 or y == 0 or x + bw == w or y + bh == h else "enclosed"
            m = (comp == i) & held
            if not m.any():
                continue
            for src, lab in (("raw", raw), ("post", post)):
                cnt = np.bincount(lab[m], minlength=cmap.n_classes + 1)
                rows.append({"image": stem, "kind": kind, "pred": src, "px": int(m.sum()),
                             **{f"truth_{c}": int((truth[m] == cmap.label_of(c)).sum()) for c in cmap.names},
                             **{c: int(cnt[cmap.label_of(c)]) for c in cmap.names}})
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    g = df.groupby(["kind", "pred"])[["px", *[f"truth_{c}" for c in cmap.names], *cmap.names]].sum()
    for c in cmap.names:
        g[c] = (g[c] / g["px"]).round(3)
        g[f"truth_{c}"] = (g[f"truth_{c}"] / g["px"]).round(3)
    return g



#: Post-processing variants of :func:`postprocess_variants`: name -> (07's postprocess keywords, enclosed-Background fill).
#: ``enclosed`` is ``(max area um^2, smallest share of the hole's rim that is headline)`` or None.
POST_VARIANTS: dict[str, tuple[dict | None, tuple[float, float] | None]] = {
    "raw argmax": (None, None),
    "07 recipe (fill_holes_um2 200)": ({"fill_holes_um2": 200.0}, None),
    "fill_holes_um2 1000": ({"fill_holes_um2": 1000.0}, None),
    "fill_holes_um2 3000": ({"fill_holes_um2": 3000.0}, None),
    "fill_holes_um2 10000": ({"fill_holes_um2": 10000.0}, None),
    "recipe + enclosed Background <= 1000 um2 (rim >= 50 % headline)": ({"fill_holes_um2": 200.0}, (1000.0, 0.5)),
    "recipe + enclosed Background <= 5000 um2 (rim >= 50 % headline)": ({"fill_holes_um2": 200.0}, (5000.0, 0.5)),
    "recipe + enclosed Background <= 5000 um2 (rim >= 80 % headline)": ({"fill_holes_um2": 200.0}, (5000.0, 0.8)),
    "recipe + enclosed Background, any size (rim >= 50 % headline)": ({"fill_holes_um2": 200.0}, (1e12, 0.5)),
}


def fill_enclosed_background(labels: np.ndarray, max_px: int, target: int, background: int, share: float = 0.5) -> np.ndarray:
    """Background regions not touching the image border, at most ``max_px``, whose rim is >= ``share`` ``target``: made ``target``.

    The benchmark's prototype of "lumen inside tumour glands is tumour" (truth convention of
    the prostate and GlaS masks); 07's ``fill_holes_um2`` fills holes of any class inside any class.
    """
    from scipy import ndimage

    comp, k = ndimage.label(labels == background)
    out = labels.copy()
    if not k:
        return out
    sizes = np.bincount(comp.ravel(), minlength=k + 1)
    border = np.zeros(k + 1, bool)
    for edge in (comp[0], comp[-1], comp[:, 0], comp[:, -1]):
        border[edge] = True
    for i, sl in enumerate(ndimage.find_objects(comp), 1):
        if border[i] or sizes[i] > max_px:
            continue
        box = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in sl)
        m = comp[box] == i
        rim = ndimage.binary_dilation(m) & ~m
        if (labels[box][rim] == target).mean() >= share:
            out[box][m] = target
    return out


def postprocess_variants(wd: Path, cmap, variants: dict | None = None, others: list[Path] | None = None) -> pd.DataFrame:
    """Held-out (right half) headline IoU, precision, recall and mean IoU per post-processing variant.

    The stored ``predictions/<slide>/probabilities.tiff`` are post-processed as 07 does
    (:func:`helpers.postprocess.postprocess` with the run's ``params/07_infer_slide.yaml`` smoothing and
    ``min_area_um2``, the variant's keywords on top), resized to the truth grid and scored as
    :mod:`benchmarks.bench_real` scores. ``others``: work folders of the same source whose
    probabilities are averaged with ``wd``'s first (an ensemble of models).
    """
    import cv2
    import yaml

    from benchmarks.bench_real import confusion, scores, train_part
    from helpers import postprocess as pp
    from helpers.predict import read_prediction_info, read_probabilities
    from helpers.rasters import read_raster

    variants = POST_VARIANTS if variants is None else variants
    p07 = yaml.safe_load((wd / "params" / "07_infer_slide.yaml").read_text()) or {}
    base = {"smoothing": p07.get("smoothing", "gaussian"), "smoothing_size": float(p07.get("smoothing_size", 2.0)),
            "min_area_um2": p07.get("min_area_um2"), "opening_px": int(p07.get("opening_px", 0) or 0),
            "closing_px": int(p07.get("closing_px", 0) or 0), "fill_holes_um2": p07.get("fill_holes_um2")}
    n, head, bg = cmap.n_classes, cmap.headline.label, cmap.background.label
    acc = {k: np.zeros((n, n), np.int64) for k in variants}
    for pdir in sorted(p for p in (wd / "predictions").iterdir() if (p / "probabilities.tiff").is_file()):
        mpp = float(read_prediction_info(pdir)["mpp"])
        probs = read_probabilities(pdir)
        for other in others or []:
            probs += read_probabilities(other / "predictions" / pdir.name)
        probs /= 1 + len(others or [])
        truth = np.asarray(read_raster(wd / "truth" / f"{pdir.name}.tiff", downsample=1.0))
        t = np.where(train_part(truth.shape), 0, truth)
        for name, (kw, enclosed) in variants.items():
            lab = pp.argmax_labels(probs) if kw is None else \
                pp.postprocess(probs, mpp, background_label=bg, **{**base, **kw}).labels
            if enclosed is not None:
                lab = fill_enclosed_background(lab, int(enclosed[0] / mpp ** 2), head, bg, enclosed[1])
            acc[name] += confusion(t, cv2.resize(lab, truth.shape[::-1], interpolation=cv2.INTER_NEAREST), n)
    rows = []
    for name, cm in acc.items():
        s = scores(cm)
        rows.append({"variant": name, "headline_iou": s["iou"][head - 1], "precision": s["precision"][head - 1],
                     "recall": s["recall"][head - 1], "mean_iou": float(np.nanmean(s["iou"][s["truth_px"] > 0]))})
    return pd.DataFrame(rows).set_index("variant")


if __name__ == "__main__":
    main()
