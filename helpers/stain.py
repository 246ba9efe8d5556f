"""Stain normalization (step 02): Macenko, Vahadane and Reinhard with staintools, plus "none".

This module is the normalizer (estimation and transforms); choosing the reference tile
and normalizing a work folder's tiles is :mod:`helpers.normalize`, figures are
:mod:`helpers.views.stain`.

Two ways to apply a fitted :class:`StainNormalizer`:

* per tile (:meth:`StainNormalizer.transform`): like staintools, the source stain matrix
  is re-estimated for every tile (Vahadane runs SPAMS dictionary learning each time).
  Slow, and neighbouring tiles of one slide can come out in different colours.
* per slide (:meth:`StainNormalizer.for_slide`): the slide's stain matrix and
  concentration percentiles are estimated ONCE from a sample of its tissue tiles; each
  tile is then normalized with a fixed, vectorised least-squares (pseudo-inverse)
  concentration solve in optical density space. Fast and seamless across tile borders.

Robustness rule (the same everywhere): only *tissue* pixels are used for fitting
(the common tissue rule of :mod:`helpers.tissue`, and luminosity below
``luminosity_threshold``, not near-black, not pen-coloured — see :func:`helpers.tissue.stain_tissue_mask`). In per-tile mode a tile whose tissue fraction is below
``min_tissue_fraction``, whose estimation fails, or whose result would be non-finite or
much darker than the input is passed through UNCHANGED with a logged warning. In
per-slide mode every tile goes through the slide's fixed linear map (safe for any pixel:
white stays white, no NaN); a slide whose sample holds too little tissue is passed
through unchanged with a warning. Pen-ink pixels (green/blue hues) are never recoloured
(Macenko/Vahadane would map them to dark "nuclei"); glass stays white.

The fitted normalizer is saved as ``normalizer.json`` (+ ``reference.png``) so that
inference uses exactly the normalization used for training.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from helpers.errors import HistoUNetError, ParameterError
from helpers.tissue import as_rgb_uint8, pen_mask, stain_tissue_mask

log = logging.getLogger(__name__)

METHODS = ("macenko", "vahadane", "reinhard", "none")
MODES = ("slide", "tile")

#: Optical density of each uint8 value, as staintools computes it (0 counts as 1, floor 1e-6).
_OD_LUT = np.maximum(-np.log(np.maximum(np.arange(256), 1) / 255.0), 1e-6).astype(np.float32)

#: Ruifrok & Johnston's hematoxylin minus eosin OD direction (unit vectors), to tell H from E.
_H_MINUS_E = (np.array([0.650, 0.704, 0.286]) / np.linalg.norm([0.650, 0.704, 0.286])
              - np.array([0.072, 0.990, 0.105]) / np.linalg.norm([0.072, 0.990, 0.105]))

#: Reinhard leaves pixels at least this light (0-1) unchanged: glass stays white.
GLASS_LUMINOSITY = 0.95
#: Minimum number of tissue pixels needed to estimate stains.
MIN_TISSUE_PIXELS = 500


# --------------------------------------------------------------------------- pixels


def optical_density(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 optical density of a uint8 RGB image (the input is not modified)."""
    import cv2

    img = np.ascontiguousarray(np.asarray(img)[..., :3])
    if img.ndim == 3 and img.shape[0] * img.shape[1] < 2**31:
        return cv2.LUT(img, _OD_LUT.reshape(1, 256))
    return _OD_LUT[img]


def _pixels_image(pixels: np.ndarray) -> np.ndarray:
    """A writable (N, 1, 3) uint8 'image' of pixels, the shape staintools' extractors accept."""
    return np.ascontiguousarray(pixels.reshape(-1, 1, 3), dtype=np.uint8).copy()


