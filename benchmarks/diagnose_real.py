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
* with ``--bn``: validation IoU of ``last.keras`` in inference mode (batch-norm moving
  statistics) vs training mode (the batch's own statistics): a large gap means the moving
  statistics, not the weights, are what fails.
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
           "bg_label_on_tissue": 0, "bg_label": 0, "bright_tissue_labelled": 0, "bright_tissue_labelled_tumor": 0}
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
        acc["bright_tissue_labelled_tumor"] += int((bright & (ref == cmap.headline.label)).sum())
    acc["wrong_before"] = acc["before_wrong"] / max(1, acc["before_labelled"])
    acc["wrong_after"] = acc["after_wrong"] / max(1, acc["after_labelled"])
    return acc


def bn_check(wd: Path, cmap) -> dict:
    """Validation IoU of last.keras with moving statistics (inference) vs batch statistics."""
    import keras

    from helpers.model import preprocess
    from helpers.train import _fit_multiple, _read_image, _read_label, confusion_matrix, iou_from_confusion

    split = pd.read_csv(wd / "model" / "split.csv")
    val = split[split["split"] == "val"]
    model = keras.models.load_model(wd / "model" / "last.keras", compile=False)
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
    args = ap.parse_args(argv)
    cmap = load_class_map()
    base = Path(args.workdir)
    result = {}
    for wd in sorted(p for p in base.iterdir() if p.is_dir() and (not args.sources or p.name in args.sources)):
        if not (wd / "model" / "split.csv").is_file():
            continue
        print(f"\n===== {wd.name}")
        s = split_summary(wd, cmap.names)
        print(s.to_string())
        lv = label_vs_truth(wd, cmap)
        print("labels vs truth:", json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in lv.items()}))
        h = pd.read_csv(wd / "model" / "history.csv")
        cols = [c for c in ("epoch", "loss", "val_iou_Background", "val_iou_Tumor", "val_iou_Stroma", "val_mean_iou")
                if c in h.columns]
        print(h[cols].round(3).to_string(index=False))
        tp = wd / "model" / "training_params.yaml"
        if tp.is_file():
            import yaml

            p = yaml.safe_load(tp.read_text())
            print("class weights:", p.get("class_weights"), " best epoch:", p.get("best_epoch"))
        diag = wd / "bench_diagnosis.json"
        if diag.is_file():
            print("held-out bright in-tissue pixels predicted as:", json.loads(diag.read_text())["bright_in_tissue_predicted_as"])
        res = {"split": s.to_dict(), "labels": lv}
        if args.bn:
            res["bn"] = bn_check(wd, cmap)
            print("batch norm:", json.dumps(res["bn"]))
        result[wd.name] = res
    return result


if __name__ == "__main__":
    main()
