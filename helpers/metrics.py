"""Segmentation metrics on labelled pixels: one confusion matrix, IoU, Dice (steps 05 and 08).

Training's validation IoU (05) and the evaluation (08) both come from here, by one rule:

* the confusion matrix counts ``[reference label, predicted label]`` over labels
  ``0..N`` (label 0: unlabelled / nothing predicted); a label above ``N`` is an error
  (wrong class map);
* only **reference-labelled** pixels count: row 0 is ignored, so sparse labels measure
  only what was labelled; a predicted 0 counts as a miss for the reference class;
* per class ``c``: ``IoU = TP / (TP + FP + FN)``, ``Dice = 2 TP / (2 TP + FP + FN)``;
  NaN (undefined) for a class absent from both reference and prediction;
* mean IoU / Dice: over the classes the reference labels (``ref_px > 0``);
* the headline figure is the IoU of the class map's headline class (``role: headline``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from helpers.config import ClassMap
from helpers.errors import ClassMapError, ParameterError


def confusion_matrix(reference: np.ndarray, prediction: np.ndarray, n_classes: int) -> np.ndarray:
    """Pixel counts ``[reference label, predicted label]`` over labels ``0..n_classes``.

    Row 0 (reference unlabelled) is kept for completeness but ignored by the metrics.
    Labels above ``n_classes`` in either image raise an error (wrong class map).

    Args:
        reference: Integer label image (0 = unlabelled), any shape.
        prediction: Integer label image of the same shape (0 = nothing predicted).
        n_classes: Number of classes (labels ``1..n_classes``).

    Returns:
        ``(n_classes + 1, n_classes + 1)`` int64 array.
    """
    reference = np.asarray(reference)
    prediction = np.asarray(prediction)
    if reference.shape != prediction.shape:
        raise ParameterError(
            f"reference {reference.shape} and prediction {prediction.shape} differ in shape; "
            "read both at the same downsample"
        )
    n = n_classes + 1
    for name, img in (("reference", reference), ("prediction", prediction)):
        if img.size and (int(img.max()) >= n or int(img.min()) < 0):
            bad = int(img.max()) if int(img.max()) >= n else int(img.min())
            raise ParameterError(
                f"{name} holds label {bad} but the class map has {n_classes} classes; "
                "pass the class map the labels were made with"
            )
    idx = reference.astype(np.int64).ravel() * n + prediction.astype(np.int64).ravel()
    return np.bincount(idx, minlength=n * n).reshape(n, n)


def iou_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """Per-class IoU ``TP / (TP + FP + FN)`` of labels ``1..N`` over reference-labelled pixels.

    Args:
        confusion: ``(N + 1, N + 1)`` matrix from :func:`confusion_matrix`.

    Returns:
        ``(N,)`` floats; NaN for a class absent from both reference and prediction.
    """
    cm = np.asarray(confusion, float)[1:, :]  # reference labelled only
    tp = np.diag(cm[:, 1:])
    union = cm.sum(axis=1) + cm[:, 1:].sum(axis=0) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)


def class_metrics(confusion: np.ndarray, class_map: ClassMap) -> pd.DataFrame:
    """Per-class IoU, Dice, precision and recall from a confusion matrix.

    Only reference-labelled pixels count (row 0 is dropped). Classes absent from both
    the reference and the prediction get NaN (undefined), not 0 or 1.

    Returns:
        One row per class: ``label, class, iou, dice, precision, recall, ref_px, pred_px, tp``.
    """
    cm = np.asarray(confusion, dtype=np.int64)[1:, :]  # reference labelled only
    iou = iou_from_confusion(confusion)
    rows = []
    for c in class_map.classes:
        tp = int(cm[c.label - 1, c.label])
        ref_px = int(cm[c.label - 1, :].sum())
        pred_px = int(cm[:, c.label].sum())
        fn, fp = ref_px - tp, pred_px - tp
        union = tp + fp + fn
        rows.append({
            "label": c.label,
            "class": c.name,
            "iou": float(iou[c.label - 1]),
            "dice": 2 * tp / (2 * tp + fp + fn) if union else np.nan,
            "precision": tp / pred_px if pred_px else np.nan,
            "recall": tp / ref_px if ref_px else np.nan,
            "ref_px": ref_px,
            "pred_px": pred_px,
            "tp": tp,
        })
    return pd.DataFrame(rows)


def headline_name(class_map: ClassMap) -> str | None:
    """Name of the map's headline class (``role: headline``), None if no class has the role."""
    try:
        return class_map.headline.name
    except ClassMapError:
        return None


def summary_figures(metrics: pd.DataFrame, class_map: ClassMap, confusion: np.ndarray | None = None,
                    headline: str | None = None) -> dict[str, float]:
    """Headline numbers: headline-class IoU/Dice, mean IoU/Dice over classes present, pixel accuracy.

    The keys ``tumor_iou`` / ``tumor_dice`` hold the headline class's figures (the
    map's ``role: headline`` class unless ``headline`` names another).

    Args:
        metrics: From :func:`class_metrics`.
        class_map: The classes (their headline role).
        confusion: Adds ``pixel_accuracy`` and ``labelled_px`` when given.
        headline: Class name to lead with; None = the map's headline class.
    """
    name = headline or headline_name(class_map)
    present = metrics[metrics["ref_px"] > 0]
    head = metrics[metrics["class"] == name]
    out = {
        "tumor_iou": float(head["iou"].iloc[0]) if len(head) else float("nan"),
        "tumor_dice": float(head["dice"].iloc[0]) if len(head) else float("nan"),
        "mean_iou": float(present["iou"].mean()) if len(present) else float("nan"),
        "mean_dice": float(present["dice"].mean()) if len(present) else float("nan"),
    }
    if confusion is not None:
        cm = np.asarray(confusion)[1:, :]
        total = cm.sum()
        out["pixel_accuracy"] = float(np.trace(cm[:, 1:]) / total) if total else float("nan")
        out["labelled_px"] = int(total)
    return out


def iou_scores(confusion: np.ndarray, class_map: ClassMap, headline: str | None = None) -> dict[str, float]:
    """``iou_<Name>`` per class, ``mean_iou`` and ``headline_iou`` (training's validation figures).

    Same numbers as :func:`class_metrics` / :func:`summary_figures` (08) on the same pixels.
    """
    metrics = class_metrics(confusion, class_map)
    out = {f"iou_{n}": float(v) for n, v in zip(metrics["class"], metrics["iou"])}
    summary = summary_figures(metrics, class_map, headline=headline)
    out["mean_iou"] = summary["mean_iou"]
    # no headline class: the checkpoint choice falls back to the mean (as training always did)
    out["headline_iou"] = summary["tumor_iou"] if np.isfinite(summary["tumor_iou"]) or (
        (headline or headline_name(class_map)) in class_map.names) else summary["mean_iou"]
    return out


def labelled_iou(truth: np.ndarray, pred: np.ndarray, class_map: ClassMap,
                 headline: str | None = None) -> dict[str, float]:
    """:func:`iou_scores` of one label image pair (label 0 in ``truth`` ignored)."""
    return iou_scores(confusion_matrix(truth, pred, class_map.n_classes), class_map, headline)
