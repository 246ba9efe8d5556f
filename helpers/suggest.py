"""Annotate next (step 09): rank tissue fields by the model's uncertainty and hand them to QuPath.

For every slide 07 predicted, :func:`slide_fields` cuts the prediction raster into square
candidate fields of ``field_um``, keeps those that are mostly tissue (the glass rule of
:mod:`helpers.tissue`) and not already annotated (``annotations/<slide>.geojson``), and
scores each by the mean per-pixel **uncertainty** over its tissue pixels.
:func:`rank_fields` then picks the best ``n_regions`` over the whole cohort, at least
``min_spacing_um`` apart on a slide, and :func:`write_suggestions` writes them.

Uncertainty (documented choice), from the blended class probabilities ``p`` of 07:

* ``"entropy"`` (default): normalized entropy ``-sum p log p / log C``; 0 when one class
  has all the probability, 1 when all ``C`` classes are equally likely. It counts doubt
  among every class, so a field where three classes compete scores higher than one
  where two do.
* ``"margin"``: ``1 - (p1 - p2)``, one minus the gap between the two most likely
  classes; 1 on a tie. It looks only at the top two classes (the decision boundary).

Both are computed per pixel at the prediction's resolution, then averaged per field.
Disagreement between overlapping tiles is not kept by 07 (the tiles are blended), so it
is not offered. An optional ``rare_bonus`` adds ``rare_bonus * sum_c f_c (1 - s_c)``,
``f_c`` the field's predicted share of class ``c`` and ``s_c`` the cohort's, so fields of
rarely predicted classes move up.

Suggestions are QuPath annotations (rectangles) named ``"Review <rank>"``, **without a
classification**, with measurements (score, uncertainty, predicted class fractions).
Step 01 never takes them as labels: :func:`helpers.annotations.read_annotations` skips
unclassified features with such a name whatever its ``unclassified`` policy.
Outputs (``workdir/suggestions/``): ``<slide>.geojson``, ``suggestions.csv`` (the ranked
cohort table), ``candidates.csv`` (every scored field), ``gallery.png``, ``manifest.csv``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from helpers.annotations import SUGGESTION_PREFIX
from helpers.config import ClassMap
from helpers.errors import ClassMapError, HistoUNetError, ParameterError
from helpers.steps import DONE, step_dir

log = logging.getLogger(__name__)

UNCERTAINTY = ("entropy", "margin")
#: Colour of the suggestion rectangles in QuPath (no class, so the object's own colour).
SUGGESTION_COLOR = (0, 160, 255)
#: Columns of ``suggestions.csv`` before the per-class fractions.
TABLE_COLUMNS = ["slide", "rank", "name", "x_um", "y_um", "w_um", "h_um", "score", "uncertainty",
                 "tissue_fraction", "annotated_fraction", "x", "y", "w", "h"]


def uncertainty_map(probs: np.ndarray, kind: str = "entropy") -> np.ndarray:
    """Per-pixel uncertainty in [0, 1] of class probabilities ``(H, W, C)`` (see the module docstring).

    Args:
        probs: Probabilities (any scale; each pixel is renormalized to sum 1).
        kind: ``"entropy"`` (normalized entropy) or ``"margin"`` (1 - margin of the top two).
    """
    if kind not in UNCERTAINTY:
        raise ParameterError(f"uncertainty={kind!r}: use one of {', '.join(UNCERTAINTY)}")
    p = np.asarray(probs, np.float32)
    if p.ndim != 3:
        raise ParameterError(f"probabilities must be (H, W, C); got shape {p.shape}")
    n = p.shape[-1]
    if n < 2:
        return np.zeros(p.shape[:2], np.float32)
    p = p / np.maximum(p.sum(axis=-1, keepdims=True), 1e-6)
    if kind == "entropy":
        h = -(p * np.log(np.clip(p, 1e-6, 1.0))).sum(axis=-1)
        return np.clip(h / np.log(n), 0.0, 1.0).astype(np.float32)
    top2 = np.partition(p, n - 2, axis=-1)[..., n - 2:]
    return np.clip(1.0 - (top2[..., 1] - top2[..., 0]), 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------- inputs


def predicted_slides(workdir: str | Path, slides: list[str] | None = None) -> list[Path]:
    """Prediction folders holding ``probabilities.tiff`` (all, or those of ``slides``).

    Raises:
        HistoUNetError: none found (run 07 first), or a requested slide has none.
    """
    pred_root = step_dir(workdir, "predictions")
    found = sorted(p.parent for p in pred_root.glob("*/probabilities.tiff")) if pred_root.is_dir() else []
    if slides:
        missing = [s for s in slides if not (pred_root / s / "probabilities.tiff").is_file()]
        if missing:
            raise HistoUNetError(f"{pred_root / missing[0] / 'probabilities.tiff'}: not found; run 07_infer_slide "
                                 f"for slide(s) {', '.join(missing)} first")
        found = [pred_root / s for s in slides]
    if not found:
        raise HistoUNetError(f"{pred_root}: no predictions yet (no <slide>/probabilities.tiff); "
                             "run 07_infer_slide first")
    return found


def _class_map_of(pred_dir: Path, info: dict, class_map: ClassMap | str | Path | None) -> ClassMap:
    from helpers.model import check_class_map, class_map_from_params

    src = pred_dir / "prediction.json"
    model_cmap = class_map_from_params(info.get("classes"), str(src))
    try:
        return check_class_map(model_cmap, class_map)
    except ClassMapError:
        given = class_map.source if isinstance(class_map, ClassMap) else class_map
        raise ClassMapError(f"{src}: probabilities are of classes {model_cmap.names}, not those of {given}; pass the "
                            "class map the model was trained with, or predict again (07) with this one") from None


def _slide_path(workdir: Path, info: dict) -> Path:
    from helpers.slides import find_slides

    p = Path(info.get("slide_path", ""))
    if p.is_file():
        return p
    slides_dir = step_dir(workdir, "slides")
    for s in find_slides(slides_dir) if slides_dir.is_dir() else []:
        if s.stem == info["slide"]:
            return s
    raise HistoUNetError(f"{p}: slide of prediction {info['slide']} not found; put it back or into {slides_dir}")


def _annotation_union(workdir: Path, slide: str, cmap: ClassMap, size: tuple[int, int]) -> tuple[Any, Path | None]:
    """Union of the slide's labelling annotations (suggestions excluded) and the file they came from."""
    from shapely.ops import unary_union

    from helpers.annotations import find_annotation_file, read_annotations

    path = find_annotation_file(step_dir(workdir, "annotations"), slide)
    if path is None:
        return None, None
    anns = read_annotations(path, cmap, slide_size=size, allow_empty=True)
    return (unary_union([a.geometry for a in anns]) if anns else None), path


