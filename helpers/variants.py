"""The variants study of step 08: quality versus cost of inference settings on one slide.

Re-runs slide inference (07's :func:`helpers.predict.predict_slide`) for each model x
overlap x blending mode, applies smoothing kernels to the stored probabilities and
measures quality (IoU against a dense truth, :mod:`helpers.metrics`), tile seams
(:func:`seam_score`) and seconds. Its figure is :func:`helpers.views.evaluate.plot_variants`.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from helpers.config import ClassMap
from helpers.errors import HistoUNetError, ParameterError
from helpers.evaluate import load_labels, match_shape
from helpers.metrics import class_metrics, confusion_matrix, summary_figures

log = logging.getLogger(__name__)


def seam_score(labels: np.ndarray, step: int, origin: tuple[int, int] = (0, 0)) -> dict[str, float]:
    """How much more often labels change across tile-border lines than elsewhere.

    For every pair of horizontally or vertically adjacent pixels, a *change* is a
    different label. Pairs straddling a tile border (a line at ``origin + k * step``
    in x or y) are compared with all other pairs.

    Args:
        labels: 2-D label image at the model's resolution (as inference tiled it).
        step: Tile stride in label pixels (where tile contributions start and stop).
        origin: ``(x0, y0)`` of the tile grid in label pixels.

    Returns:
        ``{"border_change_rate", "other_change_rate", "seam_score"}``; the score is
        their ratio (1 = borders invisible, >1 = seams; NaN if nothing changes elsewhere).
    """
    if step < 2:
        raise ParameterError(f"seam step must be >= 2 pixels; got {step}")
    lab = np.asarray(labels)
    border_changes = border_pairs = other_changes = other_pairs = 0
    for axis, off in ((1, origin[0]), (0, origin[1])):
        n = lab.shape[axis]
        if n < 2:
            continue
        diff = np.diff(lab, axis=axis) != 0  # pair (i-1, i) stored at i-1
        pos = np.arange(1, n)  # index of the right/lower pixel of each pair
        is_border = ((pos - off) % step) == 0
        per_line = diff.sum(axis=1 - axis)  # changes per pair position
        pairs_per_line = lab.shape[1 - axis]
        border_changes += int(per_line[is_border].sum())
        other_changes += int(per_line[~is_border].sum())
        border_pairs += int(is_border.sum()) * pairs_per_line
        other_pairs += int((~is_border).sum()) * pairs_per_line
    b = border_changes / border_pairs if border_pairs else float("nan")
    o = other_changes / other_pairs if other_pairs else float("nan")
    return {"border_change_rate": b, "other_change_rate": o, "seam_score": b / o if o else float("nan")}


def parse_kernel(spec: str) -> tuple[str, int]:
    """``"none"``, ``"gaussian:<sigma px>"`` or ``"median:<size px>"`` -> ``(method, size)``."""
    spec = str(spec).strip().lower()
    if spec in ("none", "", "0"):
        return "none", 0
    method, _, size = spec.partition(":")
    try:
        n = int(float(size))
    except ValueError:
        n = -1
    if method not in ("gaussian", "median") or n < 1:
        raise ParameterError(f"smoothing kernel {spec!r}: use 'none', 'gaussian:<sigma px>' or 'median:<size px>'")
    return method, n


def smooth_argmax(probabilities: np.ndarray, kernel: str) -> np.ndarray:
    """Labels (1..C) from ``(H, W, C)`` probabilities after a smoothing kernel, nothing else.

    Uses the smoothing 07 applies (:func:`helpers.postprocess.smoothed_labels`)
    without the morphology steps, so the study isolates the kernel.

    Args:
        probabilities: Class probabilities at model resolution.
        kernel: ``"none"``, ``"gaussian:<sigma px>"`` or ``"median:<size px>"``.
    """
    from helpers.postprocess import smoothed_labels

    method, size = parse_kernel(kernel)
    return smoothed_labels(probabilities, None if method == "none" else method, size)


def cheapest_within(table: pd.DataFrame, metric: str = "tumor_iou", tolerance: float = 0.005,
                    cost: str = "seconds") -> pd.Series:
    """The cheapest row whose ``metric`` is within ``tolerance`` of the best (0.005 = 0.5 IoU points)."""
    if table.empty:
        raise ParameterError("the variants table is empty; run the study with at least one setting")
    best = table[metric].max()
    ok = table[table[metric] >= best - tolerance]
    return ok.sort_values([cost, metric], ascending=[True, False]).iloc[0]


def _model_names(model_dirs: Sequence[str | Path]) -> list[str]:
    """Short unique names for model folders (folder name, or parent/name when ambiguous)."""
    names = [Path(d).name for d in model_dirs]
    if len(set(names)) < len(names):
        names = [f"{Path(d).parent.name}/{Path(d).name}" for d in model_dirs]
    if len(set(names)) < len(names):
        names = [f"{n}#{i}" for i, n in enumerate(names)]
    return names


def variant_study(slide_path: str | Path, model_dirs: str | Path | Sequence[str | Path], truth: Any,
                  out_dir: str | Path, class_map: ClassMap, *, overlaps: Sequence[int] = (1, 4, 16),
                  blends: Sequence[str] = ("mean", "gaussian"),
                  kernels: Sequence[str] = ("none", "gaussian:2", "gaussian:4", "median:5"),
                  mpp: float | None = None, tile_size: int | None = None, batch_size: int = 8,
                  normalizer: str | Path | None = "auto", keep_predictions: bool = False,
                  overwrite: bool = False, progress: bool = False, runtime: str = "keras") -> pd.DataFrame:
    """Quality versus cost of inference settings on one slide with a dense truth.

    For every model x overlap x blend the slide is predicted once
    (:func:`helpers.predict.predict_slide`); every smoothing kernel is then applied to
    the stored probabilities (no re-prediction). Each row holds headline-class (``tumor_iou``) and mean IoU
    against ``truth``, the seam score (:func:`seam_score` on the tile stride), the
    truth's own score on the same grid (``seam_score_truth``: what the shapes alone
    give, since the truth has no tiles) and the seconds (prediction + smoothing).

    Args:
        slide_path: The slide (the demo slide: it has a dense truth).
        model_dirs: One trained model folder, or several to compare.
        truth: Dense reference (label TIFF, array at model resolution, or GeoJSON).
        out_dir: ``workdir/evaluation``; writes ``variants.csv`` there and predicts into
            ``out_dir/variants/<model>_o<overlap>_<blend>/`` (deleted afterwards unless
            ``keep_predictions``).
        class_map: The classes.
        overlaps: Overlap factors (1, 4, 16).
        blends: ``"mean"`` and/or ``"gaussian"``.
        kernels: ``"none"``, ``"gaussian:<sigma px>"``, ``"median:<size px>"`` (model-resolution pixels).
        mpp, tile_size, batch_size, normalizer: Passed to ``predict_slide``.
        keep_predictions: Keep the per-variant probability rasters.
        overwrite: Replace an existing ``variants.csv``.
        progress: Show the prediction progress bars.
        runtime: Inference runtime, as 07's (:mod:`helpers.runtime`).

    Returns:
        The table (also ``out_dir/variants.csv``), one row per model x overlap x blend x kernel.
    """
    import shutil

    from helpers.predict import predict_slide, read_probabilities
    from helpers.io import atomic_path, check_writable

    out_dir = Path(out_dir)
    csv = check_writable(out_dir / "variants.csv", overwrite)
    dirs = [model_dirs] if isinstance(model_dirs, (str, Path)) else list(model_dirs)
    if not dirs:
        raise ParameterError("model_dirs is empty; pass workdir/model or a list of trained model folders")
    for k in kernels:
        parse_kernel(k)
    from helpers.model import load_trained

    for d in dirs:  # warm-up: TensorFlow's import and first load are not charged to the first setting
        load_trained(d)
    rows = []
    truth_cache: dict[float, np.ndarray] = {}
    combos = [(m, d, o, b) for m, d in zip(_model_names(dirs), dirs) for o in overlaps for b in blends]
    from tqdm.auto import tqdm

    for name, mdir, overlap, blend in tqdm(combos, desc="variants", disable=not progress):
        scratch = out_dir / "variants" / f"{name.replace('/', '_')}_o{overlap}_{blend}"
        res = predict_slide(slide_path, mdir, scratch, mpp=mpp, normalizer=normalizer, overlap=int(overlap),
                            blend=blend, tile_size=tile_size, batch_size=batch_size, class_map=class_map,
                            overwrite=True, progress=progress, runtime=runtime)
        probs = read_probabilities(scratch)
        ds = float(res.downsample)
        if ds not in truth_cache:
            slide_size = (int(round(res.width * ds)), int(round(res.height * ds)))
            truth_cache[ds] = load_labels(truth, class_map, ds, slide_size)
        for kernel in kernels:
            t0 = time.perf_counter()
            labels = smooth_argmax(probs, kernel)
            smooth_s = time.perf_counter() - t0
            ref, pred = match_shape(truth_cache[ds], labels)
            cm = confusion_matrix(ref, pred, class_map.n_classes)
            s = summary_figures(class_metrics(cm, class_map), class_map, cm)
            seam = seam_score(labels, step=int(res.stride))
            seam_truth = seam_score(ref, step=int(res.stride))["seam_score"]  # same grid, no tiling: the baseline
            rows.append({
                "model": name, "overlap": int(overlap), "blend": blend, "kernel": kernel,
                "tumor_iou": s["tumor_iou"], "mean_iou": s["mean_iou"], "pixel_accuracy": s["pixel_accuracy"],
                "seam_score": seam["seam_score"], "seam_score_truth": seam_truth, "border_change_rate": seam["border_change_rate"],
                "other_change_rate": seam["other_change_rate"],
                "seconds": round(float(res.seconds) + smooth_s, 2), "predict_seconds": float(res.seconds),
                "smooth_seconds": round(smooth_s, 3), "tiles": int(res.tiles_tissue),
                "tiles_per_second": float(res.tiles_per_second), "tile_size": int(res.tile_size),
                "stride": int(res.stride), "downsample": ds,
            })
            log.info("%s o%d %s %s: headline IoU %.4f, mean IoU %.4f, seam %.2f, %.1f s", name, overlap, blend, kernel,
                     s["tumor_iou"], s["mean_iou"], seam["seam_score"], rows[-1]["seconds"])
        del probs
        if not keep_predictions:
            shutil.rmtree(scratch, ignore_errors=True)
    if not keep_predictions:
        with contextlib.suppress(OSError):
            (out_dir / "variants").rmdir()
    table = pd.DataFrame(rows)
    with atomic_path(csv, overwrite) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    return table


def variant_label(row: Mapping[str, Any], with_model: bool = False) -> str:
    """Short name of a setting, e.g. ``o16 gaussian, median:5``."""
    txt = f"o{int(row['overlap'])} {row['blend']}, {row['kernel']}"
    return f"{row['model']}: {txt}" if with_model else txt


def recommend_variant(table: pd.DataFrame, metric: str = "tumor_iou", tolerance: float = 0.005) -> str:
    """One sentence: the cheapest setting within ``tolerance`` (0.005 = 0.5 IoU points) of the best."""
    best = table.loc[table[metric].idxmax()]
    pick = cheapest_within(table, metric, tolerance)
    multi = table["model"].nunique() > 1 if "model" in table else False
    return (f"best {metric.replace('_', ' ')} {best[metric]:.4f} ({variant_label(best, multi)}, {best['seconds']:.1f} s); "
            f"cheapest within {tolerance * 100:.1f} IoU points: {variant_label(pick, multi)} "
            f"with {pick[metric]:.4f} in {pick['seconds']:.1f} s "
            f"({best['seconds'] / max(pick['seconds'], 1e-9):.1f}x faster than the best)")


def summarize_repeats(table: pd.DataFrame, metric: str = "tumor_iou", tolerance: float = 0.005) -> pd.DataFrame:
    """Each setting's ``metric`` as mean +- sd over the models, and whether it is really worse than the best.

    The best setting is the one with the highest mean. Another setting is called
    ``worse`` only when its paired difference to the best (same model, same slide)
    averages more than its own spread (sd over the models); otherwise ``within noise``.
    ``within_tolerance`` marks means within ``tolerance`` (0.005 = 0.5 IoU points) of
    the best; ``speedup_vs_best`` is the best's mean seconds over the setting's.

    Args:
        table: :func:`variant_study`'s table with at least one model.
        metric: Quality column.
        tolerance: IoU distance still "as good as the best".
    """
    if table.empty:
        raise ParameterError("the variants table is empty; run the study with at least one setting")
    keys = ["overlap", "blend", "kernel"]
    wide = table.pivot_table(index=keys, columns="model", values=metric, aggfunc="mean")
    secs = table.groupby(keys)["seconds"].mean()
    wide = wide.reindex(secs.index)  # a setting with no value at all (NaN) keeps its row
    out = pd.DataFrame({"n_models": wide.notna().sum(1), "mean": wide.mean(1), "sd": wide.std(1, ddof=1),
                        "seconds": secs}).reset_index()
    if out["mean"].isna().all():
        raise ParameterError(f"no setting has a {metric} value (is the headline class absent from the truth?); "
                             "score on a slide where it occurs")
    best_i = int(np.nanargmax(out["mean"].values))  # a setting without a value (NaN) is never the best
    best_key = tuple(out.loc[best_i, keys])
    diffs = wide.loc[[best_key]].values - wide.values  # best minus each setting, per model
    with warnings.catch_warnings():  # a setting without values gives NaN, quietly
        warnings.simplefilter("ignore", RuntimeWarning)
        out["diff_vs_best"] = np.nanmean(diffs, 1)
        out["diff_sd"] = np.nanstd(diffs, 1, ddof=1) if wide.shape[1] > 1 else np.nan
    worse = out["diff_vs_best"] > out["diff_sd"].fillna(np.inf)
    out["verdict"] = np.where(worse, "worse", "within noise")
    out.loc[best_i, "verdict"] = "best"
    out["within_tolerance"] = out["mean"] >= out.loc[best_i, "mean"] - tolerance
    out["speedup_vs_best"] = out.loc[best_i, "seconds"] / out["seconds"].clip(lower=1e-9)
    return out.sort_values("mean", ascending=False).reset_index(drop=True)


def write_summary(summary: pd.DataFrame, out_dir: str | Path, overwrite: bool = True) -> Path:
    """Write :func:`summarize_repeats`' table to ``out_dir/variants_summary.csv`` (atomically)."""
    from helpers.io import atomic_path

    path = Path(out_dir) / "variants_summary.csv"
    with atomic_path(path, overwrite) as tmp:
        summary.to_csv(tmp, index=False, float_format="%.6g")
    return path


