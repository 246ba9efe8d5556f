"""03's pixel classifier as a second opinion at inference (step 07, optional).

With ``densify: forest``, step 03 fits a random forest to the refined strokes
(:mod:`helpers.densify`) and keeps it as ``labels/teacher.joblib``. At inference the
U-Net's blended class probabilities can be averaged with that forest's, pixel by pixel:
``(1 - weight) * unet + weight * forest`` (``teacher_weight`` in 07). On the real-data
benchmark the two err in different places (README, "The teacher at inference").

The forest sees the slide as 03 saw its tiles: raw colours (no stain normalization), at
the model's resolution, filter scales in micrometres. Features are computed block by block
with a halo wide enough that every block equals the whole-image computation (the widest
filter chain: a derivative at sigma s, then a Gaussian at 2 s, each cut at 4 sigma). Past the
slide's edge the slide is mirrored, as 03's features were at its canvases' edges.
Pixels the U-Net gives to glass with certainty (probability 255 of 255, which includes
every pixel no tile covered) are left as they are.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from helpers.errors import HistoUNetError, ParameterError

log = logging.getLogger(__name__)

TEACHER_FILE = "teacher.joblib"
#: Side of the blocks the forest labels at once (features: block + halo, 96 float32 maps).
BLOCK_PX = 512


def save_teacher(model: Any, path: str | Path, *, mpp: float | None, sigmas_um: tuple[float, ...],
                 method: str = "forest") -> Path:
    """Keep a fitted classifier with what 07 needs to use it (``mpp`` of the tiles it saw, filter scales)."""
    import joblib

    path = Path(path)
    joblib.dump({"model": model, "classes": [int(c) for c in model.classes_], "mpp": mpp,
                 "sigmas_um": list(sigmas_um), "colours": "raw", "method": method}, path)
    return path


def load_teacher(path: str | Path) -> dict:
    """Read a teacher saved by :func:`save_teacher`; one-line errors for a missing or foreign file."""
    import joblib

    path = Path(path)
    if not path.is_file():
        raise ParameterError(f"teacher={path}: file not found; run 03 with densify: forest (it writes "
                             f"labels/{TEACHER_FILE}) or set teacher_weight: 0")
    try:
        teacher = joblib.load(path)
    except Exception as exc:  # noqa: BLE001 - pickles fail in many ways
        raise HistoUNetError(f"{path}: cannot read the teacher ({type(exc).__name__}); run 03 again") from None
    if not isinstance(teacher, dict) or "model" not in teacher or "classes" not in teacher:
        raise HistoUNetError(f"{path}: not a teacher written by 03; run 03 with densify: forest again")
    return teacher


def check_teacher(teacher: dict, n_cls: int, path: str | Path = "teacher") -> None:
    """Refuse a teacher whose class labels the model does not have (before any prediction work)."""
    if max(teacher["classes"]) > n_cls:
        raise HistoUNetError(f"{path}: the teacher knows class labels {teacher['classes']} but the model has {n_cls} "
                             "classes; use the teacher of the same work folder's 03")


def halo_px(sigmas_um: list[float] | tuple[float, ...], mpp: float) -> int:
    """Context rows/columns a block needs so its features equal the whole image's."""
    return int(math.ceil(12 * max(sigmas_um) / mpp)) + 1


def class_probabilities(model: Any, x: np.ndarray, n_cls: int) -> np.ndarray:
    """``(n, n_cls)`` float32: a classifier's ``predict_proba`` on ``x`` (n, f), one column per class label
    ``1..n_cls`` (the model's ``classes_``), zeros for classes it never saw."""
    out = np.zeros((len(x), n_cls), np.float32)
    out[:, np.asarray(model.classes_, int) - 1] = model.predict_proba(x)
    return out


def forest_probabilities(teacher: dict, rgb: np.ndarray, mpp: float, n_cls: int, halo: int) -> np.ndarray:
    """``(h - 2 halo, w - 2 halo, n_cls)`` float32 class probabilities of the block inside ``rgb``'s halo."""
    from helpers.densify import pixel_features

    feats = pixel_features(rgb, mpp, tuple(teacher["sigmas_um"]))[halo:rgb.shape[0] - halo, halo:rgb.shape[1] - halo]
    h, w = feats.shape[:2]
    return class_probabilities(teacher["model"], feats.reshape(h * w, -1), n_cls).reshape(h, w, n_cls)