# --------------------------------------------------------------------------- candidate fields


def slide_fields(pred_dir: str | Path, workdir: str | Path, class_map: ClassMap | str | Path | None = None, *,
                 field_um: float = 200.0, uncertainty: str = "entropy", min_tissue_fraction: float = 0.5,
                 max_annotated_fraction: float = 0.1) -> pd.DataFrame:
    """Every candidate field of one predicted slide, scored (one row per field).

    The prediction raster is cut into squares of ``field_um`` (whole fields only, from the
    top left); a field is a candidate when at least ``min_tissue_fraction`` of it is tissue
    and at most ``max_annotated_fraction`` of it is covered by annotations.

    Returns:
        Columns ``slide, x, y, w, h`` (level-0 px), ``x_um, y_um, w_um, h_um``, ``uncertainty``
        (mean over tissue pixels), ``tissue_fraction``, ``annotated_fraction``,
        ``frac_<class>`` (predicted share of the tissue pixels), ``candidate`` (bool).

    Raises:
        HistoUNetError: the slide shows no tissue, or the field is larger than the slide.
        ClassMapError: the probabilities are of another class map.
    """
    from shapely.geometry import box

    from helpers.predict import probabilities_path, read_prediction_info
    from helpers.rowstore import RasterRows
    from helpers.slides import open_slide
    from helpers.tissue import slide_tissue_mask

    pred_dir, workdir = Path(pred_dir), Path(workdir)
    info = read_prediction_info(pred_dir)
    cmap = _class_map_of(pred_dir, info, class_map)
    rows = RasterRows(probabilities_path(pred_dir))
    if rows.ndim != 3 or rows.shape[2] != cmap.n_classes:
        raise ClassMapError(f"{probabilities_path(pred_dir)}: {rows.shape[2] if rows.ndim == 3 else 1} channels for "
                            f"{cmap.n_classes} classes; predict again (07) with this class map")
    ds, mpp = float(info["downsample"]), float(info["mpp"])
    if not field_um > 0:
        raise ParameterError(f"field_um must be > 0 micrometres; got {field_um}")
    f = max(4, int(round(field_um / mpp)))  # field side in raster px
    height, width = rows.shape[:2]
    nx, ny = width // f, height // f
    if nx == 0 or ny == 0:
        raise ParameterError(f"{pred_dir}: field_um={field_um} ({f} px at {mpp:g} um/px) is larger than the slide's "
                             f"prediction ({width}x{height} px); use a smaller field_um")
    slide_path = _slide_path(workdir, info)
    with open_slide(slide_path, mpp=info.get("slide_mpp")) as slide:
        tissue, tds = slide_tissue_mask(slide)
        size = slide.dimensions
    if not tissue.any():
        raise HistoUNetError(f"{slide_path}: no tissue found on the slide; remove it from the work folder (or from "
                             "slides=) or check the scan")
    cols = np.minimum((np.arange(nx * f) * ds / tds).astype(np.intp), tissue.shape[1] - 1)
    n_cls = cmap.n_classes
    unc_sum = np.zeros((ny, nx), np.float64)
    n_tissue = np.zeros((ny, nx), np.float64)
    counts = np.zeros((ny, nx, n_cls), np.float64)
    for j in range(ny):
        band = rows.read(j * f, (j + 1) * f)[:, :nx * f].astype(np.float32) / 255.0
        rr = np.minimum((np.arange(j * f, (j + 1) * f) * ds / tds).astype(np.intp), tissue.shape[0] - 1)
        t = tissue[np.ix_(rr, cols)]
        u = uncertainty_map(band, uncertainty) * t
        unc_sum[j] = u.reshape(f, nx, f).sum(axis=(0, 2))
        n_tissue[j] = t.reshape(f, nx, f).sum(axis=(0, 2))
        arg = band.argmax(axis=-1)
        for c in range(n_cls):
            counts[j, :, c] = ((arg == c) & t).reshape(f, nx, f).sum(axis=(0, 2))
    ann, ann_path = _annotation_union(workdir, info["slide"], cmap, size)
    side = f * ds
    recs = []
    for j in range(ny):
        for i in range(nx):
            x, y = i * side, j * side
            annotated = ann.intersection(box(x, y, x + side, y + side)).area / side**2 if ann is not None else 0.0
            nt = n_tissue[j, i]
            rec = {"slide": info["slide"], "x": int(round(x)), "y": int(round(y)), "w": int(round(side)),
                   "h": int(round(side)), "x_um": x * mpp / ds, "y_um": y * mpp / ds, "w_um": f * mpp, "h_um": f * mpp,
                   "uncertainty": unc_sum[j, i] / nt if nt else 0.0, "tissue_fraction": nt / f**2,
                   "annotated_fraction": annotated}
            for c, cls in enumerate(cmap.classes):
                rec[f"frac_{cls.name}"] = counts[j, i, c] / nt if nt else 0.0
            recs.append(rec)
    df = pd.DataFrame(recs)
    tissue_ok = df["tissue_fraction"] >= min_tissue_fraction
    df["candidate"] = tissue_ok & (df["annotated_fraction"] <= max_annotated_fraction)
    if not tissue_ok.any():
        raise HistoUNetError(f"{slide_path}: no {field_um:g} um field is at least {min_tissue_fraction:.0%} tissue; "
                             "lower min_tissue_fraction or field_um, or check the scan")
    if not df["candidate"].any():
        raise HistoUNetError(f"{ann_path}: every tissue field of {info['slide']} is already annotated; nothing left to "
                             "suggest (raise max_annotated_fraction, use a smaller field_um, or train on what you have)")
    return df


