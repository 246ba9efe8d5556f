"""Compare predicted labels with a reference: IoU, Dice, confusion, error overlays, variants.

A *reference* is a dense label image (e.g. the demo's ``truth/<slide>.tiff``) or QuPath
GeoJSON annotations (sparse or dense). A *prediction* is a label image (``labels.tiff``
written by 07) or the GeoJSON exported for QuPath. Both are brought to one stated
resolution (``downsample``: level-0 slide pixels per evaluation pixel) and compared only
where the reference labels a pixel: label 0 (unlabelled) is left out, so sparse
annotations measure only what was annotated.

Per class ``c`` (counting over reference-labelled pixels)::

    IoU  = TP / (TP + FP + FN)        Dice = 2 TP / (2 TP + FP + FN)

A predicted 0 (nothing predicted there) counts as a miss for the reference class. Tumour
IoU (class ``Tumor``) is the headline figure.

The variants study (:func:`variant_study`) re-runs slide inference for each overlap and
blending mode and applies smoothing kernels to the stored probabilities, measuring
quality (IoU), tile seams (:func:`seam_score`) and seconds.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from helpers.config import ClassMap
from helpers.errors import HistoUNetError, ParameterError

log = logging.getLogger(__name__)

#: Class whose IoU is the headline figure.
HEADLINE_CLASS = "Tumor"


# ----------------------------------------------------------------------------- metrics
def confusion_matrix(reference: np.ndarray, prediction: np.ndarray, n_classes: int) -> np.ndarray:
    """Pixel counts ``[reference label, predicted label]`` over labels ``0..n_classes``.

    Row 0 (reference unlabelled) is kept for completeness but ignored by the metrics.
    Labels above ``n_classes`` in either image raise an error (wrong class map).

    Args:
        reference: 2-D integer label image (0 = unlabelled).
        prediction: 2-D integer label image of the same shape.
        n_classes: Number of classes (labels ``1..n_classes``).

    Returns:
        ``(n_classes + 1, n_classes + 1)`` int64 array.
    """
    reference = np.asarray(reference)
    prediction = np.asarray(prediction)
    if reference.shape != prediction.shape:
        raise ParameterError(
            f"reference {reference.shape} and prediction {prediction.shape} differ in shape; "
            "read both at the same downsample"
        )
    n = n_classes + 1
    for name, img in (("reference", reference), ("prediction", prediction)):
        if img.size and int(img.max()) >= n:
            raise ParameterError(
                f"{name} holds label {int(img.max())} but the class map has {n_classes} classes; "
                "pass the class map the labels were made with"
            )
    idx = reference.astype(np.int64).ravel() * n + prediction.astype(np.int64).ravel()
    return np.bincount(idx, minlength=n * n).reshape(n, n)


def class_metrics(confusion: np.ndarray, class_map: ClassMap) -> pd.DataFrame:
    """Per-class IoU, Dice, precision and recall from a confusion matrix.

    Only reference-labelled pixels count (row 0 is dropped). Classes absent from both
    the reference and the prediction get NaN (undefined), not 0 or 1.

    Returns:
        One row per class: ``label, class, iou, dice, precision, recall, ref_px, pred_px, tp``.
    """
    cm = np.asarray(confusion, dtype=np.int64)[1:, :]  # reference labelled only
    rows = []
    for c in class_map.classes:
        tp = int(cm[c.label - 1, c.label])
        ref_px = int(cm[c.label - 1, :].sum())
        pred_px = int(cm[:, c.label].sum())
        fn, fp = ref_px - tp, pred_px - tp
        union = tp + fp + fn
        rows.append({
            "label": c.label,
            "class": c.name,
            "iou": tp / union if union else np.nan,
            "dice": 2 * tp / (2 * tp + fp + fn) if union else np.nan,
            "precision": tp / pred_px if pred_px else np.nan,
            "recall": tp / ref_px if ref_px else np.nan,
            "ref_px": ref_px,
            "pred_px": pred_px,
            "tp": tp,
        })
    return pd.DataFrame(rows)


def summary_figures(metrics: pd.DataFrame, confusion: np.ndarray | None = None) -> dict[str, float]:
    """Headline numbers: tumour IoU/Dice, mean IoU/Dice over classes present, pixel accuracy."""
    present = metrics[metrics["ref_px"] > 0]
    tumor = metrics[metrics["class"] == HEADLINE_CLASS]
    out = {
        "tumor_iou": float(tumor["iou"].iloc[0]) if len(tumor) else float("nan"),
        "tumor_dice": float(tumor["dice"].iloc[0]) if len(tumor) else float("nan"),
        "mean_iou": float(present["iou"].mean()) if len(present) else float("nan"),
        "mean_dice": float(present["dice"].mean()) if len(present) else float("nan"),
    }
    if confusion is not None:
        cm = np.asarray(confusion)[1:, :]
        total = cm.sum()
        out["pixel_accuracy"] = float(np.trace(cm[:, 1:]) / total) if total else float("nan")
        out["labelled_px"] = int(total)
    return out


# ----------------------------------------------------------------------------- reading
def _is_geojson(source: Any) -> bool:
    if isinstance(source, list):
        return True
    return isinstance(source, (str, Path)) and Path(source).suffix.lower() in (".geojson", ".json")


def raster_geometry(path: str | Path) -> tuple[tuple[int, int], float]:
    """``((slide width, slide height), downsample)`` of a raster written by :mod:`helpers.rasters`.

    The slide size is the raster size x its downsample (exact up to the rounding of
    the raster size), used when the slide itself is not at hand.
    """
    from helpers.rasters import raster_info

    info = raster_info(path)
    ds = float(info["downsample"])
    return (int(round(info["width"] * ds)), int(round(info["height"] * ds))), ds


def load_labels(source: Any, class_map: ClassMap, downsample: float | None = None,
                slide_size: tuple[int, int] | None = None, **geojson_kwargs: Any) -> np.ndarray:
    """A label image from an array, a label TIFF or QuPath GeoJSON, at ``downsample``.

    Args:
        source: 2-D uint8 array (returned as is), a label raster path (read with
            :func:`helpers.rasters.read_raster`, nearest neighbour), or a QuPath GeoJSON
            path / list of :class:`helpers.annotations.Annotation` (rasterized with
            :func:`helpers.annotations.annotations_to_label_image`).
        class_map: The classes (GeoJSON class names -> labels).
        downsample: Level-0 slide pixels per output pixel (None: the raster's own).
        slide_size: ``(width, height)`` of the slide in level-0 pixels; required for GeoJSON.
        **geojson_kwargs: Passed to :func:`helpers.annotations.read_annotations`
            (default here: both QuPath object types, annotations and detections).
    """
    if isinstance(source, np.ndarray):
        if source.ndim != 2:
            raise ParameterError(f"label image must be 2-D; got shape {source.shape}")
        return source
    if _is_geojson(source):
        if slide_size is None or downsample is None:
            raise ParameterError(f"{source}: rasterizing GeoJSON needs slide_size=(w, h) and downsample")
        from helpers.annotations import annotations_to_label_image

        if not isinstance(source, list):
            geojson_kwargs.setdefault("object_types", ("annotation", "detection"))
        else:
            geojson_kwargs = {}
        return np.asarray(annotations_to_label_image(source, class_map, slide_size, downsample, **geojson_kwargs))
    path = Path(source)
    if not path.is_file():
        raise HistoUNetError(f"{path}: label image not found; run the step that writes it (07 for predictions, 00 for truth)")
    from helpers.rasters import read_raster

    img = np.asarray(read_raster(path, downsample=downsample))
    if img.ndim == 3:
        img = img[..., 0]
    return img


def _match_shape(ref: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both to the common extent (rasters may differ by a rounding pixel)."""
    if ref.shape == pred.shape:
        return ref, pred
    dh, dw = abs(ref.shape[0] - pred.shape[0]), abs(ref.shape[1] - pred.shape[1])
    if dh > 2 or dw > 2:
        raise ParameterError(
            f"reference {ref.shape} and prediction {pred.shape} differ by more than rounding; "
            "are they of the same slide and the same downsample?"
        )
    h, w = min(ref.shape[0], pred.shape[0]), min(ref.shape[1], pred.shape[1])
    return ref[:h, :w], pred[:h, :w]


# ----------------------------------------------------------------------------- evaluation
@dataclass
class SlideEvaluation:
    """Result of comparing one slide's prediction with a reference."""

    slide: str
    reference_kind: str
    downsample: float
    confusion: np.ndarray
    metrics: pd.DataFrame
    summary: dict[str, float]
    reference: np.ndarray = field(repr=False)
    prediction: np.ndarray = field(repr=False)


def evaluate_labels(prediction: Any, reference: Any, class_map: ClassMap, *, downsample: float | None = None,
                    slide_size: tuple[int, int] | None = None, slide: str = "slide",
                    reference_kind: str | None = None) -> SlideEvaluation:
    """Compare one prediction with one reference at a stated resolution.

    Args:
        prediction: Label array, label TIFF (07's ``labels.tiff``) or QuPath GeoJSON.
        reference: Label array, label TIFF (``truth/<slide>.tiff``) or QuPath GeoJSON
            annotations (sparse or dense).
        class_map: The classes.
        downsample: Level-0 pixels per evaluation pixel. None: the prediction raster's
            own (or the reference raster's when the prediction is GeoJSON).
        slide_size: Slide ``(width, height)`` in level-0 pixels; taken from a raster
            input when None. Needed when GeoJSON is involved.
        slide: Name used in the tables.
        reference_kind: Label for the tables (default: "dense" for rasters, "annotations" for GeoJSON).

    Returns:
        A :class:`SlideEvaluation` (confusion, per-class metrics, summary and the two
        label images at the evaluation resolution).
    """
    rasters = [s for s in (prediction, reference) if isinstance(s, (str, Path)) and not _is_geojson(s)]
    if rasters and (downsample is None or slide_size is None):
        size0, ds0 = raster_geometry(rasters[0])
        slide_size = slide_size or size0
        downsample = downsample if downsample is not None else ds0
    if downsample is None:
        downsample = 1.0
    pred = load_labels(prediction, class_map, downsample, slide_size)
    ref = load_labels(reference, class_map, downsample, slide_size)
    ref, pred = _match_shape(ref, pred)
    cm = confusion_matrix(ref, pred, class_map.n_classes)
    metrics = class_metrics(cm, class_map)
    kind = reference_kind or ("annotations" if _is_geojson(reference) else "dense")
    if cm[1:].sum() == 0:
        log.warning("%s: the reference labels no pixel at downsample %.3g; metrics are undefined", slide, downsample)
    return SlideEvaluation(slide, kind, float(downsample), cm, metrics, summary_figures(metrics, cm), ref, pred)


def results_tables(results: Sequence[SlideEvaluation], class_map: ClassMap) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-slide and overall tables.

    The overall rows (``slide == "overall"``) come from the summed confusion matrices of
    each reference kind (pixel-weighted, not an average of slide averages).

    Returns:
        ``(metrics, confusion)``: metrics has one row per slide x reference kind x class;
        confusion is long form (``slide, reference, true, predicted, pixels``).
    """
    metric_rows, conf_rows = [], []
    names = ["unlabelled"] + class_map.names
    by_kind: dict[str, np.ndarray] = {}
    for r in results:
        m = r.metrics.copy()
        m.insert(0, "reference", r.reference_kind)
        m.insert(0, "slide", r.slide)
        metric_rows.append(m)
        by_kind[r.reference_kind] = by_kind.get(r.reference_kind, 0) + r.confusion
        conf_rows.extend(_confusion_long(r.confusion, names, r.slide, r.reference_kind))
    for kind, cm in by_kind.items():
        m = class_metrics(cm, class_map)
        m.insert(0, "reference", kind)
        m.insert(0, "slide", "overall")
        metric_rows.append(m)
        conf_rows.extend(_confusion_long(cm, names, "overall", kind))
    return pd.concat(metric_rows, ignore_index=True), pd.DataFrame(conf_rows)


def _confusion_long(cm: np.ndarray, names: list[str], slide: str, kind: str) -> list[dict]:
    return [{"slide": slide, "reference": kind, "true": names[i], "predicted": names[j], "pixels": int(cm[i, j])}
            for i in range(1, cm.shape[0]) for j in range(cm.shape[1])]


def save_results(results: Sequence[SlideEvaluation], class_map: ClassMap, out_dir: str | Path,
                 overwrite: bool = False) -> dict[str, Path]:
    """Write ``metrics.csv``, ``confusion.csv`` and ``metrics.json`` (atomically) into ``out_dir``.

    Returns:
        ``{"metrics": path, "confusion": path, "json": path}``.
    """
    from helpers.io import atomic_path, write_json

    out_dir = Path(out_dir)
    metrics, confusion = results_tables(results, class_map)
    paths = {"metrics": out_dir / "metrics.csv", "confusion": out_dir / "confusion.csv", "json": out_dir / "metrics.json"}
    for key in ("metrics", "confusion"):
        with atomic_path(paths[key], overwrite) as tmp:
            (metrics if key == "metrics" else confusion).to_csv(tmp, index=False, float_format="%.6g")
    summary = {
        "headline_class": HEADLINE_CLASS,
        "slides": [{"slide": r.slide, "reference": r.reference_kind, "downsample": r.downsample, **r.summary}
                   for r in results],
        "overall": {kind: summary_figures(g.drop(columns=["slide", "reference"]).reset_index(drop=True))
                    for kind, g in metrics[metrics["slide"] == "overall"].groupby("reference")},
    }
    write_json(summary, paths["json"], overwrite=overwrite)
    return paths


def compare_references(dense: SlideEvaluation, sparse: SlideEvaluation) -> pd.DataFrame:
    """Side by side per-class IoU/Dice against the dense truth and the sparse annotations.

    ``iou_gap`` = sparse IoU - dense IoU: how much the sparse evaluation flatters (or
    harms) each class; ``sparse_coverage`` = the share of the dense truth's labelled
    pixels of that class that the annotations cover.
    """
    d = dense.metrics.set_index("class")
    s = sparse.metrics.set_index("class")
    out = pd.DataFrame({
        "iou_dense": d["iou"], "iou_sparse": s["iou"], "iou_gap": s["iou"] - d["iou"],
        "dice_dense": d["dice"], "dice_sparse": s["dice"],
        "px_dense": d["ref_px"], "px_sparse": s["ref_px"],
    })
    out["sparse_coverage"] = out["px_sparse"] / out["px_dense"].where(out["px_dense"] > 0)
    return out.reset_index()


# ----------------------------------------------------------------------------- pictures
def plot_metrics(metrics: pd.DataFrame, title: str = ""):
    """Figure: per-class IoU and Dice bars, one group per reference kind (overall rows if any)."""
    import matplotlib.pyplot as plt

    df = metrics
    if "slide" in df.columns and (df["slide"] == "overall").any():
        df = df[df["slide"] == "overall"]
    if "reference" not in df.columns:
        df = df.assign(reference="reference")
    kinds = list(dict.fromkeys(df["reference"]))
    classes = list(dict.fromkeys(df["class"]))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    width = 0.8 / max(1, len(kinds))
    x = np.arange(len(classes))
    for ax, metric in zip(axes, ("iou", "dice")):
        for i, kind in enumerate(kinds):
            vals = df[df["reference"] == kind].set_index("class").reindex(classes)[metric].to_numpy(float)
            bars = ax.bar(x + (i - (len(kinds) - 1) / 2) * width, np.nan_to_num(vals), width, label=kind)
            for b, v in zip(bars, vals):
                ax.annotate("n/a" if np.isnan(v) else f"{v:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, classes)
        ax.set_ylim(0, 1.08)
        ax.set_title("IoU" if metric == "iou" else "Dice")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("score (reference-labelled pixels)")
    if len(kinds) > 1:
        axes[1].legend(title="reference", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_confusion(confusion: np.ndarray, class_map: ClassMap, title: str = "", normalize: bool = True):
    """Figure: confusion matrix (rows = reference, columns = prediction), row-normalized."""
    import matplotlib.pyplot as plt

    cm = np.asarray(confusion, float)[1:, :]
    cols = ["none"] + class_map.names
    if not cm[:, 0].any():  # no "nothing predicted" pixels: drop the column
        cm, cols = cm[:, 1:], cols[1:]
    shown = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1) if normalize else cm
    fig, ax = plt.subplots(figsize=(1.1 * len(cols) + 2.2, 1.0 * len(class_map.names) + 1.6))
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    for i in range(shown.shape[0]):
        for j in range(shown.shape[1]):
            txt = f"{shown[i, j]:.2f}\n({int(cm[i, j]):,})" if normalize else f"{int(cm[i, j]):,}"
            ax.text(j, i, txt, ha="center", va="center", fontsize=7,
                    color="white" if shown[i, j] > 0.6 * (shown.max() or 1) else "black")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(class_map.names)), class_map.names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    ax.set_title(title or ("confusion (share of each reference row; pixel counts)" if normalize else "confusion (pixels)"))
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def error_map(reference: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """0 = reference unlabelled, 1 = correct, 2 = misclassified."""
    out = np.zeros(reference.shape, np.uint8)
    labelled = reference > 0
    out[labelled & (reference == prediction)] = 1
    out[labelled & (reference != prediction)] = 2
    return out


def plot_errors(result: SlideEvaluation, class_map: ClassMap, image: np.ndarray | None = None,
                title: str = "", max_size: int = 1200):
    """Figure: reference, prediction and the misclassified regions overlaid on the slide.

    Misclassified pixels are red, correct ones green; pixels the reference does not
    label stay uncoloured.

    Args:
        result: From :func:`evaluate_labels`.
        class_map: The classes (colours).
        image: Optional RGB thumbnail of the slide (resized to the label image).
        title: Figure title.
        max_size: Longest side shown (label images are subsampled for the picture).
    """
    import cv2
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from helpers.viz import colorize, legend_handles

    ref, pred = result.reference, result.prediction
    step = max(1, int(np.ceil(max(ref.shape) / max_size)))
    ref, pred = ref[::step, ::step], pred[::step, ::step]
    err = error_map(ref, pred)
    if image is None:
        base = np.full(ref.shape + (3,), 255, np.uint8)
    else:
        base = cv2.resize(np.ascontiguousarray(image[..., :3]), (ref.shape[1], ref.shape[0]), interpolation=cv2.INTER_AREA)
    over = base.astype(np.float32)
    for val, rgb, alpha in ((1, (0, 170, 0), 0.35), (2, (230, 0, 0), 0.6)):  # errors stand out, tissue shows through
        m = err == val
        over[m] = (1 - alpha) * over[m] + alpha * np.array(rgb, np.float32)
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.4))
    panels = [(colorize(ref, class_map), f"reference ({result.reference_kind})"),
              (colorize(pred, class_map), "prediction"),
              (over.round().astype(np.uint8), "errors: red wrong, green right")]
    for ax, (img, t) in zip(axes, panels):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(t)
        ax.axis("off")
    axes[1].legend(handles=legend_handles(class_map), loc="lower right", fontsize=7, framealpha=0.8)
    axes[2].legend(handles=[Patch(color=(0.9, 0, 0), label="misclassified"), Patch(color=(0, 0.67, 0), label="correct")],
                   loc="lower right", fontsize=7, framealpha=0.8)
    s = result.summary
    fig.suptitle(title or f"{result.slide}: tumour IoU {s['tumor_iou']:.3f}, mean IoU {s['mean_iou']:.3f} "
                          f"(vs {result.reference_kind}, downsample {result.downsample:g})")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- seams
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


# ----------------------------------------------------------------------------- work folder
def predicted_slides(workdir: str | Path) -> list[str]:
    """Names of the slides 07 predicted (``predictions/<slide>/labels.tiff`` exists)."""
    from helpers.steps import step_dir

    pred = step_dir(workdir, "predictions")
    return sorted(p.parent.name for p in pred.glob("*/labels.tiff"))


def evaluate_workdir(workdir: str | Path, class_map: ClassMap, reference: str = "dense",
                     slides: Sequence[str] | None = None, downsample: float | None = None) -> list[SlideEvaluation]:
    """Evaluate 07's ``predictions/<slide>/labels.tiff`` of every (or the given) slide.

    Args:
        workdir: The work folder.
        class_map: The classes.
        reference: ``"dense"`` (``truth/<slide>.tiff``) or ``"sparse"``
            (``annotations/<slide>.geojson``: only the annotated pixels count).
        slides: Slide names; None = every slide with a prediction.
        downsample: Evaluation resolution (level-0 px per pixel); None = the prediction's.

    Raises:
        HistoUNetError: no prediction, or a slide without the requested reference.
    """
    from helpers.steps import step_dir

    workdir = Path(workdir)
    slides = list(slides) if slides else predicted_slides(workdir)
    if not slides:
        raise HistoUNetError(f"{step_dir(workdir, 'predictions')}: no predictions/<slide>/labels.tiff; run 07_infer_slide first")
    if reference not in ("dense", "sparse"):
        raise ParameterError(f"reference={reference!r}: use 'dense' (truth/) or 'sparse' (annotations/)")
    out = []
    for name in slides:
        pred = step_dir(workdir, "predictions") / name / "labels.tiff"
        if not pred.is_file():
            raise HistoUNetError(f"{pred}: prediction not found; run 07_infer_slide on slide {name!r}")
        if reference == "dense":
            ref: Path = step_dir(workdir, "truth") / f"{name}.tiff"
            hint = "a dense truth exists only for the demo slide (00); use reference='sparse' for your own slides"
        else:
            from helpers.annotations import find_annotation_file

            ref = find_annotation_file(step_dir(workdir, "annotations"), name) or step_dir(workdir, "annotations") / f"{name}.geojson"
            hint = "export the slide's annotations from QuPath as GeoJSON into annotations/"
        if not ref.is_file():
            raise HistoUNetError(f"{ref}: reference not found; {hint}")
        size = _slide_size(workdir, name, pred)
        out.append(evaluate_labels(pred, ref, class_map, downsample=downsample, slide_size=size, slide=name,
                                   reference_kind=reference))
    return out


def _slide_size(workdir: Path, name: str, raster: Path) -> tuple[int, int]:
    """The slide's level-0 size: from the slide file if present, else from the raster."""
    from helpers.steps import step_dir
    from helpers.slides import find_slides, open_slide

    slides_dir = step_dir(workdir, "slides")
    if slides_dir.is_dir():
        for p in find_slides(slides_dir):
            if p.stem == name:
                with open_slide(p) as s:
                    return s.dimensions
    return raster_geometry(raster)[0]


def slide_thumbnail(workdir: str | Path, name: str, max_size: int = 1200) -> np.ndarray | None:
    """RGB thumbnail of ``slides/<name>.*`` (None if the slide is not in the work folder)."""
    from helpers.steps import step_dir
    from helpers.slides import find_slides, open_slide

    d = step_dir(workdir, "slides")
    for p in find_slides(d) if d.is_dir() else []:
        if p.stem == name:
            with open_slide(p) as s:
                return s.thumbnail(max_size)[0]
    return None


def iou_table(results: Sequence[SlideEvaluation]) -> pd.DataFrame:
    """Wide table for printing: one row per class, one IoU column per slide x reference."""
    cols = {f"{r.slide} ({r.reference_kind})": r.metrics.set_index("class")["iou"] for r in results}
    return pd.DataFrame(cols).round(4)


# ----------------------------------------------------------------------------- variants study
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
                  overwrite: bool = False, progress: bool = False) -> pd.DataFrame:
    """Quality versus cost of inference settings on one slide with a dense truth.

    For every model x overlap x blend the slide is predicted once
    (:func:`helpers.infer.predict_slide`); every smoothing kernel is then applied to
    the stored probabilities (no re-prediction). Each row holds tumour and mean IoU
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

    Returns:
        The table (also ``out_dir/variants.csv``), one row per model x overlap x blend x kernel.
    """
    import shutil

    from helpers.infer import predict_slide, read_probabilities
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
                            overwrite=True, progress=progress)
        probs = read_probabilities(scratch)
        ds = float(res.downsample)
        if ds not in truth_cache:
            slide_size = (int(round(res.width * ds)), int(round(res.height * ds)))
            truth_cache[ds] = load_labels(truth, class_map, ds, slide_size)
        for kernel in kernels:
            t0 = time.perf_counter()
            labels = smooth_argmax(probs, kernel)
            smooth_s = time.perf_counter() - t0
            ref, pred = _match_shape(truth_cache[ds], labels)
            cm = confusion_matrix(ref, pred, class_map.n_classes)
            s = summary_figures(class_metrics(cm, class_map), cm)
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
            log.info("%s o%d %s %s: tumour IoU %.4f, mean IoU %.4f, seam %.2f, %.1f s", name, overlap, blend, kernel,
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


def plot_variants(table: pd.DataFrame, metric: str = "tumor_iou", tolerance: float = 0.005):
    """Figure: IoU against seconds for every setting (colour = overlap, marker = blend, size = kernel)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    colors = {1: "tab:blue", 4: "tab:orange", 16: "tab:red"}
    markers = {"mean": "s", "gaussian": "o"}
    kernels = list(dict.fromkeys(table["kernel"]))
    multi = table["model"].nunique() > 1
    pick = cheapest_within(table, metric, tolerance)
    for ax, m in zip(axes, (metric, "seam_score")):
        for _, r in table.iterrows():
            ax.scatter(r["seconds"], r[m], color=colors.get(int(r["overlap"]), "tab:gray"),
                       marker=markers.get(r["blend"], "^"), s=30 + 25 * kernels.index(r["kernel"]),
                       alpha=0.8, edgecolor="black", linewidth=0.5)
        ax.set_xlabel("seconds (prediction + smoothing)")
        ax.grid(alpha=0.3)
    axes[0].scatter(pick["seconds"], pick[metric], s=260, facecolor="none", edgecolor="green", linewidth=2)
    axes[0].annotate(f"chosen: {variant_label(pick, multi)}", (pick["seconds"], pick[metric]), xytext=(8, -14),
                     textcoords="offset points", fontsize=8, color="green")
    best = table[metric].max()
    axes[0].axhspan(best - tolerance, best, color="green", alpha=0.08, label=f"within {tolerance * 100:.1f} points of best")
    axes[0].set_ylabel(metric.replace("_", " ").replace("iou", "IoU"))
    axes[0].set_title("quality vs cost")
    axes[1].axhline(1.0, color="gray", linestyle="--", linewidth=1)
    if "seam_score_truth" in table:
        axes[1].scatter(table["seconds"], table["seam_score_truth"], marker="x", color="black", s=25, zorder=3)
    axes[1].set_ylabel("seam score (label changes on tile borders / elsewhere)")
    axes[1].set_title("tile seams (1 = invisible)")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, marker="o", linestyle="", label=f"overlap {o}") for o, c in colors.items()
               if o in set(table["overlap"])]
    handles += [Line2D([], [], color="gray", marker=mk, linestyle="", label=f"blend {b}") for b, mk in markers.items()
                if b in set(table["blend"])]
    handles += [Line2D([], [], color="gray", marker="o", linestyle="", markersize=np.sqrt(30 + 25 * i),
                       label=f"kernel {k}") for i, k in enumerate(kernels)]
    if "seam_score_truth" in table:
        handles.append(Line2D([], [], color="black", marker="x", linestyle="", label="truth on the same grid"))
    axes[1].legend(handles=handles, fontsize=7, loc="best")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- notebook steps
def prepare_output(workdir: str | Path, overwrite: bool = False) -> Path:
    """``workdir/evaluation``, created; refuses a finished one (with a manifest) unless ``overwrite``."""
    from helpers.steps import step_dir
    from helpers.io import check_writable

    out = step_dir(workdir, "evaluation", create=True)
    check_writable(out / "manifest.csv", overwrite)
    return out


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


def write_manifest(workdir: str | Path, overwrite: bool = False) -> Path:
    """``evaluation/manifest.csv``: every file of the step (paths relative to the workdir); written last."""
    from helpers.steps import step_dir
    from helpers.io import write_manifest as _write

    workdir = Path(workdir)
    out = step_dir(workdir, "evaluation")
    files = sorted(p for p in out.iterdir() if p.is_file() and not p.name.startswith(".") and p.name != "manifest.csv")
    df = pd.DataFrame({"file": [str(p.relative_to(workdir)) for p in files],
                       "kind": [p.suffix.lstrip(".") for p in files],
                       "bytes": [p.stat().st_size for p in files]})
    return _write(df, out / "manifest.csv", overwrite=overwrite)
