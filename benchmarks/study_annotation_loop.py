"""The annotation loop measured (issue 13; a study, not CI): uncertainty-chosen vs random fields.

On the demo slide, round 0 trains on the sparse demo annotations. Each next round a
simulated annotator labels chosen fields from the dense truth (``truth/demo.tiff``) the
way the sparse annotations were made (class outlines kept a few micrometres inside their
borders, simplified), until the round's area budget is reached; 01 (tiles) and 05
(training, fine-tuned from the previous round's model with ``init_model``) run again,
then 07 (prediction) and the headline IoU against the dense truth.
Fields are chosen by 09's uncertainty ranking or at random from the same candidates
(same field size, same spacing, same added area). Rounds 0 -> 1 -> 2, several seeds.

Usage::

    python -m benchmarks.study_annotation_loop --out runs/study [--seeds 0 1] [--rounds 2]

Writes ``<out>/study.csv`` (one row per seed, strategy, round), ``<out>/study.md``
(the table) and ``<out>/study.png`` (IoU per round; added area).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger("study")


def annotate_field(truth: Path, field: tuple[int, int, int, int], cmap, mpp: float, inset_um: float = 4.0,
                   simplify_um: float = 2.0, min_piece_um: float = 10.0, step: float = 4.0) -> list:
    """Simulated annotator: polygons of each truth class inside a field, kept ``inset_um`` inside their borders.

    Returns:
        ``[(class name, shapely geometry in level-0 px), ...]``.
    """
    import cv2
    from shapely.geometry import Polygon
    from shapely.ops import unary_union

    from helpers.rasters import read_raster

    x, y, w, h = field
    lab = np.asarray(read_raster(truth, downsample=step, region=(x, y, w, h)))
    out = []
    for cls in cmap.classes:
        m = (lab == cls.label).astype(np.uint8)
        if not m.any():
            continue
        contours, hier = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
        polys = []
        for i, c in enumerate(contours):
            if hier[0][i][3] != -1 or len(c) < 3:
                continue
            holes = [contours[j][:, 0, :] for j in range(len(contours)) if hier[0][j][3] == i and len(contours[j]) >= 3]
            shell = (c[:, 0, :] + 0.5) * step + (x, y)
            polys.append(Polygon(shell, [(hh + 0.5) * step + (x, y) for hh in holes]).buffer(0))
        if not polys:
            continue
        geom = unary_union(polys).buffer(-inset_um / mpp).simplify(simplify_um / mpp)
        pieces = [g for g in getattr(geom, "geoms", [geom]) if g.area * mpp**2 >= min_piece_um**2]
        if pieces:
            out.append((cls.name, unary_union(pieces)))
    return out


def headline_iou(pred_dir: Path, truth: Path, cmap) -> dict:
    """Headline (tumour) and mean IoU of the argmax prediction against the dense truth, whole slide."""
    from helpers.metrics import labelled_iou
    from helpers.predict import read_prediction_info, read_probabilities
    from helpers.rasters import read_raster

    info = read_prediction_info(pred_dir)
    pred = read_probabilities(pred_dir).argmax(axis=-1).astype(np.uint8) + 1
    ref = np.asarray(read_raster(truth, downsample=float(info["downsample"])))
    hh, ww = min(ref.shape[0], pred.shape[0]), min(ref.shape[1], pred.shape[1])
    s = labelled_iou(ref[:hh, :ww], pred[:hh, :ww], cmap)
    return {"headline_iou": s["headline_iou"], "mean_iou": s["mean_iou"]}


def run_round(wd: Path, cmap, seed: int, init_model: Path | None, epochs: int, steps: int, lr: float,
              overlap: int = 1, max_val_tiles: int = 8) -> dict:
    """01 (tiles) -> 05 (train or fine-tune) -> 07 (predict) in ``wd``; timings and IoU."""
    from helpers.predict import predict_slide
    from helpers.tiles import export_tiles
    from helpers.train import TrainConfig, train_model

    t0 = time.perf_counter()
    tiles = export_tiles(wd, cmap, stride=128, overwrite=True)
    t1 = time.perf_counter()
    cfg = TrainConfig(epochs=epochs, warmup_epochs=0, learning_rate=lr, lr_schedule="cosine", batch_size=4,
                      steps_per_epoch=steps, encoder_weights=None, seed=seed, max_val_tiles=max_val_tiles,
                      init_model=str(init_model) if init_model else None)
    params = train_model(wd, cfg, overwrite=True, resume=False, frames=False, verbose=0)
    t2 = time.perf_counter()
    pred_dir = wd / "predictions" / "demo"
    predict_slide(wd / "slides" / "demo.tiff", wd / "model", pred_dir, overlap=overlap, batch_size=8, overwrite=True,
                  progress=False)
    t3 = time.perf_counter()
    iou = headline_iou(pred_dir, wd / "truth" / "demo.tiff", cmap)
    return {**iou, "tiles": len(tiles), "val_iou": params["best_tumor_iou"], "tiles_s": round(t1 - t0, 1),
            "train_s": round(t2 - t1, 1), "predict_s": round(t3 - t2, 1), "round_s": round(t3 - t0, 1)}


def new_workdir(src: Path, dst: Path) -> None:
    """A round's work folder: the slide and truth linked, the annotations copied."""
    dst.mkdir(parents=True, exist_ok=True)
    for sub in ("slides", "truth"):
        if not (dst / sub).exists():
            os.symlink((src / sub).resolve(), dst / sub)
    (dst / "annotations").mkdir(exist_ok=True)
    shutil.copy(src / "annotations" / "demo.geojson", dst / "annotations" / "demo.geojson")