def _sample_tissue_pixels(images: Sequence[np.ndarray], luminosity_threshold: float, max_pixels: int,
                          seed: int = 0) -> np.ndarray:
    """Tissue pixels (N, 3) pooled from ``images``, randomly thinned to ``max_pixels``."""
    chunks = [(as_rgb_uint8(im)[stain_tissue_mask(im, luminosity_threshold)]) for im in images]
    pix = np.concatenate(chunks, axis=0) if chunks else np.zeros((0, 3), np.uint8)
    if len(pix) > max_pixels:
        rng = np.random.default_rng(seed)
        pix = pix[rng.choice(len(pix), max_pixels, replace=False)]
    return pix


def _extractor(method: str):
    import staintools

    return {"macenko": staintools.MacenkoStainExtractor, "vahadane": staintools.VahadaneStainExtractor}[method]


#: Ruifrok & Johnston's H and E optical-density vectors: the starting dictionary for Vahadane.
_RUIFROK_HE = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105]])


def _vahadane_matrix(pixels: np.ndarray, luminosity_threshold: float, regularizer: float = 0.1) -> np.ndarray:
    """Vahadane's sparse dictionary (as staintools computes it), started from Ruifrok's H and E.

    staintools starts SPAMS' dictionary learning from random columns of the data with
    several threads, so two fits of the same tile can land in different optima and swap
    H and E on pale tiles. A fixed start and one thread make the estimate repeatable and
    keep row 0 on the hematoxylin side.
    """
    import spams
    from staintools.miscellaneous.optical_density_conversion import convert_RGB_to_OD
    from staintools.tissue_masks.luminosity_threshold_tissue_locator import LuminosityThresholdTissueLocator

    image = _pixels_image(pixels)
    mask = LuminosityThresholdTissueLocator.get_tissue_mask(image, luminosity_threshold=luminosity_threshold).reshape(-1)
    od = convert_RGB_to_OD(image).reshape(-1, 3)[mask]
    start = np.asfortranarray((_RUIFROK_HE / np.linalg.norm(_RUIFROK_HE, axis=1, keepdims=True)).T)
    dictionary = spams.trainDL(X=np.asfortranarray(od.T), D=start, K=2, lambda1=regularizer, mode=2, modeD=0,
                               posAlpha=True, posD=True, verbose=False, numThreads=1).T
    return dictionary / np.linalg.norm(dictionary, axis=1, keepdims=True)


def _estimate_stain_matrix(method: str, pixels: np.ndarray, luminosity_threshold: float) -> np.ndarray:
    """staintools' stain matrix (2 x 3, rows H then E, unit length) from tissue pixels."""
    with np.errstate(divide="ignore", invalid="ignore"):  # a degenerate fit gives NaN, rejected below
        if method == "vahadane":
            matrix = _vahadane_matrix(pixels, luminosity_threshold)
        else:
            matrix = _extractor(method).get_stain_matrix(_pixels_image(pixels), luminosity_threshold=luminosity_threshold)
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (2, 3) or not np.all(np.isfinite(matrix)):
        raise ValueError(f"stain matrix estimate is not finite: {matrix}")
    # staintools puts the vector with the larger red OD first; on pale tiles the two are nearly
    # equal there and H/E swap at random. Order by projection on (H - E) of Ruifrok's reference.
    score = matrix @ _H_MINUS_E
    return matrix if score[0] >= score[1] else matrix[::-1].copy()


def _lasso_concentrations(pixels: np.ndarray, stain_matrix: np.ndarray) -> np.ndarray:
    """Non-negative stain concentrations (N, 2) with staintools' SPAMS lasso (on a copy)."""
    from staintools.miscellaneous.get_concentrations import get_concentrations

    return np.asarray(get_concentrations(_pixels_image(pixels), stain_matrix), dtype=np.float64)


def _lstsq_concentrations(od: np.ndarray, pinv: np.ndarray) -> np.ndarray:
    """Non-negative concentrations from a fixed pseudo-inverse: (N, 3) @ (3, 2), clipped at 0."""
    import cv2

    # cv2.transform is a per-pixel SIMD matrix product; numpy's BLAS matmul on (N, 3) x (3, 2)
    # is up to 50x slower on a busy 2-core machine
    conc = cv2.transform(np.ascontiguousarray(od, dtype=np.float32).reshape(-1, 1, 3),
                         np.ascontiguousarray(pinv.T, dtype=np.float32)).reshape(-1, 2)
    np.maximum(conc, 0.0, out=conc)
    return conc


