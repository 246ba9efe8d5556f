"""Semi-ground truth (step 03): refine sparse annotation labels into training labels.

Sparse QuPath annotations are incomplete (most pixels unlabelled) and imprecise
(rough borders, glass inside tissue outlines). :func:`refine_label` applies these
rules to a label tile, each one switchable by a parameter:

1. ``min_region``: specks of a class smaller than this (pixels) become unlabelled and
   small unlabelled holes inside a class region take that class (morphology).
2. ``border_band``: a band this many pixels wide along every annotation border becomes
   unlabelled (0), because annotators' lines are rough; the loss ignores it.
3. ``glass_in_annotations``: glass inside any annotation becomes Background.
4. ``free_glass``: clearly empty glass anywhere (glass at least ``free_glass_margin``
   pixels from tissue) becomes Background: free labels.
Unannotated pixels otherwise stay 0 = unlabelled.

Glass is found by :func:`glass_mask`: bright, unsaturated pixels (HSV saturation
below a threshold, fixed or Otsu's, and value above ``min_brightness``), cleaned by
morphology so single pale pixels inside tissue do not count.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from helpers.config import ClassMap
from helpers.steps import step_dir
from helpers.errors import HistoUNetError, ParameterError

log = logging.getLogger(__name__)


def glass_mask(image: np.ndarray, saturation_threshold: float | str = 0.08, min_brightness: float = 0.78,
               min_area: int = 64) -> np.ndarray:
    """Boolean mask of glass (no tissue) in an RGB tile.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        saturation_threshold: HSV saturation (0..1) below which a bright pixel is glass,
            or ``"otsu"`` for Otsu's threshold of the tile (clipped to 0.04..0.15).
        min_brightness: HSV value (0..1) above which a pixel can be glass.
        min_area: Glass regions smaller than this (pixels) count as tissue, and tissue
            specks smaller than this as glass.
    """
    import cv2
    hsv = cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2HSV)
    sat = hsv[..., 1].astype(np.float32) / 255.0
    val = hsv[..., 2].astype(np.float32) / 255.0
    if saturation_threshold == "otsu":
        from skimage.filters import threshold_otsu

        thr = float(np.clip(threshold_otsu(sat), 0.04, 0.15)) if np.ptp(sat) > 0 else 0.08
    else:
        thr = float(saturation_threshold)
    glass = (sat < thr) & (val > min_brightness)
    glass = cv2.morphologyEx(glass.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)).astype(bool)
    if min_area > 0:
        glass = _fill_small(_drop_small(glass, min_area), min_area)
    return glass


def _drop_small(mask: np.ndarray, size: int) -> np.ndarray:
    """``mask`` without connected objects smaller than ``size`` pixels."""
    from skimage.morphology import remove_small_objects

    return remove_small_objects(mask, max_size=size - 1) if size > 1 else mask


def _fill_small(mask: np.ndarray, size: int) -> np.ndarray:
    """``mask`` with holes smaller than ``size`` pixels filled."""
    from skimage.morphology import remove_small_holes

    return remove_small_holes(mask, max_size=size - 1) if size > 1 else mask


def _disk(radius: int) -> np.ndarray:
    from skimage.morphology import disk

    return disk(max(0, int(radius))).astype(bool)


def refine_label(image: np.ndarray, label: np.ndarray, class_map: ClassMap, *, background_class: str = "Background",
                 min_region: int = 16, border_band: int = 3, glass_in_annotations: bool = True, free_glass: bool = True,
                 free_glass_margin: int = 8, saturation_threshold: float | str = 0.08,
                 min_brightness: float = 0.78) -> np.ndarray:
    """Apply the refinement rules (module docstring) to one label tile.

    Args:
        image: RGB tile (raw, not stain-normalized) the labels belong to.
        label: uint8 label tile (0 unlabelled, 1..N classes).
        class_map: Classes.
        background_class: Class given to glass.
        min_region: Specks/holes smaller than this many pixels are cleaned; 0 = off.
        border_band: Half-width in pixels of the unlabelled band along annotation borders; 0 = off.
        glass_in_annotations: Glass inside annotations becomes ``background_class``.
        free_glass: Clearly empty glass outside annotations becomes ``background_class``.
        free_glass_margin: Minimum distance (pixels) from tissue for "clearly empty" glass.
        saturation_threshold, min_brightness: Passed to :func:`glass_mask`.

    Returns:
        The refined uint8 label tile.
    """
    from scipy import ndimage as ndi

    if image.shape[:2] != label.shape[:2]:
        raise ParameterError(f"image {image.shape[:2]} and label {label.shape[:2]} tiles differ in size")
    bg = class_map.label_of(background_class)
    out = label.astype(np.uint8).copy()
    if min_region > 0:
        for c in class_map.labels:
            mask = out == c
            if not mask.any():
                continue
            kept = _drop_small(mask, min_region)
            out[mask & ~kept] = 0
            filled = _fill_small(kept, min_region)
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
            out[glass & annotated] = bg
        if free_glass:
            clear = ndi.binary_erosion(glass, structure=_disk(free_glass_margin), border_value=1) if free_glass_margin > 0 else glass
            out[clear & (out == 0)] = bg
    return out


def _input_manifest(workdir: Path, input_step: str) -> tuple[pd.DataFrame, str]:
    from helpers.io import read_manifest

    if input_step not in ("auto", "tiles", "stain"):
        raise ParameterError(f"input_step={input_step!r}: use 'auto', 'tiles' or 'stain'")
    stain = step_dir(workdir, "stain") / "manifest.csv"
    if input_step == "stain" or (input_step == "auto" and stain.is_file()):
        return read_manifest(stain, "notebook 02_normalize_stain"), "stain"
    return read_manifest(step_dir(workdir, "tiles") / "manifest.csv", "notebook 01_export_tiles"), "tiles"


def refine_tiles(workdir: str | Path, class_map: ClassMap, input_step: str = "auto", overwrite: bool = False,
                 **rules) -> pd.DataFrame:
    """Refine every label tile of the input manifest; write ``labels/`` (tiles, stats.csv, manifest.csv).

    Args:
        workdir: Work folder.
        class_map: Classes.
        input_step: ``"auto"`` (``stain/`` if it has a manifest, else ``tiles/``), ``"tiles"`` or ``"stain"``.
        overwrite: Replace an earlier ``labels/`` folder.
        **rules: Keyword options of :func:`refine_label`.

    Returns:
        The new manifest: input rows with ``label`` = refined tile, ``label_raw`` = the
        original, ``px_*`` recounted.
    """
    from tqdm.auto import tqdm

    from helpers.io import atomic_dir, read_image, write_image, write_manifest
    from helpers.tiles import label_counts, read_label_tile

    workdir = Path(workdir)
    manifest, source = _input_manifest(workdir, input_step)
    if manifest.empty:
        raise HistoUNetError(f"{workdir}/{source}/manifest.csv lists no tiles; re-run notebook 01 with a lower min_labelled_fraction")
    image_col = "image_raw" if "image_raw" in manifest.columns else "image"
    before = manifest.copy()
    rows = []
    with atomic_dir(step_dir(workdir, "labels"), overwrite=overwrite) as tmp:
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
        out = pd.DataFrame(rows)
        write_manifest(label_stats(before, out, class_map), tmp / "stats.csv")
        write_manifest(out, tmp / "manifest.csv")
    log.info("refined %d label tiles from %s/", len(out), source)
    return out


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


def plot_label_stats(stats: pd.DataFrame, class_map: ClassMap):
    """Figure: pixels and tiles per class before/after refinement (bars in class colours)."""
    import matplotlib.pyplot as plt

    colors = [(0.2, 0.2, 0.2)] + [np.array(c.color) / 255 for c in class_map.classes]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    x = np.arange(len(stats))
    for ax, what, unit in [(axes[0], "pixels", "pixels (millions)"), (axes[1], "tiles", "tiles containing the class")]:
        scale = 1e6 if what == "pixels" else 1
        ax.bar(x - 0.2, stats[f"{what}_before"] / scale, 0.4, color=colors, alpha=0.45, edgecolor="black", label="before")
        ax.bar(x + 0.2, stats[f"{what}_after"] / scale, 0.4, color=colors, edgecolor="black", hatch="//", label="after")
        ax.set_xticks(x, stats["class"], rotation=0)
        ax.set_ylabel(unit)
        ax.set_title(f"{what} per class: before (pale) vs after (hatched)")
    fig.tight_layout()
    return fig


def plot_before_after(workdir: str | Path, manifest: pd.DataFrame, class_map: ClassMap, n: int = 4, seed: int = 0,
                      truth: bool = True):
    """Figure: for ``n`` tiles, the image, raw labels, refined labels (and the dense truth if the demo has it)."""
    import matplotlib.pyplot as plt

    from helpers.io import read_image
    from helpers.tiles import read_label_tile
    from helpers.viz import legend_handles, overlay

    workdir = Path(workdir)
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(manifest), size=min(n, len(manifest)), replace=False))
    image_col = "image_raw" if "image_raw" in manifest.columns else "image"
    show_truth = truth and (step_dir(workdir, "truth")).is_dir()
    ncols = 4 if show_truth else 3
    fig, axes = plt.subplots(len(pick), ncols, figsize=(3 * ncols, 3 * len(pick)), squeeze=False)
    for row, i in zip(axes, pick):
        r = manifest.iloc[i]
        img = read_image(workdir / r[image_col])
        panels = [(img, f"{r['slide']} x={r['x']} y={r['y']}"),
                  (overlay(img, read_label_tile(workdir / r["label_raw"]), class_map, 0.5), "annotations (before)"),
                  (overlay(img, read_label_tile(workdir / r["label"]), class_map, 0.5), "refined (after)")]
        if show_truth:
            t = truth_tile(workdir, r, img.shape[:2])
            panels.append((overlay(img, t, class_map, 0.5) if t is not None else img, "dense truth" if t is not None else "no truth"))
        for ax, (pic, title) in zip(row, panels):
            ax.imshow(pic)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.legend(handles=legend_handles(class_map), loc="lower center", ncol=class_map.n_classes, fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


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
    from helpers.tiles import read_label_tile

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


def label_viewer(workdir: str | Path, manifest: pd.DataFrame, class_map: ClassMap):
    """ipywidgets viewer: tile slider, before/after/truth, class toggles, overlay opacity.

    Building it needs no display; show it only when ``helpers.nb.interactive()``.
    """
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    from helpers.io import read_image
    from helpers.nb import show_figure
    from helpers.tiles import read_label_tile
    from helpers.viz import overlay

    workdir = Path(workdir)
    image_col = "image_raw" if "image_raw" in manifest.columns else "image"
    views = ["after", "before"] if "label_raw" in manifest.columns else ["labels"]
    if (step_dir(workdir, "truth")).is_dir():
        views.append("truth")
    tile = widgets.IntSlider(0, 0, max(0, len(manifest) - 1), description="tile")
    view = widgets.ToggleButtons(options=views, description="labels")
    alpha = widgets.FloatSlider(value=0.45, min=0, max=1, step=0.05, description="opacity")
    toggles = {c.label: widgets.Checkbox(value=True, description=c.name, indent=False) for c in class_map.classes}
    out = widgets.Output()

    def draw(*_):
        r = manifest.iloc[tile.value]
        img = read_image(workdir / r[image_col])
        if view.value == "truth":
            lab = truth_tile(workdir, r, img.shape[:2])
            lab = np.zeros(img.shape[:2], np.uint8) if lab is None else lab
        else:
            lab = read_label_tile(workdir / r["label_raw" if view.value == "before" else "label"])
        hidden = [k for k, w in toggles.items() if not w.value]
        fig, ax = plt.subplots(figsize=(6, 6))
        ax.imshow(overlay(img, lab, class_map, alpha.value, hidden=hidden))
        ax.set_title(str(r["tile_id"]), fontsize=8)
        ax.axis("off")
        show_figure(out, fig)  # not `with out:` (hangs nbclient, issue 18)
        plt.close(fig)

    for w in [tile, view, alpha, *toggles.values()]:
        w.observe(draw, names="value")
    box = widgets.VBox([widgets.HBox([tile, alpha]), view, widgets.HBox(list(toggles.values())), out])
    box.redraw = draw  # type: ignore[attr-defined]
    return box
