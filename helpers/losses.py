"""The training loss (step 05): masked (focal) cross-entropy + soft Dice, and class weights.

Unlabelled pixels (label 0) count for nothing in those two terms. An optional third term,
the local CRF loss (``crf_weight`` > 0), reaches the unlabelled pixels too: neighbouring
pixels of similar colour are asked to share a class, so the class borders the network
draws between sparse strokes follow the tissue's colour edges (the regularised-loss idea of
weakly-supervised segmentation: Tang et al. 2018, "On regularized losses for
weakly-supervised CNN segmentation"; Obukhov et al. 2019, "Gated CRF loss").
For it the target carries the image: ``y_true`` is ``(B, H, W, 4)`` = label, then RGB in 0..1
(:func:`helpers.dataset.make_dataset` with ``image_in_target=True``).
A fourth, ``consistency_weight`` > 0, is the FixMatch term of :mod:`helpers.consistency`: the
batch then holds the weak views, then the strong views of the same tiles; the labelled terms
and the CRF term see the weak half, the consistency term compares the two halves on the
unlabelled pixels. Label 255 (:data:`helpers.consistency.IGNORE`) counts in no term.
"""

from __future__ import annotations

import numpy as np


def class_weights_from_counts(counts: np.ndarray, power: float = 0.5, max_weight: float = 10.0) -> np.ndarray:
    """Class weights ``(median_freq / freq_c) ** power`` from labelled-pixel counts (absent classes: 1).

    Normalised so the mean over present classes is 1; clipped to ``max_weight``.
    """
    counts = np.asarray(counts, float)
    w = np.ones_like(counts)
    present = counts > 0
    if present.any():
        freq = counts[present] / counts[present].sum()
        w[present] = (np.median(freq) / freq) ** power
        w[present] /= w[present].mean()
    return np.clip(w, 1.0 / max_weight, max_weight).astype(np.float32)


def _register(cls):
    import keras

    return keras.saving.register_keras_serializable(package="histo_unet")(cls)


def crf_offsets(radius: int) -> list[tuple[int, int]]:
    """Half of the ``(2r+1)^2`` window's offsets (each unordered neighbour pair once, no ``(0, 0)``)."""
    return [(dy, dx) for dy in range(0, radius + 1) for dx in range(-radius, radius + 1) if dy > 0 or dx > 0]


def local_crf_loss(probs, image, sigma_rgb: float = 0.1, sigma_xy: float = 3.0, radius: int = 4,
                   downscale: int = 2):
    """Local CRF (Potts) loss of a softmax map against its image (TensorFlow tensors).

    For every pixel pair ``(i, j)`` within ``radius`` pixels (after average-pooling both by
    ``downscale``) the weight is ``exp(-|I_i - I_j|^2 / 2 sigma_rgb^2 - |i - j|^2 / 2 sigma_xy^2)`` and
    the cost the probability that the two pixels get different classes, ``1 - <S_i, S_j>``. The
    sum is divided by the sum of the spatial weights and the number of pixels, so the loss is the
    (colour-weighted) share of disagreeing neighbours, between 0 and 1: 0 for a constant map, and
    a map whose borders follow colour edges costs less than one whose borders cut a uniform area.

    Args:
        probs: ``(B, H, W, C)`` softmax.
        image: ``(B, H, W, 3)`` the network's input image, RGB in 0..1.
        sigma_rgb: Colour scale (0..1 units): pairs further apart in colour count less.
        sigma_xy: Spatial scale in pooled pixels.
        radius: Window radius in pooled pixels.
        downscale: Average-pooling factor before the pairs are formed (cost and reach).
    """
    import tensorflow as tf

    probs = tf.cast(probs, tf.float32)
    image = tf.cast(image, tf.float32)
    if downscale > 1:
        probs = tf.nn.avg_pool2d(probs, downscale, downscale, "VALID")
        image = tf.nn.avg_pool2d(image, downscale, downscale, "VALID")
    h, w = tf.shape(probs)[1], tf.shape(probs)[2]
    total = tf.constant(0.0)
    norm = 0.0
    for dy, dx in crf_offsets(radius):
        a_x0, b_x0 = (0, dx) if dx >= 0 else (-dx, 0)
        wd = w - abs(dx)
        pa, pb = probs[:, :h - dy, a_x0:a_x0 + wd], probs[:, dy:, b_x0:b_x0 + wd]
        ia, ib = image[:, :h - dy, a_x0:a_x0 + wd], image[:, dy:, b_x0:b_x0 + wd]
        spatial = float(np.exp(-(dy * dy + dx * dx) / (2.0 * sigma_xy ** 2)))
        colour = tf.exp(-tf.reduce_sum(tf.square(ia - ib), -1) / (2.0 * sigma_rgb ** 2))
        differ = 1.0 - tf.reduce_sum(pa * pb, -1)
        total = total + spatial * tf.reduce_mean(colour * differ)
        norm += spatial
    return total / norm


