"""Consistency training on the unlabelled pixels (step 05, ``consistency_weight`` > 0).

Sparse strokes label about a tenth of the tissue; the loss of :mod:`helpers.losses` sees
nothing of the rest. This module lets the unlabelled pixels teach too, in the way of
FixMatch (Sohn et al. 2020) carried over to segmentation: every training tile goes through
the network twice in one step, once as the usual (geometrically augmented) *weak* view and
once more as a *strong* view: the same geometry, with strong colour, blur and noise on top.
Where the weak view's prediction of an unlabelled pixel is confident (max probability at
least ``consistency_threshold``), its class becomes the target of the strong view's
prediction at that pixel (cross-entropy, no gradient through the weak view). The term is
divided by the number of unlabelled pixels, so it grows as the network becomes confident.

Label value :data:`IGNORE` (255) marks pixels that take part in neither term: 05's
validation blocks (their labels were removed from the training labels, but the validation
pixels should not be fitted to the network's own guesses either) and, with
``consistency_region``, every pixel outside the given box of its slide (the real-data
benchmark passes the training half, so the held-out half is never trained on).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from helpers.errors import ParameterError

log = logging.getLogger(__name__)

#: Label value of pixels outside both loss terms (validation blocks, outside ``consistency_region``).
IGNORE = 255


def read_region(region: str | Path, parameter: str = "consistency_region") -> dict[str, list[float]]:
    """``{slide: [x0, y0, x1, y1]}`` (level-0 px) from a JSON file, or a one-line ParameterError.

    ``parameter`` names the notebook parameter in the error (05's ``consistency_region`` or ``ssl_region``).
    """
    try:
        boxes = json.loads(Path(region).read_text())
        if not isinstance(boxes, dict) or not all(len(v) == 4 for v in boxes.values()):
            raise ValueError("not a {slide: [x0, y0, x1, y1]} mapping")
    except (OSError, ValueError, TypeError) as exc:
        raise ParameterError(f"{parameter}={region}: not a readable JSON file of boxes ({exc}); "
                             "write {slide: [x0, y0, x1, y1]} in level-0 px, or set it to None") from None
    return {str(k): [float(v) for v in b] for k, b in boxes.items()}


def box_in_tile(row: dict, box: list[float], ds: float, width: int, height: int) -> tuple[int, int, int, int]:
    """A level-0 box in a tile's pixels (``x``, ``y`` of ``row``; ``ds`` level-0 px per tile px), clipped to it.

    Returns ``(c0, r0, c1, r1)``; empty when ``c1 <= c0`` or ``r1 <= r0``.
    """
    x0, y0, x1, y1 = box
    return (max(0, math.ceil((x0 - row["x"]) / ds)), max(0, math.ceil((y0 - row["y"]) / ds)),
            min(width, math.floor((x1 - row["x"]) / ds)), min(height, math.floor((y1 - row["y"]) / ds)))


def region_mask(row: dict, shape: tuple[int, int], boxes: dict[str, list[float]] | None) -> np.ndarray:
    """Pixels of a tile (``slide``, ``x``, ``y``, ``w``, ``h``) inside its slide's box; all True without boxes.

    A slide missing from ``boxes`` has no pixel inside.
    """
    inside = np.ones(shape, bool)
    if boxes is None:
        return inside
    box = boxes.get(str(row["slide"]))
    if box is None:
        return np.zeros(shape, bool)
    c0, r0, c1, r1 = box_in_tile(row, box, float(row["w"]) / shape[1], shape[1], shape[0])
    inside[:] = False
    if c1 > c0 and r1 > r0:
        inside[r0:r1, c0:c1] = True
    return inside


def consistency_labels(tiles: pd.DataFrame, out_dir: str | Path, region: str | Path | None = None,
                       original_col: str = "label_path_orig") -> list[str]:
    """Training label tiles with :data:`IGNORE` where neither loss term may look.

    For each row: the training labels (``label_path``), with IGNORE on pixels labelled in the
    original labels (``original_col``) but not in the training labels (05's validation
    blocks), and on unlabelled pixels outside the slide's box of ``region``.

    Returns:
        The new label paths (``out_dir/<tile_id>-labelled.png``), in row order.
    """
    from helpers.dataset import read_label_tile
    from helpers.io import write_image

    boxes = read_region(region) if region else None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, ignored, total = [], 0, 0
    for r in tiles.to_dict("records"):
        lab = read_label_tile(r["label_path"])
        out = lab.copy()
        orig = r.get(original_col)
        if isinstance(orig, str) and orig != r["label_path"]:
            full = read_label_tile(orig)
            if full.shape == lab.shape:
                out[(full > 0) & (lab == 0)] = IGNORE
        out[(lab == 0) & ~region_mask(r, lab.shape, boxes)] = IGNORE
        path = out_dir / f"{r['tile_id']}-labelled.png"
        write_image(out, path, overwrite=True)  # derived from the training labels: rewritten on resume
        paths.append(str(path))
        ignored += int((out == IGNORE).sum())
        total += out.size
    log.info("consistency: %.1f %% of the training tiles' pixels ignored (validation blocks%s)",
             100.0 * ignored / max(total, 1), ", outside the region" if boxes else "")
    return paths


def strong_view(images):
    """The strong view of a uint8-valued ``(B, H, W, 3)`` batch (TensorFlow): colour, blur and noise.

    Per tile: brightness +-0.15, contrast 0.6-1.4, saturation 0.5-1.5, hue +-0.04, a blend
    towards a 5x5 Gaussian blur (sigma 1 px) by a random share, and Gaussian noise of sd
    0-0.04 (RGB 0..1). Geometry is untouched, so the weak view's prediction lines up.

    Returns:
        A float32 batch in 0..255 (what :func:`helpers.model.preprocess` takes).
    """
    import tensorflow as tf

    x = tf.cast(images, tf.float32) / 255.0
    b = tf.shape(x)[0]

    def u(lo, hi):  # one factor per tile (op seeds from the global seed of 05's set_seeds)
        return tf.random.uniform(tf.stack([b, 1, 1, 1]), lo, hi)

    x = x + u(-0.15, 0.15)
    mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
    x = (x - mean) * u(0.6, 1.4) + mean
    grey = tf.reduce_mean(x, axis=-1, keepdims=True)
    x = (x - grey) * u(0.5, 1.5) + grey
    x = tf.clip_by_value(x, 0.0, 1.0)
    x = tf.map_fn(lambda im: tf.image.random_hue(im, 0.04), x)
    g = np.exp(-np.arange(-2, 3) ** 2 / 2.0)
    k2 = np.outer(g, g) / np.outer(g, g).sum()
    kernel = tf.constant(np.repeat(k2[:, :, None, None], 3, axis=2), tf.float32)
    blurred = tf.nn.depthwise_conv2d(tf.pad(x, [[0, 0], [2, 2], [2, 2], [0, 0]], "REFLECT"), kernel,
                                     [1, 1, 1, 1], "VALID")
    x = x + (blurred - x) * u(0.0, 1.0)
    x = x + tf.random.normal(tf.shape(x)) * u(0.0, 0.04)
    return tf.clip_by_value(x, 0.0, 1.0) * 255.0


def pair_views(x, y):
    """``(weak; strong)`` stacked along the batch axis, the target repeated: the loss splits them in half."""
    import tensorflow as tf

    return tf.concat([tf.cast(x, tf.float32), strong_view(x)], 0), tf.concat([y, y], 0)


#: Values of ``consistency_balance`` (05): how the term keeps a majority class from swallowing a minority.
BALANCES = ("none", "align", "class")


def consistency_loss(probs_weak, probs_strong, labels, threshold: float = 0.9, balance: str = "none",
                     prior=None):
    """FixMatch term on the unlabelled pixels (label 0) of the weak view (TensorFlow).

    Args:
        probs_weak: ``(B, H, W, C)`` softmax of the weak views (no gradient flows through it).
        probs_strong: ``(B, H, W, C)`` softmax of the strong views.
        labels: ``(B, H, W)`` int labels: 0 unlabelled, 1..C classes, :data:`IGNORE` neither.
        threshold: Weak-view confidence from which a pixel's argmax becomes the strong view's target.
        balance: ``"none"``; ``"align"``: distribution alignment (ReMixMatch, Berthelot et al.
            2020): the weak probabilities are multiplied by ``prior`` / (their mean over the
            batch's unlabelled pixels) and renormalised before the threshold, so a class the
            network over-predicts loses confidence and one it under-predicts gains;
            ``"class"``: every class among the confident targets weighs the same in total
            (a target pixel of class c weighs ``n / (k n_c)``: n confident pixels, k classes
            present, n_c of them of class c).
        prior: ``(C,)`` class shares of the labelled training pixels (``"align"`` only).

    Returns:
        Cross-entropy summed over the confident unlabelled pixels, divided by all unlabelled pixels.
    """
    import tensorflow as tf

    pw = tf.stop_gradient(tf.cast(probs_weak, tf.float32))
    ps = tf.clip_by_value(tf.cast(probs_strong, tf.float32), 1e-7, 1.0)
    unlabelled = tf.cast(tf.equal(labels, 0), tf.float32)
    n_unlabelled = tf.maximum(tf.reduce_sum(unlabelled), 1.0)
    if balance == "align":
        if prior is None:
            raise ValueError("consistency balance 'align' needs the labelled class shares (prior)")
        mean = tf.reduce_sum(pw * unlabelled[..., None], [0, 1, 2]) / n_unlabelled
        pw = pw * tf.constant(prior, tf.float32) / tf.maximum(mean, 1e-6)
        pw = pw / tf.maximum(tf.reduce_sum(pw, -1, keepdims=True), 1e-12)
    elif balance not in BALANCES:
        raise ValueError(f"consistency balance {balance!r}: use one of {BALANCES}")
    confident = tf.cast(tf.reduce_max(pw, -1) >= threshold, tf.float32) * unlabelled
    target = tf.one_hot(tf.argmax(pw, -1), tf.shape(pw)[-1], dtype=tf.float32)
    ce = -tf.math.log(tf.reduce_sum(target * ps, -1))
    weight = confident
    if balance == "class":
        per_class = tf.reduce_sum(target * confident[..., None], [0, 1, 2])  # confident targets per class
        present = tf.maximum(tf.reduce_sum(tf.cast(per_class > 0, tf.float32)), 1.0)
        w_class = tf.math.divide_no_nan(tf.reduce_sum(per_class), present * per_class)
        weight = confident * tf.reduce_sum(target * w_class, -1)
    return tf.reduce_sum(weight * ce) / n_unlabelled