def cohort_fields(workdir: str | Path, class_map: ClassMap | str | Path | None = None, slides: list[str] | None = None,
                  **kwargs: Any) -> pd.DataFrame:
    """:func:`slide_fields` of every predicted slide, one table.

    A slide without tissue or without unannotated fields is skipped with a warning when
    other slides have candidates; when none has, its one-line error is raised.
    """
    from tqdm.auto import tqdm

    tables, errors = [], []
    for pred_dir in tqdm(predicted_slides(workdir, slides), desc="slides", unit="slide", leave=False):
        try:
            tables.append(slide_fields(pred_dir, workdir, class_map, **kwargs))
        except (ClassMapError, ParameterError):
            raise
        except HistoUNetError as exc:
            errors.append(exc)
            log.warning("skipped: %s", exc)
    if not tables:
        raise errors[0]
    return pd.concat(tables, ignore_index=True)


# --------------------------------------------------------------------------- scoring and ranking


def score_fields(fields: pd.DataFrame, rare_bonus: float = 0.0) -> pd.DataFrame:
    """Add ``score``: the field's mean uncertainty, plus ``rare_bonus`` x its share of rarely predicted classes."""
    out = fields.copy()
    out["score"] = out["uncertainty"]
    frac = [c for c in out.columns if c.startswith("frac_")]
    if rare_bonus and frac:
        weights = out[frac].mul(out["tissue_fraction"], axis=0).sum()
        share = weights / max(float(weights.sum()), 1e-12)
        out["score"] = out["score"] + rare_bonus * (out[frac] * (1.0 - share)).sum(axis=1)
    return out