def add_annotations(prev: Path, wd: Path, cmap, strategy: str, seed: int, budget_um2: float, field_um: float,
                    min_spacing_um: float) -> dict:
    """Choose fields with ``prev``'s prediction, annotate them from the truth into ``wd``'s annotations."""
    from helpers.qupath import make_feature
    from helpers.suggest import rank_fields, score_fields, slide_fields

    t0 = time.perf_counter()
    fields = score_fields(slide_fields(prev / "predictions" / "demo", prev, cmap, field_um=field_um))
    order = rank_fields(fields, int(fields["candidate"].sum()), min_spacing_um, strategy=strategy, seed=seed)
    mpp = float(fields["w_um"].iloc[0]) / float(fields["w"].iloc[0])  # level-0 um/px
    path = wd / "annotations" / "demo.geojson"
    fc = json.loads(path.read_text())
    added, n_fields, chosen_unc = 0.0, 0, []
    for _, r in order.iterrows():
        if added >= budget_um2:
            break
        for name, geom in annotate_field(wd / "truth" / "demo.tiff", (r["x"], r["y"], r["w"], r["h"]), cmap, mpp):
            cls = cmap.by_label(cmap.label_of(name))
            fc["features"].append(make_feature(geom, name, cls.color, name=f"round field {r['rank']}"))
            added += geom.area * mpp**2
        n_fields += 1
        chosen_unc.append(r["uncertainty"])
    path.write_text(json.dumps(fc))
    return {"added_um2": added, "fields": n_fields, "mean_field_uncertainty": float(np.mean(chosen_unc)),
            "choose_s": round(time.perf_counter() - t0, 1)}


def annotated_um2(wd: Path, cmap, mpp: float) -> float:
    """Area of the union of the labelling annotations (um^2)."""
    from shapely.ops import unary_union

    from helpers.annotations import read_annotations

    anns = read_annotations(wd / "annotations" / "demo.geojson", cmap)
    return unary_union([a.geometry for a in anns]).area * mpp**2


def plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for strategy, colour in (("uncertainty", "tab:red"), ("random", "tab:blue")):
        part = df[df["strategy"] == strategy]
        g = part.groupby("round")
        for seed, s in part.groupby("seed"):
            axes[0].plot(s["round"], s["headline_iou"], "o", color=colour, alpha=0.35)
        axes[0].plot(g["headline_iou"].mean().index, g["headline_iou"].mean(), "-", color=colour, label=strategy, lw=2)
        axes[1].plot(g["annotated_mm2"].mean().index, g["annotated_mm2"].mean(), "-o", color=colour, label=strategy)
    axes[0].set(xlabel="round", ylabel="headline IoU vs dense truth", title="headline IoU (dots: seeds, line: mean)")
    axes[1].set(xlabel="round", ylabel="annotated area (mm$^2$)", title="annotated area")
    for ax in axes:
        ax.set_xticks(sorted(df["round"].unique()))
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def summarize(df: pd.DataFrame) -> str:
    g = df.groupby(["strategy", "round"]).agg(headline_iou=("headline_iou", "mean"), iou_sd=("headline_iou", "std"),
                                               mean_iou=("mean_iou", "mean"), annotated_mm2=("annotated_mm2", "mean"),
                                               added_mm2=("added_mm2", "mean"), fields=("fields", "mean"),
                                               round_s=("round_s", "mean"), seeds=("seed", "nunique")).reset_index()
    g = g.round(4)
    lines = ["| " + " | ".join(g.columns) + " |", "|" + "---|" * len(g.columns)]
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in g.itertuples(index=False)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--field-um", type=float, default=200.0)
    ap.add_argument("--min-spacing-um", type=float, default=200.0)
    ap.add_argument("--budget-um2", type=float, default=200_000.0, help="annotated area added per round")
    ap.add_argument("--epochs0", type=int, default=8, help="epochs of round 0 (from scratch)")
    ap.add_argument("--epochs", type=int, default=4, help="epochs of the fine-tuning rounds")
    ap.add_argument("--steps", type=int, default=8, help="training steps per epoch (batch 4)")
    ap.add_argument("--base", default=None, help="an existing demo work folder to start from (default <out>/base)")
    ap.add_argument("--strategies", nargs="+", default=["uncertainty", "random"],
                    help="field choices to run (one per process runs them side by side)")
    ap.add_argument("--merge", nargs="*", default=None, help="study.csv files of runs to merge and report (no training)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    from helpers.config import load_class_map
    from helpers.demo import make_demo

    cmap = load_class_map()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        merged = pd.concat([pd.read_csv(p) for p in args.merge], ignore_index=True)
        merged.to_csv(out / "study.csv", index=False)
        report(merged, out)
        return 0
    base = Path(args.base) if args.base else out / "base"
    if not (base / "slides" / "demo.tiff").is_file():
        make_demo(base, progress=False, overwrite=True)
    mpp = 0.5
    main_csv = out / "study.csv"
    csv = main_csv if len(args.strategies) == 2 else out / f"study_{'_'.join(args.strategies)}.csv"
    rows = pd.read_csv(csv).to_dict("records") if csv.is_file() else []
    done = {(r["seed"], r["strategy"], r["round"]) for r in rows}
    if csv != main_csv and main_csv.is_file():  # round 0 trained by an earlier run
        done |= {(r["seed"], r["strategy"], r["round"]) for r in pd.read_csv(main_csv).to_dict("records")}
    print(f"load average at start: {os.getloadavg()}", flush=True)

    def record(row: dict) -> None:
        rows.append(row)
        pd.DataFrame(rows).to_csv(csv, index=False)
        print(json.dumps(row), flush=True)

    for seed in args.seeds:
        wd0 = out / f"s{seed}" / "round0"
        if (seed, "both", 0) not in done:
            new_workdir(base, wd0)
            res = run_round(wd0, cmap, seed, None, args.epochs0, args.steps, 1e-3)
            record({"seed": seed, "strategy": "both", "round": 0, "added_mm2": 0.0, "fields": 0,
                    "annotated_mm2": annotated_um2(wd0, cmap, mpp) / 1e6, "load_1min": os.getloadavg()[0], **res})
        for strategy in args.strategies:
            prev = wd0
            for rnd in range(1, args.rounds + 1):
                wd = out / f"s{seed}" / f"{strategy}{rnd}"
                if (seed, strategy, rnd) in done:
                    prev = wd
                    continue
                new_workdir(prev, wd)
                add = add_annotations(prev, wd, cmap, strategy, seed * 100 + rnd, args.budget_um2, args.field_um,
                                      args.min_spacing_um)
                res = run_round(wd, cmap, seed, prev / "model", args.epochs, args.steps, 5e-4)
                record({"seed": seed, "strategy": strategy, "round": rnd, "added_mm2": add["added_um2"] / 1e6,
                        "fields": add["fields"], "mean_field_uncertainty": add["mean_field_uncertainty"],
                        "annotated_mm2": annotated_um2(wd, cmap, mpp) / 1e6, "load_1min": os.getloadavg()[0],
                        "choose_s": add["choose_s"], **res})
                prev = wd
    report(pd.DataFrame(rows), out)
    return 0


def report(df: pd.DataFrame, out: Path) -> None:
    """Write ``study.md`` (mean per strategy and round) and ``study.png``; round 0 counts for both strategies."""
    both = df[df["strategy"] == "both"]
    df = pd.concat([df[df["strategy"] != "both"]] + [both.assign(strategy=s) for s in ("uncertainty", "random")],
                   ignore_index=True)
    table = summarize(df)
    (out / "study.md").write_text(table + "\n")
    plot(df, out / "study.png")
    print(table)


if __name__ == "__main__":
    sys.exit(main())
