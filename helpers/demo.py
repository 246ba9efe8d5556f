"""Step 00: make the demo work folder: a synthetic H&E slide, its dense truth and sparse annotations.

The slide model is :mod:`helpers.demo_slide`, the annotation simulation
:mod:`helpers.demo_annotations`, the figures :mod:`helpers.views.demo`.
:func:`helpers.rasters.write_pyramid_tiff` pulls the slide and the truth region by
region, so a 40,000 x 40,000 px slide needs only the coarse layout and a strip of tiles
in memory.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from helpers.config import DEFAULT_CLASS_MAP, ClassMap, load_class_map
from helpers.demo_annotations import make_annotations
from helpers.demo_slide import DemoSlide
from helpers.errors import ParameterError
from helpers.io import check_writable
from helpers.steps import step_dir

log = logging.getLogger(__name__)

#: The demo's tissue kinds, in order, and the class-map role each is (``data/classes.yaml``);
#: kinds without a role are written as the class of that name.
KINDS: dict[str, str | None] = {"glass": "background", "tumour": "headline", "stroma": None, "other": None}
#: Class names of the demo kinds that carry no role.
KIND_NAMES: dict[str, str] = {"stroma": "Stroma", "other": "Other"}

def demo_class_names(class_map: ClassMap) -> dict[str, str]:
    """Class-map name of each demo tissue kind: glass and tumour by their role, the others by name."""
    return {kind: getattr(class_map, role).name if role else KIND_NAMES[kind] for kind, role in KINDS.items()}

class _Prefetch:
    """A ``read_tile`` callable that renders the writer's next regions in worker threads."""

    def __init__(self, render, regions: list[tuple[int, int, int, int]], workers: int = 2, ahead: int = 4):
        from concurrent.futures import ThreadPoolExecutor

        self.render, self.regions = render, regions
        self.pool = ThreadPoolExecutor(max_workers=workers)
        self.futures: dict[tuple[int, int, int, int], object] = {}
        self.next, self.ahead = 0, ahead

    def __call__(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        while self.next < len(self.regions) and len(self.futures) < self.ahead:
            r = self.regions[self.next]
            self.futures[r] = self.pool.submit(self.render, *r)
            self.next += 1
        fut = self.futures.pop((x, y, w, h), None)
        return fut.result() if fut is not None else self.render(x, y, w, h)  # type: ignore[attr-defined]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

def _labels_by_role(class_map: ClassMap) -> dict[str, int]:
    return {kind: class_map.label_of(name) for kind, name in demo_class_names(class_map).items()}

def make_demo(workdir: str | Path, *, name: str = "demo", width: int = 4096, height: int = 4096, mpp: float = 0.5,
              seed: int = 0, class_map: str | Path | ClassMap = DEFAULT_CLASS_MAP, overwrite: bool = False,
              progress: bool = True) -> dict:
    """Make the demo slide, its dense truth and sparse annotations in ``workdir``.

    Args:
        workdir: Work folder; writes ``slides/<name>.tiff`` (pyramidal JPEG TIFF),
            ``truth/<name>.tiff`` (labels raster, downsample 1), ``annotations/<name>.geojson``,
            ``slides/<name>_thumbnail.png`` and ``annotations/<name>_overlay.png``.
        name: Slide name (file stem).
        width, height: Slide size in pixels (>= 512).
        mpp: Microns per pixel at full resolution.
        seed: Same seed, same slide, truth and annotations.
        class_map: Class map (path or loaded); needs the classes of :func:`demo_class_names`.
        overwrite: Replace earlier demo files of this name.
        progress: Show progress bars.

    Returns:
        ``{"slide", "truth", "annotations", "thumbnail", "overlay"}`` paths plus ``"stats"``
        (tissue fraction, annotated fraction of the tissue per class, seconds).
    """
    from helpers.io import write_image
    from helpers.qupath import write_feature_collection
    from helpers.rasters import source_regions, write_pyramid_tiff
    from helpers.views.demo import annotation_figure, slide_thumbnail
    from helpers.viz import save_figure

    t0 = time.perf_counter()
    if width < 512 or height < 512:
        raise ParameterError(f"width and height must be >= 512 px for a useful demo slide; got {width}x{height}")
    if not mpp > 0:
        raise ParameterError(f"mpp must be > 0; got {mpp}")
    cmap = class_map if isinstance(class_map, ClassMap) else load_class_map(class_map)
    labels = _labels_by_role(cmap)
    workdir = Path(workdir)
    out = {
        "slide": step_dir(workdir, "slides") / f"{name}.tiff",
        "truth": step_dir(workdir, "truth") / f"{name}.tiff",
        "annotations": step_dir(workdir, "annotations") / f"{name}.geojson",
        "thumbnail": step_dir(workdir, "slides") / f"{name}_thumbnail.png",
        "overlay": step_dir(workdir, "annotations") / f"{name}_overlay.png",
    }
    for key in ("slide", "truth", "annotations"):
        check_writable(out[key], overwrite)
    model = DemoSlide(width, height, mpp, seed, labels)
    regions = source_regions(width, height, 256)
    fetch = _Prefetch(model.render_rgb, regions)
    try:
        write_pyramid_tiff(out["slide"], fetch, width=width, height=height, kind="rgb", mpp=mpp, quality=90,
                           meta={"demo": True, "seed": seed}, overwrite=overwrite, progress=progress)
    finally:
        fetch.close()
    t_slide = time.perf_counter() - t0
    fetch = _Prefetch(model.render_labels, regions)
    try:
        write_pyramid_tiff(out["truth"], fetch, width=width, height=height, channels=1, kind="labels", mpp=mpp,
                           downsample=1.0, meta={"demo": True, "seed": seed, "class_map": cmap.to_dict()},
                           overwrite=overwrite, progress=progress)
    finally:
        fetch.close()
    features, ann_stats = make_annotations(model, cmap, seed)
    write_feature_collection(features, out["annotations"], overwrite=overwrite)
    thumb, ds = slide_thumbnail(out["slide"])
    write_image(thumb, out["thumbnail"], overwrite=True)
    save_figure(annotation_figure(out["slide"], out["annotations"], cmap), out["overlay"])
    lab = model.coarse_labels()
    stats = {"width": width, "height": height, "mpp": mpp, "seed": seed,
             "tissue_fraction": float((lab != labels["glass"]).mean())}
    for kind, cls in demo_class_names(cmap).items():
        stats[f"truth_fraction_{cls}"] = float((lab == labels[kind]).mean())
    stats.update(ann_stats)
    stats["n_annotations"] = len(features)
    stats["seconds_slide"] = round(t_slide, 2)
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    log.info("demo slide %s: %dx%d px in %.1f s", out["slide"], width, height, stats["seconds"])
    return {**out, "stats": stats}