def repeat_pick(summary: pd.DataFrame) -> pd.Series:
    """The cheapest setting of :func:`summarize_repeats` whose mean is within the tolerance of the best."""
    return summary[summary["within_tolerance"]].sort_values(["seconds", "mean"], ascending=[True, False]).iloc[0]


def repeat_recommendation(summary: pd.DataFrame, tolerance: float = 0.005) -> str:
    """One sentence from :func:`summarize_repeats`: the best, what is really worse, the cheapest as good."""
    best = summary[summary["verdict"] == "best"].iloc[0]
    pick = repeat_pick(summary)
    n_worse = int((summary["verdict"] == "worse").sum())
    name = lambda r: f"o{int(r['overlap'])} {r['blend']}, {r['kernel']}"  # noqa: E731
    return (f"over {int(best['n_models'])} models: best {name(best)} {best['mean']:.4f} +- {best['sd']:.4f}; "
            f"{n_worse} of {len(summary) - 1} other settings are worse beyond the spread, the rest are within noise; "
            f"cheapest within {tolerance * 100:.1f} IoU points: {name(pick)} {pick['mean']:.4f} +- {pick['sd']:.4f} "
            f"({pick['speedup_vs_best']:.2f}x faster than the best)")


def find_slide(workdir: str | Path, name: str) -> Path:
    """``slides/<name>.*`` of the work folder, or the slide 07 predicted (``prediction.json``)."""
    from helpers.steps import step_dir
    from helpers.slides import find_slides

    d = step_dir(workdir, "slides")
    for p in find_slides(d) if d.is_dir() else []:
        if p.stem == name:
            return p
    info = step_dir(workdir, "predictions") / name / "prediction.json"
    if info.is_file():
        from helpers.io import read_json

        p = Path(read_json(info)["slide_path"])
        if p.is_file():
            return p
    raise HistoUNetError(f"{d}: slide {name!r} not found; put it in slides/ or run 07_infer_slide on it")


