"""08's variants study on the real-data benchmark's sources (issue 17): one model per source, held-out half scored.

Usage::

    python -m benchmarks.variants_real --runs runs/bench_real [--out benchmarks/results/variants_real.csv]

``--runs`` is a finished ``make bench-real`` folder (one work folder per source, each with
``model/``, ``slides/`` and ``truth/``). For every source and image,
:func:`helpers.variants.variant_study` predicts the image at every overlap x blend and
applies every smoothing kernel, scoring **only the held-out right half** (the left half
trained: its truth is set to "unlabelled", which the metrics ignore). A source's figure
per setting is the mean over its images (seconds: the sum). The sources then play the
part of 08's repeated models: :func:`helpers.variants.summarize_repeats` gives mean +- sd
over the sources and calls a setting worse only beyond the spread.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "variants_real.csv"


def held_out_truth(truth_path: Path, slide_path: Path, model_dir: Path, cmap):
    """The image's dense truth at model resolution with the training (left) half set to unlabelled (0)."""
    from helpers.evaluate import load_labels
    from helpers.model import params_and_classes
    from helpers.slides import open_slide

    params, _ = params_and_classes(model_dir)
    with open_slide(slide_path) as s:
        ds = s.downsample_for(float(params["mpp"]))
        size = s.dimensions
    truth = load_labels(truth_path, cmap, ds, size).copy()
    truth[:, : truth.shape[1] // 2] = 0
    return truth


def run(runs: Path, out: Path, runtime: str = "auto", sources: list[str] | None = None):
    """Run the study on every source folder of ``runs``; return (per-source table, summary)."""
    import pandas as pd

    from helpers.config import load_class_map
    from helpers.variants import summarize_repeats, variant_study

    cmap = load_class_map()
    rows = []
    folders = sorted(p for p in runs.iterdir() if (p / "model").is_dir() and (p / "truth").is_dir())
    if sources:
        folders = [p for p in folders if p.name in sources]
    if not folders:
        raise SystemExit(f"{runs}: no source folders with model/ and truth/; run make bench-real first")
    for src in folders:
        for slide in sorted((src / "slides").glob("*.tiff")):
            truth = held_out_truth(src / "truth" / slide.name, slide, src / "model", cmap)
            t = variant_study(slide, src / "model", truth, src / "evaluation_variants" / slide.stem, cmap,
                              runtime=runtime, overwrite=True)
            t["source"], t["image"] = src.name, slide.stem
            rows.append(t)
            print(f"{src.name} {slide.stem}: {len(t)} settings, best headline IoU {t['tumor_iou'].max():.4f}", flush=True)
    table = pd.concat(rows, ignore_index=True)
    keys = ["source", "overlap", "blend", "kernel"]
    per_source = table.groupby(keys).agg(tumor_iou=("tumor_iou", "mean"), mean_iou=("mean_iou", "mean"),
                                         seconds=("seconds", "sum")).reset_index()
    per_source["model"] = per_source["source"]
    summary = summarize_repeats(per_source)
    out.parent.mkdir(parents=True, exist_ok=True)
    per_source.to_csv(out, index=False, float_format="%.6g")
    summary.to_csv(out.with_name(out.stem + "_summary.csv"), index=False, float_format="%.6g")
    return per_source, summary


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", required=True, help="a finished bench-real folder (one work folder per source)")
    ap.add_argument("--sources", nargs="*", default=None)
    ap.add_argument("--runtime", default="auto")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    os.environ.setdefault("SM_FRAMEWORK", "tf.keras")
    logging.basicConfig(level=logging.WARNING)
    from helpers.variants import repeat_recommendation

    per_source, summary = run(Path(args.runs), Path(args.out), args.runtime, args.sources)
    wide = per_source.pivot_table(index=["overlap", "blend", "kernel"], columns="source", values="tumor_iou")
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_rows", 100):
        print(wide.round(4))
        print(summary[["overlap", "blend", "kernel", "n_models", "mean", "sd", "seconds", "diff_vs_best", "diff_sd",
                       "verdict", "within_tolerance", "speedup_vs_best"]].round(4).to_string(index=False))
    print(repeat_recommendation(summary))


if __name__ == "__main__":
    main()
    sys.exit(0)
