"""Figures and the interactive viewer of 07 (whole-slide prediction and its export).

Everything reads a prediction folder (``workdir/predictions/<slide>/``) written by
:func:`helpers.predict.predict_slide` and :func:`helpers.export.export_prediction`; the
figures are built from the rasters' pyramids, so they cost the same memory for any slide.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from helpers.config import ClassMap
from helpers.errors import ParameterError
from helpers.io import read_json
from helpers.model import background_index, check_class_map, class_map_from_params, headline_index
from helpers.predict import probabilities_path, read_prediction_info


def before_after_figure(image: np.ndarray | None, before: np.ndarray, after: np.ndarray, class_map,
                        titles: tuple[str, str] = ("raw argmax", "post-processed"), max_size: int = 1024):
    """Figure: before | after label overlays (on ``image`` when given), with changed pixels counted."""
    import cv2
    import matplotlib.pyplot as plt

    from helpers.viz import colorize, legend_handles, overlay

    h, w = before.shape
    s = min(1.0, max_size / max(h, w))
    size = (max(1, int(w * s)), max(1, int(h * s)))
    b = cv2.resize(before, size, interpolation=cv2.INTER_NEAREST)
    a = cv2.resize(after, size, interpolation=cv2.INTER_NEAREST)
    if image is not None:
        img = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        pics = [overlay(img, b, class_map), overlay(img, a, class_map)]
    else:
        pics = [colorize(b, class_map), colorize(a, class_map)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 6 * size[1] / size[0] + 0.8))
    n = int((before != after).sum())
    for ax, pic, t in zip(axes, pics, titles):
        ax.imshow(pic)
        ax.set_title(t)
        ax.axis("off")
    axes[1].legend(handles=legend_handles(class_map), loc="lower right", fontsize=8, framealpha=0.8)
    fig.suptitle(f"post-processing changed {n} px ({100 * n / before.size:.2f} %)")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- viewer


def _png(img: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2BGR))
    return buf.tobytes()


def heatmap(prob: np.ndarray, image: np.ndarray, alpha: float) -> np.ndarray:
    """Blend a 0-1 probability map (matplotlib 'inferno') over an RGB image."""
    import matplotlib

    color = (matplotlib.colormaps["inferno"](np.clip(prob, 0, 1))[..., :3] * 255).astype(np.float32)
    out = image.astype(np.float32) * (1 - alpha) + color * alpha
    return out.round().astype(np.uint8)


def prediction_viewer(pred_dir: str | Path, class_map: ClassMap | str | Path | None = None, max_size: int = 1024,
                      zoom_size: int = 384):
    """An ipywidgets viewer of one slide's prediction (call only when a person looks).

    Left: the slide thumbnail with the class overlay (opacity slider, class toggles,
    raw argmax vs post-processed) or the tumour-probability heat map. Right: a zoom at
    model resolution around the point chosen with the x/y sliders.

    Returns:
        An ``ipywidgets.VBox``.
    """
    import ipywidgets as w

    from helpers.rasters import read_raster
    from helpers.slides import open_slide
    from helpers.viz import overlay

    pred_dir = Path(pred_dir)
    info = read_prediction_info(pred_dir)
    cmap = check_class_map(class_map_from_params(info["classes"], str(pred_dir)), class_map)
    slide = open_slide(info["slide_path"], mpp=info["slide_mpp"])
    thumb, tds = slide.thumbnail(max_size)
    ds = float(info["downsample"])
    has_labels = (pred_dir / "labels.tiff").is_file()
    post_small = np.asarray(read_raster(pred_dir / "labels.tiff", downsample=tds)) if has_labels else None
    probs_small = np.asarray(read_raster(probabilities_path(pred_dir), downsample=tds))
    probs_small = probs_small.astype(np.float32) / 255.0
    raw_small = (np.argmax(probs_small, -1) + 1).astype(np.uint8)
    head = headline_index(cmap)
    tumour = 0 if head is None else head
    bg = background_index(cmap)

    def fit(a: np.ndarray) -> np.ndarray:
        import cv2

        if a.shape[:2] == thumb.shape[:2]:
            return a
        interp = cv2.INTER_NEAREST if a.dtype == np.uint8 and a.ndim == 2 else cv2.INTER_LINEAR
        return cv2.resize(a, (thumb.shape[1], thumb.shape[0]), interpolation=interp)

    modes = (["post-processed classes"] if has_labels else []) + ["raw argmax classes", f"{cmap.names[tumour]} probability"]
    mode = w.Dropdown(options=modes, description="show")
    opacity = w.FloatSlider(value=0.45, min=0, max=1, step=0.05, description="opacity")
    toggles = [w.Checkbox(value=i != bg, description=c.name, indent=False) for i, c in enumerate(cmap.classes)]
    zx = w.FloatSlider(value=0.5, min=0, max=1, step=0.01, description="zoom x")
    zy = w.FloatSlider(value=0.5, min=0, max=1, step=0.01, description="zoom y")
    # the overview shrinks with the window; the zoom keeps its size and aspect, beside it or wrapped below
    left = w.Image(format="png", layout=w.Layout(flex="1 1 420px", max_width=f"{thumb.shape[1]}px", width="100%",
                                                  height="auto", object_fit="contain"))
    right = w.Image(format="png", layout=w.Layout(flex="0 0 auto", width=f"{min(zoom_size, info['width'])}px",
                                                   height="auto", object_fit="contain"))
    label = w.HTML()

    def render(*_: Any) -> None:
        hidden = [c.label for c, t in zip(cmap.classes, toggles) if not t.value]
        if mode.value.endswith("probability"):
            pic = heatmap(fit(probs_small[..., tumour]), thumb, opacity.value)
        else:
            lab = post_small if mode.value.startswith("post") else raw_small
            pic = overlay(thumb, fit(lab), cmap, alpha=opacity.value, hidden=hidden)
        left.value = _png(pic)
        # zoom at model resolution
        cx, cy = zx.value * info["width"], zy.value * info["height"]
        x0 = int(np.clip(cx - zoom_size / 2, 0, max(0, info["width"] - zoom_size)))
        y0 = int(np.clip(cy - zoom_size / 2, 0, max(0, info["height"] - zoom_size)))
        zw, zh = min(zoom_size, info["width"]), min(zoom_size, info["height"])
        img = slide.read(round(x0 * ds), round(y0 * ds), zw, zh, ds)
        region = (x0 * ds, y0 * ds, zw * ds, zh * ds)
        if mode.value.endswith("probability"):
            p = np.asarray(read_raster(probabilities_path(pred_dir), downsample=ds, region=region))[..., tumour] / 255.0
            zpic = heatmap(p[:zh, :zw], img, opacity.value)
        else:
            if mode.value.startswith("post"):
                lab = np.asarray(read_raster(pred_dir / "labels.tiff", downsample=ds, region=region))
            else:
                p = np.asarray(read_raster(probabilities_path(pred_dir), downsample=ds, region=region))
                lab = (np.argmax(p, -1) + 1).astype(np.uint8)
            zpic = overlay(img, lab[:zh, :zw], cmap, alpha=opacity.value, hidden=hidden)
        right.value = _png(zpic)
        label.value = (f"<b>{info['slide']}</b>: zoom at model resolution ({info['mpp']} um/px), "
                       f"x={x0}..{x0 + zw}, y={y0}..{y0 + zh} model px")

    for wid in [mode, opacity, zx, zy, *toggles]:
        wid.observe(render, names="value")
    render()
    pics = w.HBox([left, right], layout=w.Layout(flex_flow="row wrap", align_items="flex-start", width="100%"))
    return w.VBox([w.HBox([mode, opacity]), w.HBox(toggles), w.HBox([zx, zy]), label, pics])


# --------------------------------------------------------------------------- figures


def _thumb_and(pred_dir: Path, max_size: int) -> tuple[dict, np.ndarray, float]:
    from helpers.slides import open_slide

    info = read_prediction_info(pred_dir)
    with open_slide(info["slide_path"], mpp=info["slide_mpp"]) as slide:
        thumb, tds = slide.thumbnail(max_size)
    return info, thumb, tds


def probability_figure(pred_dir: str | Path, class_name: str | None = None, max_size: int = 1024):
    """Figure: slide thumbnail | probability heat map of one class (0-1).

    Args:
        pred_dir: A prediction folder.
        class_name: The class to show; None: the class map's headline class (e.g. tumour),
            else its last class.
        max_size: Longer side of the thumbnail.
    """
    import cv2
    import matplotlib.pyplot as plt

    from helpers.rasters import read_raster

    pred_dir = Path(pred_dir)
    info, thumb, tds = _thumb_and(pred_dir, max_size)
    names = [c["name"] for c in info["classes"]]
    if class_name is None:
        cmap = class_map_from_params(info["classes"], str(pred_dir / "prediction.json"))
        head = headline_index(cmap)
        class_name = names[-1 if head is None else head]
    if class_name not in names:
        raise ParameterError(f"class_name {class_name!r} is not one of the model's classes {names}")
    p = np.asarray(read_raster(probabilities_path(pred_dir), downsample=tds))[..., names.index(class_name)] / 255.0
    p = cv2.resize(p.astype(np.float32), (thumb.shape[1], thumb.shape[0]), interpolation=cv2.INTER_LINEAR)
    fig, axes = plt.subplots(1, 2, figsize=(12, 6 * thumb.shape[0] / thumb.shape[1] + 0.8))
    axes[0].imshow(thumb)
    axes[0].set_title(info["slide"])
    im = axes[1].imshow(p, cmap="inferno", vmin=0, vmax=1)
    axes[1].set_title(f"{class_name} probability ({info['tiles_tissue']} tiles, overlap {info['overlap']}, "
                      f"{info['blend']})")
    for ax in axes:
        ax.axis("off")
    fig.colorbar(im, ax=axes[1], fraction=0.035)
    fig.tight_layout()
    return fig


def postprocess_figure(pred_dir: str | Path, max_size: int = 1024):
    """Figure: raw argmax vs post-processed labels (``labels.tiff``) over the thumbnail.

    Both are computed at (at most) twice the thumbnail's resolution, from the rasters'
    pyramids, so the figure costs the same memory for any slide size; the changed-pixel
    share in the title is measured at that resolution.
    """
    from helpers import postprocess as pp
    from helpers.rasters import read_raster

    pred_dir = Path(pred_dir)
    info, thumb, tds = _thumb_and(pred_dir, max_size)
    cmap = class_map_from_params(info["classes"], str(pred_dir))
    d = max(float(info["downsample"]), tds / 2)
    raw = pp.argmax_labels(np.asarray(read_raster(probabilities_path(pred_dir), downsample=d)))
    post = np.asarray(read_raster(pred_dir / "labels.tiff", downsample=d))
    return before_after_figure(thumb, raw, post, cmap, max_size=max_size)


def geojson_figure(pred_dir: str | Path, max_size: int = 1024):
    """Figure: the exported GeoJSON outlines (holes dashed) drawn over the slide thumbnail."""
    import matplotlib.pyplot as plt
    from shapely.geometry import shape

    from helpers.viz import legend_handles

    pred_dir = Path(pred_dir)
    info, thumb, tds = _thumb_and(pred_dir, max_size)
    cmap = class_map_from_params(info["classes"], str(pred_dir))
    fc = read_json(pred_dir / f"{info['slide']}.geojson")
    fig, ax = plt.subplots(figsize=(9, 9 * thumb.shape[0] / thumb.shape[1] + 0.5))
    ax.imshow(thumb)
    n_holes = 0
    for f in fc["features"]:
        geom = shape(f["geometry"])
        color = np.array(f["properties"]["classification"]["color"]) / 255
        for poly in getattr(geom, "geoms", [geom]):
            x, y = np.asarray(poly.exterior.coords).T / tds
            ax.plot(x, y, color=color, lw=1.2)
            for ring in poly.interiors:
                x, y = np.asarray(ring.coords).T / tds
                ax.plot(x, y, color=color, lw=1.0, ls="--")
                n_holes += 1
    ax.set_title(f"{info['slide']}.geojson: {len(fc['features'])} regions, {n_holes} holes (dashed)")
    ax.axis("off")
    drawn = {f["properties"]["classification"]["name"] for f in fc["features"]}
    ax.legend(handles=legend_handles(cmap, hidden=[c.label for c in cmap.classes if c.name not in drawn]),
              loc="lower right", fontsize=8, framealpha=0.8)
    fig.tight_layout()
    return fig
