"""Pictures shared by the notebooks: label overlays, legends, tile grids.

Every plotting function returns a matplotlib ``Figure`` (the notebook shows it and
may save it); nothing here calls ``plt.show``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from helpers.config import ClassMap


def colorize(labels: np.ndarray, class_map: ClassMap) -> np.ndarray:
    """RGB picture of a label image (unlabelled = black)."""
    return class_map.palette()[labels]


def overlay(image: np.ndarray, labels: np.ndarray, class_map: ClassMap, alpha: float = 0.45,
            hidden: Sequence[int] = ()) -> np.ndarray:
    """Blend class colours over an RGB image; unlabelled (0) and ``hidden`` labels stay clear."""
    import cv2

    if labels.shape[:2] != image.shape[:2]:
        labels = cv2.resize(labels.astype(np.uint8), (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST)
    image = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
    blended = cv2.addWeighted(image, 1 - alpha, colorize(labels, class_map), alpha, 0.0)  # uint8, rounded
    clear = np.zeros(256, bool)
    clear[[class_map.ignore_label, *hidden]] = True
    keep = clear[labels]
    blended[keep] = image[keep]
    return blended


def legend_handles(class_map: ClassMap, include_unlabelled: bool = False, hidden: Sequence[int] = ()) -> list:
    """Matplotlib patches for a legend of the class colours.

    Classes in ``hidden`` (labels the picture leaves clear, e.g. glass) get an empty swatch
    and "(not drawn)": a solid swatch would claim a colour the picture never shows (the
    demo's grey Background swatch looked like Stroma's green blended over pink tissue).
    """
    from matplotlib.patches import Patch

    handles = [Patch(facecolor="none", edgecolor="0.4", hatch="//", label=f"{c.label} {c.name} (not drawn)")
               if c.label in hidden else Patch(color=np.array(c.color) / 255, label=f"{c.label} {c.name}")
               for c in class_map.classes]
    if include_unlabelled:
        handles.insert(0, Patch(color="black", label="0 unlabelled"))
    return handles


def show_overlay(image: np.ndarray, labels: np.ndarray, class_map: ClassMap, title: str = "",
                 alpha: float = 0.45, figsize: tuple[float, float] = (8, 8)):
    """Figure: image with the class overlay and a legend."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    ax.imshow(overlay(image, labels, class_map, alpha))
    ax.set_title(title)
    ax.axis("off")
    ax.legend(handles=legend_handles(class_map), loc="lower right", fontsize=8, framealpha=0.8)
    fig.tight_layout()
    return fig


def tile_grid(images: Sequence[np.ndarray], titles: Sequence[str] | None = None, ncols: int = 4,
              size: float = 2.5, suptitle: str = ""):
    """Figure: a grid of RGB images (or label pictures) with optional titles."""
    import matplotlib.pyplot as plt

    n = max(1, len(images))
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if i < len(images):
            ax.imshow(images[i])
            if titles is not None:
                ax.set_title(titles[i], fontsize=8)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def save_figure(fig, path: str | Path, dpi: int = 110, overwrite: bool = True,
                compress_level: int | None = None) -> Path:
    """Save a figure as PNG atomically.

    ``compress_level`` (zlib 0-9; None: Pillow's default 6) changes only the file size and
    the time, not the pixels.
    """
    from helpers.io import atomic_path

    extra = {} if compress_level is None else {"pil_kwargs": {"compress_level": compress_level}}
    with atomic_path(path, overwrite) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png", **extra)
    return Path(path)


def _font(size: int):
    """Pillow's built-in scalable font (the bitmap one where Pillow lacks FreeType)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or built without FreeType
        return ImageFont.load_default()


def overlay_picture(thumb: np.ndarray, labels: np.ndarray, class_map: ClassMap, title: str = "",
                    alpha: float = 0.45, hidden: Sequence[int] = (), gap: int = 8) -> np.ndarray:
    """RGB picture: slide thumbnail | class overlay with a legend, under a title line.

    The same content as a two-panel matplotlib figure, composed with Pillow in a few
    milliseconds: 07 writes one per slide (``overlay.png``), where matplotlib's drawing
    took 0.4-0.5 s of a small slide's run. The left panel holds the thumbnail's pixels
    unchanged, the right one :func:`overlay`'s. Classes in ``hidden`` are left clear and
    listed with an empty swatch and "(not drawn)", as in :func:`legend_handles`.

    Args:
        thumb: RGB thumbnail ``(h, w, 3)`` uint8.
        labels: Label image (any size; resized to the thumbnail, nearest neighbour).
        class_map: Class names and colours.
        title: Line above the panels ("" for none).
        alpha: Class colour opacity.
        hidden: Labels left clear.
        gap: Pixels between and around the panels.
    """
    from PIL import Image, ImageDraw

    thumb = np.ascontiguousarray(thumb[..., :3], dtype=np.uint8)
    h, w = thumb.shape[:2]
    right = overlay(thumb, labels, class_map, alpha=alpha, hidden=hidden)
    font = _font(max(12, min(20, h // 45)))
    line = int(font.getbbox("Ag")[3]) + 4
    top = gap + (line + gap if title else 0) + line  # title, then the panel captions
    canvas = Image.new("RGB", (2 * w + 3 * gap, top + h + gap), "white")
    draw = ImageDraw.Draw(canvas)

    def centred(x: int, y: int, text: str) -> None:  # no anchor: Pillow's bitmap fallback font has none
        draw.text((x - int(draw.textlength(text, font=font)) // 2, y), text, fill="black", font=font)

    if title:
        centred(canvas.width // 2, gap, title)
    for i, (pic, caption) in enumerate(((thumb, "slide"), (right, "prediction"))):
        x0 = gap + i * (w + gap)
        canvas.paste(Image.fromarray(pic), (x0, top))
        centred(x0 + w // 2, top - line, caption)
    # legend: lower right corner of the prediction panel, on a light box
    entries = [(c, c.label in hidden) for c in class_map.classes]
    texts = [f"{c.label} {c.name}" + (" (not drawn)" if off else "") for c, off in entries]
    sw = line - 4
    box_w = sw + 12 + max(int(draw.textlength(t, font=font)) for t in texts) + 8
    box_h = len(texts) * line + 8
    bx1, by1 = gap + w + gap + w - 6, top + h - 6
    bx0, by0 = max(gap + w + gap, bx1 - box_w), max(top, by1 - box_h)
    draw.rectangle((bx0, by0, bx1, by1), fill=(250, 250, 250), outline=(120, 120, 120))
    for k, ((c, off), text) in enumerate(zip(entries, texts)):
        y = by0 + 4 + k * line
        sq = (bx0 + 6, y + 2, bx0 + 6 + sw, y + 2 + sw)
        if off:  # empty swatch: this colour is never drawn
            draw.rectangle(sq, fill=None, outline=(100, 100, 100))
            draw.line((sq[0], sq[3], sq[2], sq[1]), fill=(100, 100, 100))
        else:
            draw.rectangle(sq, fill=tuple(int(v) for v in c.color), outline=(60, 60, 60))
        draw.text((sq[2] + 6, y), text, fill="black", font=font)
    return np.asarray(canvas)


def save_png(image: np.ndarray, path: str | Path, overwrite: bool = True, compress_level: int = 1) -> Path:
    """Write an RGB(A) array as PNG atomically (zlib level 1: fast, a slightly larger file)."""
    from PIL import Image

    from helpers.io import atomic_path

    with atomic_path(path, overwrite) as tmp:
        Image.fromarray(np.ascontiguousarray(image)).save(tmp, format="PNG", compress_level=compress_level)
    return Path(path)
