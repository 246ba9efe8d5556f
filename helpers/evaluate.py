"""Compare predicted labels with a reference (step 08): per-slide metrics on the work folder.

A *reference* is a dense label image (e.g. the demo's ``truth/<slide>.tiff``) or QuPath
GeoJSON annotations (sparse or dense). A *prediction* is a label image (``labels.tiff``
written by 07) or the GeoJSON exported for QuPath. Both are brought to one stated
resolution (``downsample``: level-0 slide pixels per evaluation pixel) and compared only
where the reference labels a pixel: label 0 (unlabelled) is left out, so sparse
annotations measure only what was annotated.

The metrics (confusion, IoU, Dice; a predicted 0 counts as a miss) are
:mod:`helpers.metrics`, the same code that scores validation in training (05); the
headline figure is the IoU of the class map's headline class. The variants study is
:mod:`helpers.variants`; the figures are in :mod:`helpers.views.evaluate`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from helpers.config import ClassMap
from helpers.errors import HistoUNetError, ParameterError
from helpers.metrics import class_metrics, confusion_matrix, headline_name, summary_figures

log = logging.getLogger(__name__)


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


def match_shape(ref: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
    ref, pred = match_shape(ref, pred)
    cm = confusion_matrix(ref, pred, class_map.n_classes)
    metrics = class_metrics(cm, class_map)
    kind = reference_kind or ("annotations" if _is_geojson(reference) else "dense")
    if cm[1:].sum() == 0:
        log.warning("%s: the reference labels no pixel at downsample %.3g; metrics are undefined", slide, downsample)
    return SlideEvaluation(slide, kind, float(downsample), cm, metrics, summary_figures(metrics, class_map, cm), ref, pred)


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
        "headline_class": headline_name(class_map),
        "slides": [{"slide": r.slide, "reference": r.reference_kind, "downsample": r.downsample, **r.summary}
                   for r in results],
        "overall": {kind: summary_figures(g.drop(columns=["slide", "reference"]).reset_index(drop=True), class_map)
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


def error_map(reference: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """0 = reference unlabelled, 1 = correct, 2 = misclassified."""
    out = np.zeros(reference.shape, np.uint8)
    labelled = reference > 0
    out[labelled & (reference == prediction)] = 1
    out[labelled & (reference != prediction)] = 2
    return out


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


def prepare_output(workdir: str | Path, overwrite: bool = False) -> Path:
    """``workdir/evaluation``, created; refuses a finished one (with a manifest) unless ``overwrite``."""
    from helpers.steps import step_dir
    from helpers.io import check_writable

    out = step_dir(workdir, "evaluation", create=True)
    check_writable(out / "manifest.csv", overwrite)
    return out


def write_manifest(workdir: str | Path, overwrite: bool = False) -> Path:
    """The step's done marker ``evaluation/manifest.csv`` (:func:`helpers.steps.mark_done`); written last.

    ``overwrite`` is accepted for compatibility: the marker always describes the folder as it is now.
    """
    from helpers.steps import mark_done, step_dir

    return mark_done(step_dir(workdir, "evaluation"))