def rank_fields(fields: pd.DataFrame, n_regions: int, min_spacing_um: float = 0.0, strategy: str = "uncertainty",
                seed: int = 0) -> pd.DataFrame:
    """The top ``n_regions`` candidate fields over the cohort, at least ``min_spacing_um`` apart on a slide.

    Greedy: fields in order of decreasing ``score`` (``strategy="uncertainty"``) or in a
    random order (``"random"``, the baseline of the annotation-loop study); a field is
    taken when its centre is at least ``min_spacing_um`` from every field already taken
    on the same slide.

    Returns:
        The chosen rows with ``rank`` (1 = annotate first) and ``name`` ("Review <rank>").
    """
    if not isinstance(n_regions, (int, np.integer)) or isinstance(n_regions, bool) or n_regions < 1:
        raise ParameterError(f"n_regions={n_regions!r}: must be a whole number >= 1 (how many fields to suggest)")
    if min_spacing_um < 0:
        raise ParameterError(f"min_spacing_um={min_spacing_um}: must be >= 0")
    cand = fields[fields["candidate"]] if "candidate" in fields.columns else fields
    if strategy == "uncertainty":
        order = cand.sort_values(["score", "slide", "y", "x"], ascending=[False, True, True, True], kind="stable")
    elif strategy == "random":
        order = cand.sample(frac=1.0, random_state=np.random.RandomState(seed))
    else:
        raise ParameterError(f"strategy={strategy!r}: use 'uncertainty' or 'random'")
    taken: list[int] = []
    centres: dict[str, list[tuple[float, float]]] = {}
    for idx, r in order.iterrows():
        c = (r["x_um"] + r["w_um"] / 2, r["y_um"] + r["h_um"] / 2)
        near = centres.setdefault(r["slide"], [])
        if any((c[0] - a) ** 2 + (c[1] - b) ** 2 < min_spacing_um**2 for a, b in near):
            continue
        near.append(c)
        taken.append(idx)
        if len(taken) == n_regions:
            break
    out = order.loc[taken].copy()
    out.insert(1, "rank", np.arange(1, len(out) + 1))
    out.insert(2, "name", [f"{SUGGESTION_PREFIX} {k}" for k in out["rank"]])
    if len(out) < n_regions:
        log.warning("only %d of n_regions=%d fields could be suggested (candidates %d, min_spacing_um %g)",
                    len(out), n_regions, len(cand), min_spacing_um)
    return out.reset_index(drop=True)


