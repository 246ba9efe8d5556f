"""Figures of step 00 (demo data): thumbnail, annotations, dense truth, class crops."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from helpers.config import ClassMap


def slide_thumbnail(slide_path: str | Path, max_size: int = 1024) -> tuple[np.ndarray, float]:
    """RGB thumbnail of a slide and its downsample (level-0 px per thumbnail px)."""
    from helpers.slides import open_slide

    with open_slide(slide_path) as slide:
        return slide.thumbnail(max_size)

def thumbnail_figure(slide_path: str | Path, max_size: int = 1024):
    """Figure: the slide thumbnail with its size and pixel size in the title."""
    import matplotlib.pyplot as plt

    from helpers.slides import open_slide

    with open_slide(slide_path) as slide:
        thumb, _ = slide.thumbnail(max_size)
        w, h = slide.dimensions
        levels, mpp = len(slide.level_downsamples), slide.mpp
    fig, ax = plt.subplots(figsize=(8, 8))
    ax.imshow(thumb)
    ax.set_title(f"{Path(slide_path).name}: {w} x {h} px, {mpp} um/px, {levels} levels")
    ax.axis("off")
    fig.tight_layout()
    return fig

def rasterize_annotations(geojson: str | Path, class_map: ClassMap, shape: tuple[int, int],
                          downsample: float) -> np.ndarray:
    """Label picture (0 = not annotated) of a QuPath GeoJSON at ``downsample``, by :func:`helpers.annotations.rasterize`."""
    from helpers.annotations import rasterize, read_annotations

    anns = read_annotations(geojson, class_map, allow_empty=True)
    return rasterize(anns, x=0, y=0, width=shape[1], height=shape[0], downsample=downsample)

def annotation_figure(slide_path: str | Path, geojson: str | Path, class_map: ClassMap, max_size: int = 1024):
    """Figure: slide thumbnail with the sparse annotations filled and outlined."""
    import cv2

    from helpers.viz import show_overlay

    thumb, ds = slide_thumbnail(slide_path, max_size)
    ann = rasterize_annotations(geojson, class_map, thumb.shape[:2], ds)
    fig = show_overlay(thumb, ann, class_map, title=f"{Path(geojson).name}: sparse annotations", alpha=0.5)
    for label in np.unique(ann[ann > 0]):
        contours, _ = cv2.findContours((ann == label).astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        for c in contours:
            pts = c[:, 0, :]
            fig.axes[0].plot(np.r_[pts[:, 0], pts[:1, 0]], np.r_[pts[:, 1], pts[:1, 1]],
                             color=np.array(class_map.by_label(int(label)).color) / 255, lw=1.0)
    return fig

def truth_figure(slide_path: str | Path, truth_path: str | Path, class_map: ClassMap, max_size: int = 1024):
    """Figure: slide thumbnail with the dense truth overlaid."""
    from helpers.rasters import read_raster
    from helpers.viz import show_overlay

    thumb, ds = slide_thumbnail(slide_path, max_size)
    truth = read_raster(truth_path, downsample=ds)
    truth = truth[:thumb.shape[0], :thumb.shape[1]]
    return show_overlay(thumb, truth, class_map, title=f"{Path(truth_path).name}: dense truth (evaluation only)",
                        alpha=0.4)

def class_crops(slide_path: str | Path, truth_path: str | Path, class_map: ClassMap, size: int = 512,
                seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """One full-resolution crop per class, centred where the truth is that class."""
    from helpers.rasters import read_raster
    from helpers.slides import open_slide

    rng = np.random.default_rng(seed)
    coarse = 16.0
    truth = read_raster(truth_path, downsample=coarse)
    images, titles = [], []
    with open_slide(slide_path) as slide:
        w, h = slide.dimensions
        for c in class_map.classes:
            m = truth == c.label
            if not m.any():
                continue
            # Prefer points deep inside the class so the crop shows its texture.
            import cv2

            d = cv2.distanceTransform(m.astype(np.uint8), cv2.DIST_L2, 3)
            ys, xs = np.nonzero(d >= min(d.max(), size / coarse / 2))
            k = rng.integers(len(xs))
            x = int(np.clip(xs[k] * coarse - size / 2, 0, max(0, w - size)))
            y = int(np.clip(ys[k] * coarse - size / 2, 0, max(0, h - size)))
            images.append(slide.read(x, y, size, size))
            titles.append(f"{c.name} (x={x}, y={y}, {size * (slide.mpp or 0):.0f} um)")
    return images, titles

def crops_figure(slide_path: str | Path, truth_path: str | Path, class_map: ClassMap, size: int = 512):
    """Figure: a full-resolution crop of each class."""
    from helpers.viz import tile_grid

    images, titles = class_crops(slide_path, truth_path, class_map, size)
    return tile_grid(images, titles, ncols=len(images), size=4.5, suptitle="full resolution, one crop per class")