def workdir_variant_study(workdir: str | Path, slide: str, class_map: ClassMap,
                          model_dirs: Sequence[str | Path] | None = None, overwrite: bool = False,
                          **kwargs: Any) -> pd.DataFrame:
    """:func:`variant_study` on a slide of the work folder against ``truth/<slide>.tiff``.

    The slide's mpp is taken from 07's ``prediction.json`` when present (so a slide
    predicted with an mpp override is studied at the same resolution).

    Args:
        workdir: The work folder.
        slide: Slide name (it needs a dense truth: the demo slide).
        class_map: The classes.
        model_dirs: Trained model folders; None = ``workdir/model``.
        overwrite: Replace ``evaluation/variants.csv``.
        **kwargs: Passed to :func:`variant_study` (overlaps, blends, kernels, batch_size, ...).
    """
    from helpers.steps import step_dir

    truth = step_dir(workdir, "truth") / f"{slide}.tiff"
    if not truth.is_file():
        raise HistoUNetError(f"{truth}: the variants study needs a dense truth (the demo slide has one); "
                             "set variant_slide to the demo slide or run_variants=False")
    info = step_dir(workdir, "predictions") / slide / "prediction.json"
    if "mpp" not in kwargs and info.is_file():
        from helpers.io import read_json

        kwargs["mpp"] = read_json(info).get("slide_mpp")
    dirs = list(model_dirs) if model_dirs else [step_dir(workdir, "model")]
    return variant_study(find_slide(workdir, slide), dirs, truth, step_dir(workdir, "evaluation", create=True),
                         class_map, overwrite=overwrite, **kwargs)
