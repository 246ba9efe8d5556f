"""Figures of step 01 (tile export): the tile layout on the slide and sample tiles."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from helpers.config import ClassMap
from helpers.errors import HistoUNetError
from helpers.steps import step_dir
from helpers.tiles import read_label_tile

log = logging.getLogger(__name__)


def plot_tile_overview(workdir: str | Path, manifest: pd.DataFrame, class_map: ClassMap, slide: str | None = None,
                       slides: str | Path | None = None, annotations: str | Path | None = None, slide_mpp: float | None = None,
                       max_size: int = 1200):
    """Figure: slide thumbnail with the annotations (class colours) and the exported tiles (boxes)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from helpers.annotations import find_annotation_file, read_annotations
    from helpers.slides import find_slides, open_slide
    from helpers.viz import legend_handles

    workdir = Path(workdir)
    slide = slide or str(manifest["slide"].iloc[0])
    folder = Path(slides) if slides else step_dir(workdir, "slides")
    paths = [p for p in find_slides(folder) if p.stem == slide] if folder.exists() else []
    if paths:
        with open_slide(paths[0], mpp=slide_mpp) as s:
            thumb, tds = s.thumbnail(max_size)
            size = s.dimensions
    else:  # e.g. tiles exported in QuPath, slide elsewhere: draw the tile layout on blank glass
        log.warning("slide %r not found in %s; the overview shows the tile layout only", slide, folder)
        sub = manifest[manifest["slide"] == slide]
        size = (int((sub["x"] + sub["w"]).max()), int((sub["y"] + sub["h"]).max()))
        tds = max(size) / max_size
        thumb = np.full((max(1, int(size[1] / tds)), max(1, int(size[0] / tds)), 3), 245, np.uint8)
    fig, ax = plt.subplots(figsize=(9, 9 * thumb.shape[0] / thumb.shape[1] + 0.5))
    ax.imshow(thumb)
    geo = find_annotation_file(Path(annotations) if annotations else step_dir(workdir, "annotations"), slide)
    if geo is not None:
        for a in read_annotations(geo, class_map, slide_size=size, allow_empty=True):
            color = np.array(class_map.by_label(a.label).color) / 255
            polys = getattr(a.geometry, "geoms", [a.geometry])
            for p in polys:
                for ring in [p.exterior, *p.interiors]:
                    xy = np.asarray(ring.coords) / tds
                    ax.plot(xy[:, 0], xy[:, 1], color=color, lw=1.5)
    for r in manifest[manifest["slide"] == slide].itertuples():
        ax.add_patch(Rectangle((r.x / tds, r.y / tds), r.w / tds, r.h / tds, fill=False, ec="black", lw=0.6, alpha=0.7))
    n = int((manifest["slide"] == slide).sum())
    ax.set_title(f"{slide}: annotations (class colours) and {n} exported tiles (black boxes)")
    ax.axis("off")
    ax.legend(handles=legend_handles(class_map), loc="lower right", fontsize=8, framealpha=0.8)
    fig.tight_layout()
    return fig


def plot_tile_samples(workdir: str | Path, manifest: pd.DataFrame, class_map: ClassMap, n: int = 8,
                      label_col: str = "label", image_col: str = "image", seed: int = 0):
    """Figure: ``n`` tiles (spread over the manifest) with their label overlay."""
    from helpers.io import read_image
    from helpers.viz import overlay, tile_grid

    workdir = Path(workdir)
    if manifest.empty:
        raise HistoUNetError("no tiles to show")
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(manifest), size=min(n, len(manifest)), replace=False))
    images, titles = [], []
    for i in pick:
        r = manifest.iloc[i]
        img = read_image(workdir / r[image_col])
        lab = read_label_tile(workdir / r[label_col])
        images += [img, overlay(img, lab, class_map, 0.45)]
        short = f"{r['slide']} x={r['x']} y={r['y']}"
        titles += [short, "labels"]
    fig = tile_grid(images, titles, ncols=4, size=2.6, suptitle="tiles and their labels (unlabelled = no colour)")
    from helpers.viz import legend_handles

    fig.legend(handles=legend_handles(class_map), loc="lower center", ncol=len(class_map.names), fontsize=8)
    return fig
