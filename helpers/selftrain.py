"""Self-training (issue 11): pseudo-labels for the unlabelled pixels of the training tiles.

A first model (05) and its slide predictions (07, ``predictions/<slide>/probabilities.tiff``)
give every unlabelled pixel of a training tile a class where the model is confident
(maximum probability >= ``threshold``). The annotated pixels keep their label. Pixels in
05's validation blocks (:func:`helpers.split.holdout_blocks`, ``split_by="pixels"``) get no
pseudo-label, so a second training round with the same seed, ``val_fraction`` and
``block_size`` validates on exactly the annotated pixels the first round did.

:func:`pseudo_label_tiles` writes the new label tiles to ``labels/pseudo/`` and makes them
the work folder's tile table (``labels/manifest.csv``); 03's table is kept as
``labels/manifest_round1.csv``. Round 2 is then 05 with ``init_model`` (the first model,
moved to e.g. ``model_round1``) and 07 again.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from helpers.errors import HistoUNetError, ParameterError

log = logging.getLogger(__name__)

#: The first round's tile table, kept beside the new one.
ROUND1_TABLE = "manifest_round1.csv"


def pseudo_label(label: np.ndarray, probs: np.ndarray, threshold: float, keep_out: np.ndarray | None = None) -> np.ndarray:
    """Labels with the unlabelled pixels filled where the model is confident.

    Args:
        label: ``(H, W)`` uint8 labels, 0 = unlabelled.
        probs: ``(H, W, C)`` probabilities (channel ``i`` is label ``i + 1``).
        threshold: Smallest maximum probability that gives a pseudo-label.
        keep_out: Optional ``(H, W)`` bool mask of pixels that must stay unlabelled.

    Returns:
        A new uint8 label array.
    """
    if not 0 < threshold <= 1:
        raise ParameterError(f"threshold={threshold}: must be in (0, 1]")
    if probs.shape[:2] != label.shape:
        raise ParameterError(f"probabilities {probs.shape[:2]} and labels {label.shape} differ in size")
    add = (label == 0) & (probs.max(-1) >= threshold)
    if keep_out is not None:
        add &= ~keep_out
    out = label.copy()
    out[add] = (np.argmax(probs, -1)[add] + 1).astype(np.uint8)
    return out


def _tile_probs(probs: np.ndarray, x: int, y: int, shape: tuple[int, int], ds: float) -> np.ndarray:
    """The tile's window of a slide's probability raster (zeros outside the raster)."""
    th, tw = shape
    x0, y0 = int(round(x / ds)), int(round(y / ds))
    out = np.zeros((th, tw, probs.shape[2]), np.float32)
    ys, xs = max(0, y0), max(0, x0)
    ye, xe = min(probs.shape[0], y0 + th), min(probs.shape[1], x0 + tw)
    if ye > ys and xe > xs:
        out[ys - y0:ye - y0, xs - x0:xe - x0] = probs[ys:ye, xs:xe]
    return out


def pseudo_label_tiles(workdir: str | Path, threshold: float = 0.9, *, predictions: str | Path | None = None,
                       val_fraction: float | None = 0.15, block_size: float | None = None, seed: int = 42,
                       allowed: Callable[[dict, tuple[int, int]], np.ndarray] | None = None,
                       class_names: list[str] | None = None) -> pd.DataFrame:
    """Pseudo-label the tiles of ``labels/manifest.csv`` from the slide predictions; make them the tile table.

    Args:
        workdir: The work folder (03's ``labels/`` and 07's ``predictions/``).
        threshold: Smallest maximum probability that gives a pseudo-label.
        predictions: Folder of ``<slide>/probabilities.tiff`` (default ``workdir/predictions``).
        val_fraction, block_size, seed: 05's pixel-split parameters (``split_by="pixels"``): their
            validation blocks get no pseudo-label. None for ``val_fraction``: no blocks kept out.
        allowed: Optional ``(tile row, (H, W)) -> bool mask`` of pixels that may get a pseudo-label
            (e.g. the training part of a benchmark image).
        class_names: Class names for the ``px_<class>`` columns (default: the columns present).

    Returns:
        The new tile table (also ``labels/manifest.csv``), with ``px_pseudo`` per tile.
    """
    from helpers.dataset import read_label_tile
    from helpers.io import read_json, write_image
    from helpers.predict import read_prediction_info, read_probabilities
    from helpers.split import TRAIN_LABELS_DIR, VAL_BLOCKS, holdout_blocks
    from helpers.steps import DONE, mark_done, step_dir

    workdir = Path(workdir)
    labels_dir = step_dir(workdir, "labels")
    table, kept = labels_dir / DONE, labels_dir / ROUND1_TABLE
    if not table.is_file():
        raise HistoUNetError(f"{table}: no tile table; run 03_refine_labels first")
    if not kept.is_file():  # the first round's table is kept once; a second call starts from it again
        shutil.copyfile(table, kept)
    df = pd.read_csv(kept)
    pred_root = Path(predictions) if predictions else workdir / "predictions"
    if block_size is None:
        block_size = float(np.median(df["w"])) / 4  # 05's default for split_by="pixels"
    cols = [c for c in df.columns if c.startswith("px_") and c != "px_unlabelled"]
    if class_names is not None:
        cols = [f"px_{n}" for n in class_names]
    blocks_file = step_dir(workdir, "model") / TRAIN_LABELS_DIR / VAL_BLOCKS  # 05's blocks added for rare classes
    try:
        extra = read_json(blocks_file) if blocks_file.is_file() else {}
    except ValueError:
        raise HistoUNetError(f"{blocks_file}: unreadable; run 05_train_model again (it rewrites it)") from None
    out_dir = labels_dir / "pseudo"
    out_dir.mkdir(parents=True, exist_ok=True)
    cache: dict[str, tuple[np.ndarray, float]] = {}
    new_paths, n_pseudo = [], []
    for i, r in enumerate(df.to_dict("records")):
        slide = str(r["slide"])
        if slide not in cache:
            pdir = pred_root / slide
            if not (pdir / "probabilities.tiff").is_file():
                raise HistoUNetError(f"{pdir}: no probabilities.tiff; run 07_infer_slide on {slide} first")
            info = read_prediction_info(pdir)
            cache = {slide: (read_probabilities(pdir), float(info["downsample"]))}  # one slide at a time
        probs, ds = cache[slide]
        lab = read_label_tile(str(workdir / r["label"]))
        tile_ds = float(r["w"]) / lab.shape[1]
        if abs(tile_ds - ds) > 0.01 * ds:  # level-0 tile sides are whole pixels
            raise HistoUNetError(f"{pred_root / slide}: predicted at downsample {ds}, tiles are {tile_ds}; "
                                 "predict at the model's resolution (07) again")
        keep_out = (holdout_blocks(slide, r["x"], r["y"], r["w"], r["h"], lab.shape, block_size, val_fraction, seed,
                                   extra.get(slide)) if val_fraction else np.zeros(lab.shape, bool))
        if allowed is not None:
            keep_out |= ~allowed(r, lab.shape)
        new = pseudo_label(lab, _tile_probs(probs, r["x"], r["y"], lab.shape, ds), threshold, keep_out)
        path = out_dir / Path(r["label"]).name
        write_image(new, path, overwrite=True)
        new_paths.append(path.relative_to(workdir).as_posix())
        n_pseudo.append(int((new != lab).sum()))
        for c, col in enumerate(cols):
            df.loc[i, col] = int((new == c + 1).sum())
        if "px_unlabelled" in df.columns:
            df.loc[i, "px_unlabelled"] = int((new == 0).sum())
    df["label"] = new_paths
    df["px_pseudo"] = n_pseudo
    mark_done(labels_dir, df)
    log.info("pseudo-labels: %d pixels in %d tiles (threshold %.2f)", sum(n_pseudo), len(df), threshold)
    return df
