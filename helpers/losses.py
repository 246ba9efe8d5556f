"""The training loss (step 05): masked (focal) cross-entropy + soft Dice, and class weights.

Unlabelled pixels (label 0) count for nothing: they are masked out of both terms.
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


def make_loss(n_classes: int, ce_weight: float = 1.0, dice_weight: float = 1.0, focal_gamma: float = 0.0,
              class_weights: list[float] | None = None):
    """The sparse-label loss: (focal) cross-entropy + soft Dice over **labelled pixels only**.

    ``y_true`` holds label values (0 unlabelled, 1..N); ``y_pred`` the softmax (N channels).
    Pixels with label 0 are masked out of both terms, so any prediction there leaves the
    loss unchanged. ``class_weights`` weight both terms per class.

    Returns:
        A ``keras.losses.Loss`` (serialisable, so ``last.keras`` resumes with its optimizer).
    """
    return _loss_class()(n_classes=n_classes, ce_weight=ce_weight, dice_weight=dice_weight,
                         focal_gamma=focal_gamma, class_weights=class_weights)


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
                     name: str = "sparse_label_loss", **kwargs):
            kwargs.pop("reduction", None)
            super().__init__(name=name, reduction="sum_over_batch_size", **kwargs)
            self.n_classes = int(n_classes)
            self.ce_weight = float(ce_weight)
            self.dice_weight = float(dice_weight)
            self.focal_gamma = float(focal_gamma)
            self.class_weights = None if class_weights is None else [float(v) for v in class_weights]

        def call(self, y_true, y_pred):
            y_pred = tf.clip_by_value(tf.cast(y_pred, tf.float32), 1e-7, 1.0 - 1e-7)
            labels = tf.cast(y_true, tf.int32)
            if labels.shape.rank == y_pred.shape.rank:
                labels = labels[..., 0]
            mask = tf.cast(labels > 0, tf.float32)[..., None]
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
            return total

        def get_config(self):
            return {"name": self.name, "n_classes": self.n_classes, "ce_weight": self.ce_weight,
                    "dice_weight": self.dice_weight, "focal_gamma": self.focal_gamma,
                    "class_weights": self.class_weights}

    _LOSS_CLS = SparseLabelLoss
    return _LOSS_CLS