def _read_mirrored(slide: Any, ds: float, x: int, y: int, w: int, h: int) -> np.ndarray:
    """``(h, w, 3)`` RGB at ``ds`` from (x, y) in ``ds`` pixels; the part past the slide's edge mirrors the slide.

    03 computed its features on tile canvases mirrored at their edges (scipy's ``reflect``); a slide
    read past its edge gives white glass instead, which 03's classifier never saw next to tissue.
    On a slide with glass at its border the two agree; on a crop that ends in tissue, white fill
    turned the last ~100 um of tissue into "near glass" (OCDC, annotator seed 2: the teacher alone
    0.715 with white fill, 0.836 mirrored).
    """
    sw, sh = slide.size_at(ds)
    cx0, cy0 = min(max(0, x), sw - 1), min(max(0, y), sh - 1)
    cx1, cy1 = max(min(sw, x + w), cx0 + 1), max(min(sh, y + h), cy0 + 1)
    rgb = slide.read(int(round(cx0 * ds)), int(round(cy0 * ds)), cx1 - cx0, cy1 - cy0, downsample=ds)
    pad = ((cy0 - y, y + h - cy1), (cx0 - x, x + w - cx1), (0, 0))
    if any(a < 0 or b < 0 for a, b in pad[:2]):  # a block wholly past the edge: keep the reader's own answer
        return slide.read(int(round(x * ds)), int(round(y * ds)), w, h, downsample=ds)
    return np.pad(rgb, pad, mode="symmetric") if any(a or b for a, b in pad[:2]) else rgb


def blend_teacher(probs: Any, out: Any, slide: Any, ds: float, mpp: float, teacher: dict, weight: float, bg: int,
                  progress: bool = True) -> dict:
    """Average the forest's probabilities with a slide's uint8 probability rows, into ``out``.

    ``probs`` is left as it is (a run stopped here starts this step again from it).

    Args:
        probs: A :class:`helpers.rowstore.RowStore` ``(H, W, n_cls)`` uint8 (0-255) at ``ds``.
        out: A row store of the same shape for the result.
        slide: The open :class:`helpers.slides.Slide`.
        ds: Level-0 pixels per probability pixel.
        mpp: um/px of the probability rows.
        teacher: From :func:`load_teacher`.
        weight: The forest's share, in (0, 1].
        bg: Index of the background class (pixels certain of it are left alone).
        progress: Show a progress bar.

    Returns:
        ``{"pixels", "blocks", "seconds"}``: pixels blended.
    """
    import time

    from tqdm.auto import tqdm

    if not 0.0 < weight <= 1.0:
        raise ParameterError(f"teacher_weight must be in (0, 1] to use a teacher; got {weight}")
    H, W, n_cls = probs.shape
    check_teacher(teacher, n_cls)
    halo = halo_px(teacher["sigmas_um"], mpp)
    t0, pixels, blocks = time.perf_counter(), 0, 0
    n_blocks = math.ceil(H / BLOCK_PX) * math.ceil(W / BLOCK_PX)
    with tqdm(total=n_blocks, desc="teacher (forest)", unit="block", disable=not progress) as bar:
        for y in range(0, H, BLOCK_PX):
            rows = np.array(probs.read(y, min(H, y + BLOCK_PX)), copy=True)
            todo_rows = rows[..., bg] < 255
            for x in range(0, W, BLOCK_PX):
                bar.update(1)
                todo = todo_rows[:, x:x + BLOCK_PX]
                if not todo.any():
                    continue
                h, w = todo.shape
                rgb = _read_mirrored(slide, ds, x - halo, y - halo, w + 2 * halo, h + 2 * halo)
                forest = forest_probabilities(teacher, rgb, mpp, n_cls, halo)
                mixed = (1.0 - weight) * rows[:, x:x + w].astype(np.float32) + (weight * 255.0) * forest
                block = rows[:, x:x + w]
                block[todo] = np.clip(np.rint(mixed[todo]), 0, 255).astype(np.uint8)
                pixels += int(todo.sum())
                blocks += 1
            out.write(y, rows)
    return {"pixels": pixels, "blocks": blocks, "seconds": round(time.perf_counter() - t0, 2), "weight": weight}