def make_loss(n_classes: int, ce_weight: float = 1.0, dice_weight: float = 1.0, focal_gamma: float = 0.0,
              class_weights: list[float] | None = None, crf_weight: float = 0.0, crf_sigma_rgb: float = 0.1,
              crf_sigma_xy: float = 3.0, crf_radius: int = 4, crf_downscale: int = 2,
              consistency_weight: float = 0.0, consistency_threshold: float = 0.9,
              consistency_balance: str = "none", consistency_prior: list[float] | None = None):
    """The sparse-label loss: (focal) cross-entropy + soft Dice over **labelled pixels only**.

    ``y_true`` holds label values (0 unlabelled, 1..N); ``y_pred`` the softmax (N channels).
    Pixels with label 0 are masked out of both terms, so any prediction there leaves them
    unchanged. ``class_weights`` weight both terms per class. ``crf_weight`` > 0 adds
    :func:`local_crf_loss` over all pixels (labelled or not); ``y_true`` must then carry the
    image in channels 1..3 (RGB 0..1). ``consistency_weight`` > 0 adds
    :func:`helpers.consistency.consistency_loss`; the batch must then be weak views then strong
    views (:func:`helpers.consistency.pair_views`), with ``consistency_balance`` and
    ``consistency_prior`` passed on to it.

    Returns:
        A ``keras.losses.Loss`` (serialisable, so ``last.keras`` resumes with its optimizer).
    """
    return _loss_class()(n_classes=n_classes, ce_weight=ce_weight, dice_weight=dice_weight,
                         focal_gamma=focal_gamma, class_weights=class_weights, crf_weight=crf_weight,
                         crf_sigma_rgb=crf_sigma_rgb, crf_sigma_xy=crf_sigma_xy, crf_radius=crf_radius,
                         crf_downscale=crf_downscale, consistency_weight=consistency_weight,
                         consistency_threshold=consistency_threshold,
                         consistency_balance=consistency_balance, consistency_prior=consistency_prior)


_LOSS_CLS = None