# --------------------------------------------------------------------------- outputs


def suggestion_features(table: pd.DataFrame) -> list[dict]:
    """QuPath GeoJSON features of suggestions: locked, unclassified rectangles named "Review <rank>"."""
    from shapely.geometry import box

    from helpers.qupath import make_feature

    feats = []
    for _, r in table.iterrows():
        meas = {"suggestion rank": r["rank"], "suggestion score": r["score"], "uncertainty": r["uncertainty"],
                "tissue fraction": r["tissue_fraction"]}
        meas.update({f"predicted {c[5:]} fraction": r[c] for c in table.columns if c.startswith("frac_")})
        feat = make_feature(box(r["x"], r["y"], r["x"] + r["w"], r["y"] + r["h"]), None, None, name=r["name"],
                            measurements=meas)
        feat["properties"]["color"] = list(SUGGESTION_COLOR)
        feat["properties"]["isLocked"] = True
        feats.append(feat)
    return feats


def write_suggestions(workdir: str | Path, chosen: pd.DataFrame, fields: pd.DataFrame, overwrite: bool = False) -> dict:
    """Write ``suggestions/``: one GeoJSON per slide with suggestions, ``suggestions.csv``, ``candidates.csv``.

    The folder is built beside and swapped in (atomic); the done marker is :func:`write_manifest`.

    Returns:
        ``{"folder", "table", "candidates", "geojson": [paths]}``.
    """
    from helpers.io import atomic_dir, write_manifest
    from helpers.qupath import write_feature_collection

    out = step_dir(workdir, "suggestions")
    frac = [c for c in chosen.columns if c.startswith("frac_")]
    table = chosen[TABLE_COLUMNS + frac]
    geojson = []
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for slide, part in table.groupby("slide", sort=True):
            write_feature_collection(suggestion_features(part), tmp / f"{slide}.geojson")
            geojson.append(out / f"{slide}.geojson")
        write_manifest(table, tmp / "suggestions.csv")
        write_manifest(fields, tmp / "candidates.csv")
    return {"folder": out, "table": out / "suggestions.csv", "candidates": out / "candidates.csv", "geojson": geojson}


def prepare_output(workdir: str | Path, overwrite: bool = False) -> Path:
    """``suggestions/`` of the work folder, refused when it holds a finished run unless ``overwrite``."""
    from helpers.steps import guard_output

    out = step_dir(workdir, "suggestions")
    if (out / DONE).is_file():
        guard_output(out, overwrite, what="suggestions of an earlier run")
    return out


def write_manifest(workdir: str | Path) -> Path:
    """The done marker of ``suggestions/`` (lists its files; written last)."""
    from helpers.steps import mark_done

    return mark_done(step_dir(workdir, "suggestions"))


def suggest_regions(workdir: str | Path, class_map: ClassMap | str | Path | None = None, *, n_regions: int = 10,
                    min_spacing_um: float = 400.0, field_um: float = 200.0, uncertainty: str = "entropy",
                    rare_bonus: float = 0.0, min_tissue_fraction: float = 0.5, max_annotated_fraction: float = 0.1,
                    slides: list[str] | None = None, overwrite: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The whole step without figures: score, rank and write (see the module docstring).

    Returns:
        ``(chosen, candidates, paths)`` (see :func:`write_suggestions`).
    """
    if not isinstance(n_regions, (int, np.integer)) or isinstance(n_regions, bool) or n_regions < 1:
        raise ParameterError(f"n_regions={n_regions!r}: must be a whole number >= 1 (how many fields to suggest)")
    prepare_output(workdir, overwrite)
    fields = score_fields(cohort_fields(workdir, class_map, slides, field_um=field_um, uncertainty=uncertainty,
                                        min_tissue_fraction=min_tissue_fraction,
                                        max_annotated_fraction=max_annotated_fraction), rare_bonus)
    chosen = rank_fields(fields, n_regions, min_spacing_um)
    paths = write_suggestions(workdir, chosen, fields, overwrite=True)
    return chosen, fields, paths
