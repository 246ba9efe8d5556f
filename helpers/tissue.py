"""What is tissue and what is glass: the one rule every step uses.

Steps 01 (tile export), 02 (stain estimation), 03 (label refinement) and 07 (which
tiles to predict) all ask the same question of an RGB image; they get their answer here.

The rule (:func:`glass_pixels`): a pixel is glass when it is bright (HSV value above
``min_brightness``) and unsaturated (HSV saturation below ``saturation_threshold``);
tissue is what is neither glass nor near-black (:data:`BLACK_VALUE`: scanner borders,
ink). Tiles (01, 03) clean the glass mask at pixel scale (:func:`glass_mask`); slides
(07) apply the same pixel rule to a thumbnail (:func:`slide_tissue_mask`, sized to the tile
grid by :func:`tissue_mask_size`; :func:`tissue_tiles` picks the tiles on tissue). Stain
estimation (02) adds its own exclusions (pale, pen, clipped pixels) on top of
:func:`tissue_mask`, in :func:`stain_tissue_mask`.
"""

from __future__ import annotations

import math

import numpy as np

from helpers.errors import ParameterError

#: HSV saturation (0..1) below which a bright pixel is glass.
SATURATION_THRESHOLD = 0.08
#: HSV value (0..1) above which a pixel can be glass.
MIN_BRIGHTNESS = 0.78
#: HSV value (0..255) at or below which a pixel is black (not tissue, not glass).
BLACK_VALUE = 30


def _hsv(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV saturation and value (uint8 0..255) of an RGB uint8 image."""
    import cv2

    hsv = cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2HSV)
    return hsv[..., 1], hsv[..., 2]


def _saturation_cut(sat: np.ndarray, saturation_threshold: float | str) -> float:
    """The saturation threshold (0..1): fixed, or Otsu's of ``sat`` clipped to 0.04..0.15."""
    if saturation_threshold == "otsu":
        from skimage.filters import threshold_otsu

        s = sat.astype(np.float32) / 255.0
        return float(np.clip(threshold_otsu(s), 0.04, 0.15)) if np.ptp(s) > 0 else SATURATION_THRESHOLD
    try:
        return float(saturation_threshold)
    except (TypeError, ValueError):
        raise ParameterError(f"saturation_threshold={saturation_threshold!r}: use a number in 0..1 or 'otsu'") from None


def glass_pixels(image: np.ndarray, saturation_threshold: float | str = SATURATION_THRESHOLD,
                 min_brightness: float = MIN_BRIGHTNESS) -> np.ndarray:
    """THE glass rule, per pixel: bright and unsaturated (no morphology).

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        saturation_threshold: HSV saturation (0..1) below which a bright pixel is glass,
            or ``"otsu"`` for Otsu's threshold of the image (clipped to 0.04..0.15).
        min_brightness: HSV value (0..1) above which a pixel can be glass.
    """
    sat, val = _hsv(image)
    thr = _saturation_cut(sat, saturation_threshold)
    return (sat.astype(np.float32) / 255.0 < thr) & (val.astype(np.float32) / 255.0 > min_brightness)


def black_pixels(image: np.ndarray) -> np.ndarray:
    """Near-black pixels (HSV value <= :data:`BLACK_VALUE`): neither tissue nor glass."""
    return _hsv(image)[1] <= BLACK_VALUE


def drop_small_objects(mask: np.ndarray, size: int) -> np.ndarray:
    """``mask`` without connected objects smaller than ``size`` pixels."""
    from skimage.morphology import remove_small_objects

    return remove_small_objects(mask, max_size=size - 1) if size > 1 else mask


def fill_small_holes(mask: np.ndarray, size: int) -> np.ndarray:
    """``mask`` with holes smaller than ``size`` pixels filled."""
    from skimage.morphology import remove_small_holes

    return remove_small_holes(mask, max_size=size - 1) if size > 1 else mask


def _open3(mask: np.ndarray) -> np.ndarray:
    """Morphological opening with a 3x3 square (removes single-pixel specks)."""
    import cv2

    return cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)).astype(bool)


def glass_mask(image: np.ndarray, saturation_threshold: float | str = SATURATION_THRESHOLD,
               min_brightness: float = MIN_BRIGHTNESS, min_area: int = 64) -> np.ndarray:
    """Boolean mask of glass (no tissue) in an RGB tile: :func:`glass_pixels`, cleaned.

    Single pale pixels inside tissue do not count (3x3 opening); glass regions smaller
    than ``min_area`` pixels count as tissue, and tissue specks smaller than it as glass.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        saturation_threshold, min_brightness: See :func:`glass_pixels`.
        min_area: Size (pixels) of the smallest glass region / tissue speck kept; 0 = off.
    """
    glass = _open3(glass_pixels(image, saturation_threshold, min_brightness))
    if min_area > 0:
        glass = fill_small_holes(drop_small_objects(glass, min_area), min_area)
    return glass


def tissue_mask(image: np.ndarray, saturation_threshold: float | str = SATURATION_THRESHOLD,
                min_brightness: float = MIN_BRIGHTNESS, min_area: int = 64) -> np.ndarray:
    """Boolean mask of tissue in an RGB tile: neither glass (:func:`glass_mask`) nor black."""
    return ~glass_mask(image, saturation_threshold, min_brightness, min_area) & ~black_pixels(image)