def _max_concentrations(conc: np.ndarray) -> np.ndarray:
    return np.percentile(conc, 99, axis=0).astype(np.float64)


def lab_stats(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of L (0-100), a, b (about -127..127) over pixels (N, 3)."""
    from staintools import ReinhardColorNormalizer

    lab = np.stack(ReinhardColorNormalizer.lab_split(_pixels_image(pixels)), axis=-1).reshape(-1, 3)
    return lab.mean(axis=0).astype(np.float64), lab.std(axis=0).astype(np.float64)


def _reinhard_apply(img: np.ndarray, src_mean: np.ndarray, src_std: np.ndarray, tgt_mean: np.ndarray,
                    tgt_std: np.ndarray, luminosity_threshold: float = 0.8) -> np.ndarray:
    """Reinhard's LAB mean/std transfer, faded out towards glass so white background stays white.

    Statistics are of tissue only, so applied to glass they would tint it; the weight is 1
    below ``luminosity_threshold``, 0 above :data:`GLASS_LUMINOSITY`, linear between (pointwise,
    hence still seamless across tiles).
    """
    from staintools import ReinhardColorNormalizer

    chans = ReinhardColorNormalizer.lab_split(np.ascontiguousarray(img))
    weight = np.clip((GLASS_LUMINOSITY - chans[0] / 100.0) / max(GLASS_LUMINOSITY - luminosity_threshold, 1e-3), 0, 1)
    scale = tgt_std / np.maximum(src_std, 1e-6)
    out = [((c - src_mean[i]) * scale[i] + tgt_mean[i]).astype(np.float32) for i, c in enumerate(chans)]
    out = [(weight * o + (1 - weight) * c).astype(np.float32) for o, c in zip(out, chans)]
    return ReinhardColorNormalizer.merge_back(*out)


def _reconstruct(conc: np.ndarray, stain_matrix: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """RGB uint8 from concentrations (N, 2) and a target stain matrix (2, 3): 255 exp(-C S), rounded, clipped."""
    import cv2

    od = cv2.transform(np.ascontiguousarray(conc, dtype=np.float32).reshape(-1, 1, 2),
                       np.ascontiguousarray(np.asarray(stain_matrix).T, dtype=np.float32))
    rgb = cv2.exp(-od)
    return cv2.convertScaleAbs(rgb, alpha=255.0).reshape(shape)  # rounds and saturates to 0..255


def _keep_pen(src: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Leave pen-ink pixels as they were: decomposed into H and E they would turn into fake nuclei."""
    pen = pen_mask(src)
    if pen.any():
        out[pen] = src[pen]
    return out


def _looks_broken(src: np.ndarray, out: np.ndarray) -> str:
    """Why an output must not be used ('' when it is fine)."""
    if out.shape != src.shape:
        return "output shape changed"
    dark_in = float((src.max(axis=2) < 30).mean())
    dark_out = float((out.max(axis=2) < 30).mean())
    if dark_out > dark_in + 0.25:
        return f"output turned {dark_out:.0%} of the tile black"
    return ""


# --------------------------------------------------------------------------- normalizer


@dataclass
class SlideTransform:
    """Per-slide normalization: a fixed map estimated once; call it on each tile of the slide.

    Attributes:
        status: ``"normalized"`` or ``"passthrough: <reason>"`` (then tiles are returned unchanged).
        stain_matrix: The slide's estimated source stain matrix (2 x 3), if any.
        max_concentrations: The slide's 99th-percentile H and E concentrations.
    """

    normalizer: StainNormalizer
    status: str = "normalized"
    stain_matrix: np.ndarray | None = None
    max_concentrations: np.ndarray | None = None
    lab_mean: np.ndarray | None = None
    lab_std: np.ndarray | None = None
    n_pixels: int = 0
    _pinv: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.stain_matrix is not None and self.max_concentrations is not None and self.status == "normalized":
            scale = (self.normalizer.max_concentrations / np.maximum(self.max_concentrations, 1e-6))
            # fold the concentration scaling into the pseudo-inverse: one (3, 2) matrix per slide
            self._pinv = (np.linalg.pinv(self.stain_matrix) * scale[None, :]).astype(np.float32)

    def __call__(self, img: np.ndarray) -> np.ndarray:
        """Normalize one tile (uint8 RGB) of this slide."""
        img = as_rgb_uint8(img, "tile")
        if self.status != "normalized" or self.normalizer.method == "none":
            return img.copy()
        if self.normalizer.method == "reinhard":
            return _reinhard_apply(img, self.lab_mean, self.lab_std, self.normalizer.lab_mean, self.normalizer.lab_std,
                                   self.normalizer.luminosity_threshold)
        conc = _lstsq_concentrations(optical_density(img), self._pinv)
        return _keep_pen(img, _reconstruct(conc, self.normalizer.stain_matrix, img.shape))

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "n_pixels": self.n_pixels,
            "stain_matrix": None if self.stain_matrix is None else np.round(self.stain_matrix, 6).tolist(),
            "max_concentrations": None if self.max_concentrations is None else np.round(self.max_concentrations, 6).tolist(),
            "lab_mean": None if self.lab_mean is None else np.round(self.lab_mean, 4).tolist(),
            "lab_std": None if self.lab_std is None else np.round(self.lab_std, 4).tolist(),
        }


