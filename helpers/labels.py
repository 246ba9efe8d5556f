"""Semi-ground truth (step 03): refine sparse annotation labels into training labels.

Sparse QuPath annotations are incomplete (most pixels unlabelled) and imprecise
(rough borders, glass inside tissue outlines). :func:`refine_label` applies these
rules to a label tile, each one switchable by a parameter:

1. ``min_region``: specks of a class smaller than this (pixels) become unlabelled and
   small unlabelled holes inside a class region take that class (morphology).
2. ``border_band``: a band this many pixels wide along every annotation border becomes
   unlabelled (0), because annotators' lines are rough; the loss ignores it.
3. ``glass_in_annotations``: glass inside any annotation becomes the background class;
   with ``glass_in_tissue_unlabelled``, glass inside a *tissue* class annotation becomes
   unlabelled instead (pale tumour, gland lumen and fat are not glass to learn).
4. ``free_glass``: clearly empty glass anywhere (glass at least ``free_glass_margin``
   pixels from tissue) becomes the background class: free labels; with
   ``free_glass_min_area``, only glass areas of at least that many pixels (open glass,
   not an enclosed lumen).
Unannotated pixels otherwise stay 0 = unlabelled.

Glass is found by :func:`helpers.tissue.glass_mask`, the one glass rule of every step.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from helpers.config import ClassMap
from helpers.errors import HistoUNetError, ParameterError
from helpers.steps import (DONE, STEP_NOTEBOOKS, fingerprint_of, latest_tile_manifest, record_fingerprint, reuse_or_guard,
                           step_dir, step_manifest)
from helpers.tiles import label_counts, read_label_tile
from helpers.tissue import MIN_BRIGHTNESS, SATURATION_THRESHOLD, drop_small_objects, fill_small_holes, glass_mask

log = logging.getLogger(__name__)


def _disk(radius: int) -> np.ndarray:
    from skimage.morphology import disk

    return disk(max(0, int(radius))).astype(bool)


def refine_label(image: np.ndarray, label: np.ndarray, class_map: ClassMap, *, background_class: str | None = None,
                 min_region: int = 16, border_band: int = 3, glass_in_annotations: bool = True, free_glass: bool = True,
                 free_glass_margin: int = 8, glass_in_tissue_unlabelled: bool = False, free_glass_min_area: int = 0,
                 saturation_threshold: float | str = SATURATION_THRESHOLD,
                 min_brightness: float = MIN_BRIGHTNESS) -> np.ndarray:
    """Apply the refinement rules (module docstring) to one label tile.

    Args:
        image: RGB tile (raw, not stain-normalized) the labels belong to.
        label: uint8 label tile (0 unlabelled, 1..N classes).
        class_map: Classes.
        background_class: Class given to glass; None = the map's background role.
        min_region: Specks/holes smaller than this many pixels are cleaned; 0 = off.
        border_band: Half-width in pixels of the unlabelled band along annotation borders; 0 = off.
        glass_in_annotations: Glass inside annotations becomes ``background_class``.
        free_glass: Clearly empty glass outside annotations becomes ``background_class``.
        free_glass_margin: Minimum distance (pixels) from tissue for "clearly empty" glass.
        glass_in_tissue_unlabelled: Glass inside tissue-class annotations becomes unlabelled, not background.
        free_glass_min_area: Free glass only in glass areas of at least this many pixels; 0 = any.
        saturation_threshold, min_brightness: Passed to :func:`helpers.tissue.glass_mask`.

    Returns:
        The refined uint8 label tile.
    """
    from scipy import ndimage as ndi

    if image.shape[:2] != label.shape[:2]:
        raise ParameterError(f"image {image.shape[:2]} and label {label.shape[:2]} tiles differ in size")
    bg = class_map.background.label if background_class is None else class_map.label_of(background_class)
    out = label.astype(np.uint8).copy()
    if min_region > 0:
        for c in class_map.labels:
            mask = out == c
            if not mask.any():
                continue
            kept = drop_small_objects(mask, min_region)
            out[mask & ~kept] = 0
            filled = fill_small_holes(kept, min_region)
            out[filled & (out == 0)] = c
    annotated = out > 0
    if border_band > 0:
        fp = _disk(border_band)
        hi = ndi.grey_dilation(out, footprint=fp, mode="nearest")
        lo = ndi.grey_erosion(out, footprint=fp, mode="nearest")
        out[(hi != out) | (lo != out)] = 0
    if glass_in_annotations or free_glass:
        glass = glass_mask(image, saturation_threshold, min_brightness)
        if glass_in_annotations:
            if glass_in_tissue_unlabelled:
                out[glass & annotated & (label != bg)] = 0
                out[glass & (label == bg)] = bg
            else:
                out[glass & annotated] = bg
        if free_glass:
            clear = ndi.binary_erosion(glass, structure=_disk(free_glass_margin), border_value=1) if free_glass_margin > 0 else glass
            if free_glass_min_area > 0:
                clear &= drop_small_objects(glass, free_glass_min_area)
            if glass_in_tissue_unlabelled:
                clear &= ~(annotated & (label != bg))
            out[clear & (out == 0)] = bg
    return out


def _input_manifest(workdir: Path, input_step: str) -> tuple[pd.DataFrame, str]:
    from helpers.io import read_manifest

    if input_step not in ("auto", "tiles", "stain"):
        raise ParameterError(f"input_step={input_step!r}: use 'auto', 'tiles' or 'stain'")
    if input_step == "auto":
        path, step = latest_tile_manifest(workdir, ("stain", "tiles"))
    else:
        path, step = step_manifest(workdir, input_step), input_step
    return read_manifest(path, f"notebook {STEP_NOTEBOOKS[step]}"), step


def refine_tiles(workdir: str | Path, class_map: ClassMap, input_step: str = "auto", overwrite: bool = False,
                 densify: str | None = None, densify_confidence: float = 0.8, densify_per_class: int = 20_000,
                 densify_region: str | None = None, **rules) -> pd.DataFrame:
    """Refine every label tile of the input manifest; write ``labels/`` (tiles, stats.csv, manifest.csv).

    Args:
        workdir: Work folder.
        class_map: Classes.
        input_step: ``"auto"`` (``stain/`` if it has a manifest, else ``tiles/``), ``"tiles"`` or ``"stain"``.
        overwrite: Replace an earlier ``labels/`` folder.
        densify: None (off) or ``"forest"``: after the rules, a pixel classifier fitted to the
            refined labels labels the unlabelled pixels it is confident about
            (:mod:`helpers.densify`; its figures go to ``labels/densify.json``).
        densify_confidence: Forest probability a pixel needs to be labelled.
        densify_per_class: Labelled pixels per class the forest is fitted to (at most).
        densify_region: Optional JSON file ``{slide: [x0, y0, x1, y1]}`` (level-0 px): only pixels
            inside their slide's box are densified (the real-data benchmark keeps its held-out
            half out of training this way).
        **rules: Keyword options of :func:`refine_label`.

    Returns:
        The new manifest: input rows with ``label`` = refined tile, ``label_raw`` = the
        original, ``px_*`` recounted.
    """
    from tqdm.auto import tqdm

    from helpers.io import atomic_dir, read_image, write_image, write_manifest

    workdir = Path(workdir)
    manifest, source = _input_manifest(workdir, input_step)
    out_dir = step_dir(workdir, "labels")
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(refine_label).parameters.items()
                if p.kind is p.KEYWORD_ONLY}  # the rules as applied, defaults included
    from helpers.densify import check_method

    check_method(densify)
    if densify and not 0.0 < densify_confidence <= 1.0:  # checked before any work, not after the rules
        raise ParameterError(f"densify_confidence must be in (0, 1]; got {densify_confidence}")
    dense = dict(densify=densify, densify_confidence=densify_confidence, densify_per_class=densify_per_class,
                 densify_region=densify_region) if densify else {}
    boxes = None
    if densify and densify_region:
        from helpers.consistency import read_region

        boxes = read_region(densify_region, "densify_region")
    fingerprint = fingerprint_of(dict(classes=class_map.names, input_step=source, **{**defaults, **rules}, **dense),
                                 [step_dir(workdir, source) / DONE])
    if reuse_or_guard(out_dir, fingerprint, overwrite, "label refinement", guard=False):
        return pd.read_csv(out_dir / DONE)
    if manifest.empty:
        raise HistoUNetError(f"{workdir}/{source}/manifest.csv lists no tiles; re-run notebook 01 with a lower min_labelled_fraction")
    image_col = "image_raw" if "image_raw" in manifest.columns else "image"
    before = manifest.copy()
    rows = []
    shapes: list[tuple[int, int]] = []  # each refined tile's (h, w), for densify
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        record_fingerprint(tmp, fingerprint)
        for r in tqdm(manifest.to_dict("records"), desc="refine labels", unit="tile"):
            image = read_image(workdir / r[image_col])
            raw = read_label_tile(workdir / r["label"])
            refined = refine_label(image, raw, class_map, **rules)
            rel = f"labels/tiles/{r['tile_id']}-labelled.png"
            write_image(refined, tmp / "tiles" / f"{r['tile_id']}-labelled.png")
            new = dict(r)
            new["label_raw"] = r["label"]
            new["label"] = rel
            new.update(label_counts(refined, class_map))
            rows.append(new)
            shapes.append(refined.shape[:2])
        if densify:
            from helpers.io import write_json

            info = _densify_tiles(workdir, tmp, rows, shapes, image_col, class_map, densify_confidence,
                                  densify_per_class, boxes, densify)
            write_json(info, tmp / "densify.json")
        out = pd.DataFrame(rows)
        write_manifest(label_stats(before, out, class_map), tmp / "stats.csv")
        write_manifest(out, tmp / "manifest.csv")
    log.info("refined %d label tiles from %s/", len(out), source)
    return out


def _densify_tiles(workdir: Path, tmp: Path, rows: list[dict], shapes: list[tuple[int, int]], image_col: str,
                   class_map: ClassMap, confidence: float, per_class: int,
                   boxes: dict[str, list[float]] | None = None, method: str = "forest") -> dict:
    """Densify the refined tiles in ``tmp`` in place (per slide canvas); updates ``rows``' counts."""
    from helpers.consistency import region_mask
    from helpers.densify import densify as run_densify
    from helpers.densify import tile_canvases
    from helpers.io import read_image, write_image

    def tile_path(i: int) -> Path:
        return tmp / "tiles" / f"{rows[i]['tile_id']}-labelled.png"

    canvases = tile_canvases(rows, shapes)

    def load(key: str):
        c = canvases[key]
        img = np.zeros((*c["shape"], 3), np.uint8)
        lab = np.zeros(c["shape"], np.uint8)
        cov = np.zeros(c["shape"], bool)
        for i, (y, x) in c["tiles"].items():
            h, w = shapes[i]
            img[y:y + h, x:x + w] = read_image(workdir / rows[i][image_col])[..., :3]
            t = read_label_tile(tile_path(i))
            view = lab[y:y + h, x:x + w]
            view[view == 0] = t[view == 0]
            cov[y:y + h, x:x + w] |= region_mask(rows[i], (h, w), boxes)
        c["labels"] = lab
        return img, lab, cov, float(rows[next(iter(c["tiles"]))].get("mpp") or 1.0)

    def save(key: str, new: np.ndarray) -> None:
        c = canvases.pop(key)
        added = (c["labels"] == 0) & (new > 0)
        for i, (y, x) in c["tiles"].items():
            h, w = shapes[i]
            t = read_label_tile(tile_path(i))
            take = (t == 0) & added[y:y + h, x:x + w]
            if take.any():
                t[take] = new[y:y + h, x:x + w][take]
                write_image(t, tile_path(i), overwrite=True)
                rows[i].update(label_counts(t, class_map))

    from helpers.densify import SIGMAS_UM
    from helpers.teacher import TEACHER_FILE, save_teacher

    mpp = float(rows[0].get("mpp") or 1.0)  # the tiles' um/px (03 refuses an empty manifest)
    info = run_densify(list(canvases), load, save, confidence=confidence, per_class=per_class, progress=True,
                       keep_model=lambda m: save_teacher(m, tmp / TEACHER_FILE, mpp=mpp, sigmas_um=SIGMAS_UM,
                                                         method=method), method=method)
    info["method"] = method
    info["added_by_class"] = {class_map.names[c - 1]: n for c, n in info["added_by_class"].items()}
    info["classes"] = [class_map.names[c - 1] for c in info["classes"]]
    log.info("densify: %d px labelled by the forest (%s), fitted to %d px", info["added_px"], info["added_by_class"],
             info["training_px"])
    return info