def _loss_class():
    global _LOSS_CLS
    if _LOSS_CLS is not None:
        return _LOSS_CLS
    import keras
    import tensorflow as tf

    @_register
    class SparseLabelLoss(keras.losses.Loss):
        def __init__(self, n_classes: int, ce_weight: float = 1.0, dice_weight: float = 1.0,
                     focal_gamma: float = 0.0, class_weights: list[float] | None = None,
                     crf_weight: float = 0.0, crf_sigma_rgb: float = 0.1, crf_sigma_xy: float = 3.0,
                     crf_radius: int = 4, crf_downscale: int = 2, consistency_weight: float = 0.0,
                     consistency_threshold: float = 0.9, consistency_balance: str = "none",
                     consistency_prior: list[float] | None = None, name: str = "sparse_label_loss", **kwargs):
            kwargs.pop("reduction", None)
            super().__init__(name=name, reduction="sum_over_batch_size", **kwargs)
            self.n_classes = int(n_classes)
            self.ce_weight = float(ce_weight)
            self.dice_weight = float(dice_weight)
            self.focal_gamma = float(focal_gamma)
            self.class_weights = None if class_weights is None else [float(v) for v in class_weights]
            self.crf_weight = float(crf_weight)
            self.crf_sigma_rgb = float(crf_sigma_rgb)
            self.crf_sigma_xy = float(crf_sigma_xy)
            self.crf_radius = int(crf_radius)
            self.crf_downscale = int(crf_downscale)
            self.consistency_weight = float(consistency_weight)
            self.consistency_threshold = float(consistency_threshold)
            self.consistency_balance = str(consistency_balance)
            self.consistency_prior = None if consistency_prior is None else [float(v) for v in consistency_prior]

        def call(self, y_true, y_pred):
            y_pred = tf.clip_by_value(tf.cast(y_pred, tf.float32), 1e-7, 1.0 - 1e-7)
            image = None
            if y_true.shape.rank == y_pred.shape.rank and y_true.shape[-1] == 4:  # label + RGB (crf term)
                image = tf.cast(y_true[..., 1:4], tf.float32)
            labels = tf.cast(tf.round(tf.cast(y_true, tf.float32)), tf.int32)
            if labels.shape.rank == y_pred.shape.rank:
                labels = labels[..., 0]
            strong = None
            if self.consistency_weight:  # weak views, then strong views of the same tiles
                half = tf.shape(y_pred)[0] // 2
                y_pred, strong, labels = y_pred[:half], y_pred[half:], labels[:half]
                image = None if image is None else image[:half]
            mask = tf.cast((labels > 0) & (labels <= self.n_classes), tf.float32)[..., None]
            onehot = tf.one_hot(labels - 1, self.n_classes, dtype=tf.float32) * mask  # label 0 -> all zeros
            cw = tf.constant(self.class_weights if self.class_weights else [1.0] * self.n_classes, tf.float32)
            total = tf.constant(0.0)
            if self.ce_weight:
                pt = tf.reduce_sum(onehot * y_pred, axis=-1)
                w_px = tf.reduce_sum(onehot * cw, axis=-1)
                ce = -tf.math.log(tf.clip_by_value(pt, 1e-7, 1.0))
                if self.focal_gamma:
                    ce = ce * tf.pow(1.0 - pt, self.focal_gamma)
                ce = tf.reduce_sum(w_px * ce) / tf.maximum(tf.reduce_sum(w_px), 1e-6)
                total = total + self.ce_weight * ce
            if self.dice_weight:
                axes = [0, 1, 2]
                inter = tf.reduce_sum(onehot * y_pred, axis=axes)
                denom = tf.reduce_sum(mask * y_pred, axis=axes) + tf.reduce_sum(onehot, axis=axes)
                dice = (2.0 * inter + 1.0) / (denom + 1.0)
                dice_loss = tf.reduce_sum(cw * (1.0 - dice)) / tf.reduce_sum(cw)
                total = total + self.dice_weight * dice_loss
            if self.crf_weight:
                if image is None:
                    raise ValueError("crf_weight > 0 needs the image in the target: make_dataset(image_in_target=True)")
                total = total + self.crf_weight * local_crf_loss(y_pred, image, self.crf_sigma_rgb, self.crf_sigma_xy,
                                                                 self.crf_radius, self.crf_downscale)
            if self.consistency_weight:
                from helpers.consistency import consistency_loss

                total = total + self.consistency_weight * consistency_loss(y_pred, strong, labels,
                                                                           self.consistency_threshold,
                                                                           self.consistency_balance,
                                                                           self.consistency_prior)
            return total

        def get_config(self):
            return {"name": self.name, "n_classes": self.n_classes, "ce_weight": self.ce_weight,
                    "dice_weight": self.dice_weight, "focal_gamma": self.focal_gamma,
                    "class_weights": self.class_weights, "crf_weight": self.crf_weight,
                    "crf_sigma_rgb": self.crf_sigma_rgb, "crf_sigma_xy": self.crf_sigma_xy,
                    "crf_radius": self.crf_radius, "crf_downscale": self.crf_downscale,
                    "consistency_weight": self.consistency_weight,
                    "consistency_threshold": self.consistency_threshold,
                    "consistency_balance": self.consistency_balance,
                    "consistency_prior": self.consistency_prior}

    _LOSS_CLS = SparseLabelLoss
    return _LOSS_CLS

