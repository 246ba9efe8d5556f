"""Open whole-slide images with OpenSlide and read them at a requested resolution.

All coordinates are full-resolution (level 0) pixels, as in QuPath. A region read at
``downsample`` d covering ``size`` output pixels spans ``size * d`` level-0 pixels.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from helpers.errors import MissingMppError, ParameterError, SlideError

log = logging.getLogger(__name__)

#: File endings OpenSlide can read (used to find slides in a folder).
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".bif", ".svslide", ".dcm")


@dataclass
class Slide:
    """An open slide: OpenSlide handle plus its geometry and pixel size.

    Use :func:`open_slide` to create one; close it with :meth:`close` or ``with``.
    """

    path: Path
    osr: object = field(repr=False)
    mpp: float | None
    mpp_source: str

    @property
    def name(self) -> str:
        """Slide name used in file names and manifests (file name without suffix)."""
        return self.path.stem

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) in level-0 pixels."""
        return tuple(self.osr.dimensions)  # type: ignore[attr-defined]

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(self.osr.level_downsamples)  # type: ignore[attr-defined]

    def require_mpp(self) -> float:
        """The slide's microns per pixel, or a clear error if unknown."""
        if self.mpp is None:
            raise MissingMppError(
                f"{self.path}: the slide stores no microns-per-pixel; set the notebook parameter slide_mpp=<um/px at "
                "full resolution> (e.g. 0.25 for 40x, 0.5 for 20x)"
            )
        return self.mpp

    def downsample_for(self, target_mpp: float) -> float:
        """Downsample from level 0 that gives ``target_mpp`` um/px."""
        if target_mpp <= 0:
            raise ParameterError(f"mpp (the resolution to read at, um/px) must be > 0; got {target_mpp}")
        return target_mpp / self.require_mpp()

    def size_at(self, downsample: float) -> tuple[int, int]:
        """(width, height) of the whole slide at ``downsample`` (rounded down)."""
        w, h = self.dimensions
        return int(w / downsample), int(h / downsample)

    def read(self, x: int, y: int, width: int, height: int, downsample: float = 1.0) -> np.ndarray:
        """Read an RGB region at ``downsample``.

        Args:
            x, y: Top-left corner in level-0 pixels (may lie outside the slide).
            width, height: Output size in pixels at ``downsample``.
            downsample: Level-0 pixels per output pixel (>= 1 reads from the pyramid).

        Returns:
            ``(height, width, 3)`` uint8 RGB; outside the slide and transparent areas
            are white (glass), as in QuPath.
        """
        import cv2

        level = self.osr.get_best_level_for_downsample(downsample * 1.0001)  # type: ignore[attr-defined]
        level_ds = self.level_downsamples[level]
        lw = max(1, math.ceil(width * downsample / level_ds))
        lh = max(1, math.ceil(height * downsample / level_ds))
        try:
            rgba = np.asarray(self.osr.read_region((int(x), int(y)), level, (lw, lh)))  # type: ignore[attr-defined]
        except Exception as exc:  # noqa: BLE001 - OpenSlide raises several types for bad data
            raise SlideError(f"{self.path}: cannot read region at x={x}, y={y} ({exc}); the file may be damaged") from None
        rgb = np.ascontiguousarray(rgba[..., :3])
        alpha = rgba[..., 3]
        if alpha.min() < 255:  # blend onto white only where transparent: a float copy of every read is costly
            part = alpha < 255
            a = alpha[part].astype(np.float32)[:, None] / 255.0
            rgb[part] = (rgb[part].astype(np.float32) * a + 255.0 * (1.0 - a)).round().astype(np.uint8)
        if (lw, lh) != (width, height):
            interp = cv2.INTER_AREA if lw > width else cv2.INTER_LINEAR
            rgb = cv2.resize(rgb, (width, height), interpolation=interp)
        return rgb

    def thumbnail(self, max_size: int = 1024) -> tuple[np.ndarray, float]:
        """An RGB thumbnail whose longer side is at most ``max_size``.

        Returns:
            ``(image, downsample)`` where ``downsample`` is level-0 pixels per thumbnail pixel.
        """
        w, h = self.dimensions
        ds = max(w, h) / max_size if max(w, h) > max_size else 1.0
        return self.read(0, 0, max(1, int(w / ds)), max(1, int(h / ds)), ds), ds

    def close(self) -> None:
        self.osr.close()  # type: ignore[attr-defined]

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_slide(path: str | Path, mpp: float | None = None) -> Slide:
    """Open a slide with OpenSlide, with one-line errors for the usual problems.

    Args:
        path: A slide file OpenSlide reads (SVS, NDPI, MRXS, tiled pyramidal TIFF, ...).
        mpp: Microns per pixel at level 0. Overrides the file's value; required when
            the file stores none (checked when a resolution is requested).

    Raises:
        SlideError: the file is missing, corrupt, or in a format OpenSlide refuses.
    """
    import openslide

    path = Path(path)
    if not path.is_file():
        raise SlideError(f"{path}: slide not found; check the path (slides are read from the workdir or the given folder)")
    try:
        osr = openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        hint = (
            "it is a plain (untiled) TIFF; convert it to a tiled pyramidal TIFF, e.g. "
            "`vips tiffsave in.tif out.tif --tile --pyramid --compression jpeg`"
            if path.suffix.lower() in (".tif", ".tiff")
            else "the file is corrupt or not a slide format OpenSlide reads (SVS, NDPI, MRXS, tiled TIFF); re-export or re-copy it"
        )
        raise SlideError(f"{path}: OpenSlide cannot open this file; {hint}") from None
    except openslide.OpenSlideError as exc:
        raise SlideError(f"{path}: OpenSlide failed to open the file ({exc}); it may be damaged") from None
    if mpp is not None:
        if not mpp > 0:
            raise ParameterError(f"{path}: slide_mpp (the slide's full-resolution um/px) must be > 0; got {mpp}")
        return Slide(path, osr, float(mpp), "override")
    file_mpp = None
    for key in ("openslide.mpp-x", "tiff.XResolution"):
        val = osr.properties.get(key)
        if val is None:
            continue
        try:
            v = float(val)
        except ValueError:
            continue
        if key == "tiff.XResolution":
            unit = osr.properties.get("tiff.ResolutionUnit", "")
            if unit == "centimeter" and v > 0:
                v = 1e4 / v
            else:
                continue
        if v > 0:
            file_mpp = v
            break
    if file_mpp is None:
        log.warning("%s: no microns-per-pixel in the file; set slide_mpp= to read it at a physical resolution", path)
    return Slide(path, osr, file_mpp, "file" if file_mpp else "missing")


def find_slides(folder: str | Path) -> list[Path]:
    """Slide files in ``folder`` (sorted), by their endings."""
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise SlideError(f"{folder}: no such slide file or folder")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in SLIDE_SUFFIXES and not p.name.startswith("."))