def label_stats(before: pd.DataFrame, after: pd.DataFrame, class_map: ClassMap) -> pd.DataFrame:
    """Per class (and unlabelled): pixels and tiles containing it, before and after refinement."""
    rows = []
    for name, col in [("unlabelled", "px_unlabelled")] + [(n, f"px_{n}") for n in class_map.names]:
        rows.append({"class": name, "pixels_before": int(before[col].sum()), "pixels_after": int(after[col].sum()),
                     "tiles_before": int((before[col] > 0).sum()), "tiles_after": int((after[col] > 0).sum())})
    df = pd.DataFrame(rows)
    total = max(1, int(df["pixels_before"].sum()))
    df["fraction_before"] = df["pixels_before"] / total
    df["fraction_after"] = df["pixels_after"] / total
    return df


def truth_tile(workdir: str | Path, row: dict | pd.Series, shape: tuple[int, int]) -> np.ndarray | None:
    """Dense truth labels under a tile (``truth/<slide>.tiff``), or None if there is none."""
    import cv2

    path = step_dir(Path(workdir), "truth") / f"{row['slide']}.tiff"
    if not path.is_file():
        return None
    from helpers.rasters import read_raster

    t = read_raster(path, float(row["downsample"]), region=(int(row["x"]), int(row["y"]), int(row["w"]), int(row["h"])))
    t = np.asarray(t)
    if t.ndim == 3:
        t = t[..., 0]
    if t.shape[:2] != tuple(shape):
        t = cv2.resize(t.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return t.astype(np.uint8)


def disagreement_with_truth(workdir: str | Path, manifest: pd.DataFrame, label_col: str = "label") -> dict:
    """Fraction of labelled pixels whose label differs from the dense truth (demo only).

    Returns:
        ``{"labelled_pixels", "wrong_pixels", "wrong_fraction", "tiles"}``; NaN fraction
        when no tile has a truth raster.
    """
    workdir = Path(workdir)
    labelled = wrong = tiles = 0
    for r in manifest.to_dict("records"):
        lab = read_label_tile(workdir / r[label_col])
        t = truth_tile(workdir, r, lab.shape[:2])
        if t is None:
            continue
        m = lab > 0
        labelled += int(m.sum())
        wrong += int((lab[m] != t[m]).sum())
        tiles += 1
    return {"labelled_pixels": labelled, "wrong_pixels": wrong,
            "wrong_fraction": wrong / labelled if labelled else float("nan"), "tiles": tiles}