def slide_tissue_mask(slide, max_size: int = 2048) -> tuple[np.ndarray, float]:
    """Low-resolution tissue mask of a slide: the glass rule on a thumbnail, 3x3-opened.

    Args:
        slide: A :class:`helpers.slides.Slide`.
        max_size: Longest side of the thumbnail the mask is computed on.

    Returns:
        ``(mask, downsample)`` with the mask's level-0 pixels per mask pixel.
    """
    thumb, ds = slide.thumbnail(max_size)
    mask = ~glass_pixels(thumb) & ~black_pixels(thumb)
    return _open3(mask), ds


#: Tissue-mask pixels along one tile's side: enough to tell a tile's tissue fraction to ~3 %.
MASK_PX_PER_TILE = 32


def tissue_mask_size(width: int, height: int, tile: int, max_size: int = 2048, min_size: int = 512) -> int:
    """Longest side of the tissue thumbnail 07 needs for a ``width`` x ``height`` raster of ``tile`` px tiles.

    :data:`MASK_PX_PER_TILE` mask pixels per tile side, between ``min_size`` and ``max_size``:
    a small slide no longer decodes a 2048-px thumbnail for a grid of a few dozen tiles
    (4096² slide at 1 um/px: 0.2-0.4 s -> 0.01 s); slides from about 16k² px on keep 2048.
    """
    need = math.ceil(max(width, height) / tile * MASK_PX_PER_TILE)
    return int(min(max_size, max(min_size, need)))


def tissue_tiles(mask: np.ndarray, f: float, xs: list[int], ys: list[int], tile: int,
                 min_tissue: float) -> list[list[int]]:
    """Per grid row ``ys[i]``, the ``xs`` whose tile footprint has more than ``min_tissue`` tissue.

    Args:
        mask: Boolean tissue thumbnail (:func:`helpers.tissue.slide_tissue_mask`).
        f: Mask pixels per raster pixel.
        xs, ys: Tile origins along x and y, raster pixels.
        tile: Tile side, raster pixels.
        min_tissue: Tissue fraction a tile must exceed (0: any tissue).
    """
    out: list[list[int]] = []
    for y in ys:
        y0, y1 = int(y * f), max(int(y * f) + 1, math.ceil((y + tile) * f))
        row = []
        for x in xs:
            x0, x1 = int(x * f), max(int(x * f) + 1, math.ceil((x + tile) * f))
            part = mask[y0:y1, x0:x1]
            if (part.mean() if part.size else 0.0) > min_tissue:
                row.append(x)
        out.append(row)
    return out


# --------------------------------------------------------------------------- stain estimation

#: Tissue pixels darker than this luminosity (0-1) are treated as ink, folds or dirt.
DARK_LUMINOSITY = 0.12
def as_rgb_uint8(img: np.ndarray, what: str = "image") -> np.ndarray:
    """``img`` as contiguous uint8 RGB (grey expanded, alpha dropped), or a one-line error."""
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ParameterError(f"{what}: expected an RGB image (H, W, 3); got shape {img.shape}")
    if img.dtype != np.uint8:
        raise ParameterError(f"{what}: expected uint8 RGB; got {img.dtype} (convert with skimage.util.img_as_ubyte)")
    return np.ascontiguousarray(img[..., :3])


def luminosity(img: np.ndarray) -> np.ndarray:
    """LAB lightness in 0-1 (as staintools' tissue locator)."""
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(img[..., :3]), cv2.COLOR_RGB2LAB)[..., 0] / 255.0


def pen_mask(img: np.ndarray) -> np.ndarray:
    """Pixels coloured like marker ink (green, cyan, blue hues), never like H&E.

    H&E hues lie between purple-blue (hematoxylin, about 240-300 degrees) and pink-red
    (eosin, about 300-20 degrees); saturated hues from 60 to 220 degrees are pen.
    """
    import cv2

    hsv = cv2.cvtColor(np.ascontiguousarray(img[..., :3]), cv2.COLOR_RGB2HSV)
    hue, sat = hsv[..., 0].astype(np.int16) * 2, hsv[..., 1]
    return (hue >= 60) & (hue <= 220) & (sat > 40)


def stain_tissue_mask(img: np.ndarray, luminosity_threshold: float = 0.8) -> np.ndarray:
    """Boolean mask of stained tissue usable for stain estimation.

    The common tissue rule of every step (:mod:`helpers.tissue`: not glass, not black,
    per pixel) plus the exclusions of stain estimation: pale pixels (luminosity at or above
    ``luminosity_threshold``, staintools' rule), near-black pixels (ink, folds),
    pen-coloured and clipped (a channel at 0) pixels.
    """
    img = as_rgb_uint8(img)
    lum = luminosity(img)
    estimable = (lum < luminosity_threshold) & (lum > DARK_LUMINOSITY) & ~pen_mask(img) & (img.min(axis=2) > 0)
    return estimable & ~glass_pixels(img) & ~black_pixels(img)


def tissue_fraction(img: np.ndarray, luminosity_threshold: float = 0.8) -> float:
    """Fraction of the image's pixels that :func:`stain_tissue_mask` keeps."""
    return float(stain_tissue_mask(img, luminosity_threshold).mean())