@dataclass
class StainNormalizer:
    """A fitted stain normalizer (target = the reference tile's stains or colour statistics).

    Create with :func:`fit_normalizer` or :func:`load_normalizer`; apply per tile with
    :meth:`transform` or per slide with :meth:`for_slide`.

    Attributes:
        method: ``"macenko"``, ``"vahadane"``, ``"reinhard"`` or ``"none"``.
        stain_matrix: Target stain matrix (2 x 3 optical density, rows H, E) for Macenko/Vahadane.
        max_concentrations: Target 99th-percentile H and E concentrations.
        lab_mean, lab_std: Target LAB statistics of tissue pixels (Reinhard).
        luminosity_threshold: Pixels with LAB lightness (0-1) below this are tissue.
        min_tissue_fraction: Per-tile mode passes tiles with less tissue through unchanged.
        max_fit_pixels: Tissue pixels sampled at most to estimate a slide's stains.
        reference: Reference image path (relative to the JSON file's folder), if saved.
        reference_source: Where the reference tile came from (tile path or id).
        reference_image: The reference tile itself (kept in memory; saved as PNG by :meth:`save`).
    """

    method: str
    stain_matrix: np.ndarray | None = None
    max_concentrations: np.ndarray | None = None
    lab_mean: np.ndarray | None = None
    lab_std: np.ndarray | None = None
    luminosity_threshold: float = 0.8
    min_tissue_fraction: float = 0.05
    max_fit_pixels: int = 200_000
    reference: str | None = None
    reference_source: str | None = None
    reference_image: np.ndarray | None = field(default=None, repr=False)

    # ---- per tile
    def transform(self, img: np.ndarray) -> np.ndarray:
        """Normalize one tile, re-estimating its stains (staintools' per-image behaviour).

        Tiles with too little tissue, or whose estimate fails, come back unchanged (warning logged).
        """
        return self.transform_with_status(img)[0]

    def transform_with_status(self, img: np.ndarray) -> tuple[np.ndarray, str]:
        """Like :meth:`transform`, also returning ``"normalized"`` or ``"passthrough: <reason>"``."""
        img = as_rgb_uint8(img, "tile")
        if self.method == "none":
            return img.copy(), "normalized"
        mask = stain_tissue_mask(img, self.luminosity_threshold)
        frac = float(mask.mean())
        if frac < self.min_tissue_fraction or mask.sum() < MIN_TISSUE_PIXELS:
            return self._passthrough(img, f"tissue fraction {frac:.1%} < min_tissue_fraction {self.min_tissue_fraction:.0%}")
        pixels = img[mask]
        try:
            if self.method == "reinhard":
                mean, std = lab_stats(pixels)
                if np.any(std < 0.5):
                    return self._passthrough(img, "colour spread too small to rescale")
                out = _reinhard_apply(img, mean, std, self.lab_mean, self.lab_std, self.luminosity_threshold)
            else:
                if float(pixels.std(axis=0).max()) < 1.0:  # a flat colour has no second stain to find
                    return self._passthrough(img, "tissue is a single colour: two stains cannot be separated")
                src = _estimate_stain_matrix(self.method, pixels, self.luminosity_threshold)
                conc = _lasso_concentrations(img.reshape(-1, 3), src)
                max_src = _max_concentrations(conc[mask.reshape(-1)])
                if np.any(max_src < 1e-3) or not np.all(np.isfinite(conc)):
                    return self._passthrough(img, "one stain is absent from the tile")
                conc *= self.max_concentrations / max_src
                out = _keep_pen(img, _reconstruct(conc, self.stain_matrix, img.shape))
        except Exception as exc:  # noqa: BLE001 - staintools/SPAMS raise assorted errors on odd tiles
            return self._passthrough(img, f"stain estimation failed ({type(exc).__name__}: {exc})")
        broken = _looks_broken(img, out)
        if broken:
            return self._passthrough(img, broken)
        return out, "normalized"

    def _passthrough(self, img: np.ndarray, reason: str) -> tuple[np.ndarray, str]:
        log.warning("stain %s: tile passed through unchanged: %s", self.method, reason)
        return img.copy(), f"passthrough: {reason}"

    # ---- per slide
    def for_slide(self, samples: Sequence[np.ndarray], seed: int = 0) -> SlideTransform:
        """Estimate a slide's stains ONCE from sample tiles; return a fast per-tile function.

        Args:
            samples: Tiles of one slide (uint8 RGB); only their tissue pixels are used.
            seed: Seed for thinning the pooled pixels to ``max_fit_pixels``.

        Returns:
            A :class:`SlideTransform` (callable ``tile -> normalized tile``).
        """
        if self.method == "none":
            return SlideTransform(self)
        pixels = _sample_tissue_pixels(samples, self.luminosity_threshold, self.max_fit_pixels, seed)
        if len(pixels) < MIN_TISSUE_PIXELS:
            reason = f"only {len(pixels)} tissue pixels in {len(samples)} sample tiles (need {MIN_TISSUE_PIXELS})"
            log.warning("stain %s: slide passed through unchanged: %s", self.method, reason)
            return SlideTransform(self, status=f"passthrough: {reason}", n_pixels=len(pixels))
        try:
            if self.method == "reinhard":
                mean, std = lab_stats(pixels)
                return SlideTransform(self, lab_mean=mean, lab_std=np.maximum(std, 0.5), n_pixels=len(pixels))
            src = _estimate_stain_matrix(self.method, pixels, self.luminosity_threshold)
            conc = _lstsq_concentrations(optical_density(pixels), np.linalg.pinv(src).astype(np.float32))
            max_src = _max_concentrations(conc)
        except Exception as exc:  # noqa: BLE001
            reason = f"stain estimation failed ({type(exc).__name__}: {exc})"
            log.warning("stain %s: slide passed through unchanged: %s", self.method, reason)
            return SlideTransform(self, status=f"passthrough: {reason}", n_pixels=len(pixels))
        if np.any(max_src < 1e-3):
            reason = "one stain is absent from the slide's sample"
            log.warning("stain %s: slide passed through unchanged: %s", self.method, reason)
            return SlideTransform(self, status=f"passthrough: {reason}", n_pixels=len(pixels))
        return SlideTransform(self, stain_matrix=src, max_concentrations=max_src, n_pixels=len(pixels))

    # ---- persistence
    def to_dict(self) -> dict[str, Any]:
        import staintools  # noqa: F401 - recorded for reproducibility

        def arr(a: np.ndarray | None, nd: int = 6) -> list | None:
            # full precision: inference must reproduce training's normalization bit for bit
            return None if a is None else np.asarray(a, dtype=np.float64).tolist()

        from importlib.metadata import version

        return {
            "method": self.method,
            "stain_matrix": arr(self.stain_matrix),
            "stain_matrix_rows": ["hematoxylin", "eosin"],
            "stain_colors_rgb": None if self.stain_matrix is None else stain_colors(self.stain_matrix).tolist(),
            "max_concentrations": arr(self.max_concentrations),
            "lab_mean": arr(self.lab_mean, 4),
            "lab_std": arr(self.lab_std, 4),
            "luminosity_threshold": self.luminosity_threshold,
            "min_tissue_fraction": self.min_tissue_fraction,
            "max_fit_pixels": self.max_fit_pixels,
            "reference": self.reference,
            "reference_source": self.reference_source,
            "optical_density": "OD = -ln(max(I, 1) / 255), floor 1e-6; RGB = 255 exp(-C @ stain_matrix)",
            "staintools_version": version("staintools"),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> StainNormalizer:
        method = str(d.get("method", "")).lower()
        if method not in METHODS:
            raise ParameterError(f"{source}: unknown stain method {d.get('method')!r}; use one of {', '.join(METHODS)}")

        def arr(key: str, shape: tuple[int, ...]) -> np.ndarray | None:
            v = d.get(key)
            if v is None:
                return None
            a = np.asarray(v, dtype=np.float64)
            if a.shape != shape or not np.all(np.isfinite(a)):
                raise ParameterError(f"{source}: {key} must be finite numbers of shape {shape}; re-run 02_normalize_stain")
            return a

        norm = cls(
            method=method,
            stain_matrix=arr("stain_matrix", (2, 3)),
            max_concentrations=arr("max_concentrations", (2,)),
            lab_mean=arr("lab_mean", (3,)),
            lab_std=arr("lab_std", (3,)),
            luminosity_threshold=float(d.get("luminosity_threshold", 0.8)),
            min_tissue_fraction=float(d.get("min_tissue_fraction", 0.05)),
            max_fit_pixels=int(d.get("max_fit_pixels", 200_000)),
            reference=d.get("reference"),
            reference_source=d.get("reference_source"),
        )
        needed = {"macenko": ("stain_matrix", "max_concentrations"), "vahadane": ("stain_matrix", "max_concentrations"),
                  "reinhard": ("lab_mean", "lab_std"), "none": ()}[method]
        missing = [k for k in needed if getattr(norm, k) is None]
        if missing:
            raise ParameterError(f"{source}: method {method} needs {', '.join(missing)}; re-run 02_normalize_stain")
        return norm

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write ``normalizer.json`` (and ``reference.png`` beside it when the reference image is known)."""
        from helpers.io import write_image, write_json

        path = Path(path)
        if self.reference_image is not None:
            ref = path.with_name("reference.png")
            write_image(self.reference_image, ref, overwrite=overwrite)
            self.reference = ref.name
        return write_json(self.to_dict(), path, overwrite=overwrite)


def stain_colors(stain_matrix: np.ndarray, concentration: float = 1.0) -> np.ndarray:
    """RGB uint8 colour (2, 3) of each stain at a given concentration (for display)."""
    return np.clip(np.rint(255 * np.exp(-concentration * np.asarray(stain_matrix))), 0, 255).astype(np.uint8)


def fit_normalizer(reference_img: np.ndarray, method: str = "macenko", luminosity_threshold: float = 0.8,
                   min_tissue_fraction: float = 0.05, max_fit_pixels: int = 200_000,
                   reference_source: str | None = None) -> StainNormalizer:
    """Fit a normalizer to a reference tile (tissue pixels only).

    Args:
        reference_img: The reference tile, uint8 RGB (well stained, mostly tissue).
        method: ``"macenko"``, ``"vahadane"``, ``"reinhard"`` or ``"none"``.
        luminosity_threshold: LAB lightness (0-1) below which a pixel is tissue.
        min_tissue_fraction: Per-tile mode passes tiles with less tissue through unchanged.
        max_fit_pixels: Tissue pixels sampled at most for estimation.
        reference_source: Where the reference came from (recorded in the JSON).

    Raises:
        ParameterError: unknown method, or a reference with too little tissue.
    """
    method = str(method).lower()
    if method not in METHODS:
        raise ParameterError(f"stain_method={method!r} is unknown; use one of {', '.join(METHODS)}")
    if not 0 < luminosity_threshold <= 1:
        raise ParameterError(f"luminosity_threshold={luminosity_threshold} must be in (0, 1]; 0.8 suits most H&E")
    ref = as_rgb_uint8(reference_img, "reference image").copy()
    norm = StainNormalizer(method, luminosity_threshold=luminosity_threshold, min_tissue_fraction=min_tissue_fraction,
                           max_fit_pixels=max_fit_pixels, reference_source=reference_source, reference_image=ref)
    if method == "none":
        return norm
    pixels = _sample_tissue_pixels([ref], luminosity_threshold, max_fit_pixels)
    if len(pixels) < MIN_TISSUE_PIXELS:
        raise ParameterError(
            f"reference image {reference_source or ''}: only {len(pixels)} tissue pixels; choose a tissue-rich "
            "reference (reference_tile=) or raise luminosity_threshold")
    if method == "reinhard":
        norm.lab_mean, norm.lab_std = lab_stats(pixels)
        return norm
    try:
        norm.stain_matrix = _estimate_stain_matrix(method, pixels, luminosity_threshold)
        norm.max_concentrations = _max_concentrations(_lasso_concentrations(pixels, norm.stain_matrix))
    except Exception as exc:  # noqa: BLE001
        raise ParameterError(f"reference image {reference_source or ''}: {method} stain estimation failed ({exc}); "
                             "choose another reference tile") from None
    if np.any(norm.max_concentrations < 1e-3):
        raise ParameterError(f"reference image {reference_source or ''}: one stain is absent; choose a reference "
                             "with both nuclei (hematoxylin) and cytoplasm/stroma (eosin)")
    return norm


def load_normalizer(path: str | Path) -> StainNormalizer:
    """Read ``normalizer.json`` written by :meth:`StainNormalizer.save` (method "none" -> identity).

    Raises:
        HistoUNetError: the file is missing or malformed.
    """
    from helpers.io import read_image, read_json

    path = Path(path)
    if not path.is_file():
        raise HistoUNetError(f"{path}: stain normalizer not found; run 02_normalize_stain.ipynb first "
                             "(or pass the normalizer.json used for training)")
    try:
        data = read_json(path)
    except ValueError as exc:
        raise HistoUNetError(f"{path}: not valid JSON ({exc}); re-run 02_normalize_stain") from None
    if not isinstance(data, dict):
        raise HistoUNetError(f"{path}: expected a JSON object; re-run 02_normalize_stain")
    norm = StainNormalizer.from_dict(data, str(path))
    if norm.reference and (path.parent / norm.reference).is_file():
        norm.reference_image = read_image(path.parent / norm.reference)
    return norm


# --------------------------------------------------------------------------- colour statistics


def mean_lab(img: np.ndarray, luminosity_threshold: float = 0.8) -> np.ndarray:
    """Mean LAB colour (L 0-100) of an image's tissue pixels."""
    img = as_rgb_uint8(img)
    return lab_stats(img[stain_tissue_mask(img, luminosity_threshold)])[0]


def lab_distance(img1: np.ndarray, img2: np.ndarray, luminosity_threshold: float = 0.8) -> float:
    """Distance (delta E 76) between the mean tissue colours of two images."""
    return float(np.linalg.norm(mean_lab(img1, luminosity_threshold) - mean_lab(img2, luminosity_threshold)))
