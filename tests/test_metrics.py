"""helpers.metrics: one confusion matrix and IoU for training's validation (05) and the evaluation (08)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers import evaluate as ev
from helpers import metrics as M
from helpers.errors import ParameterError


def _random_pair(seed: int, shape=(40, 40), n_classes: int = 4):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, n_classes + 1, shape).astype(np.uint8)  # 0: unlabelled
    pred = rng.integers(1, n_classes + 1, shape).astype(np.uint8)
    # make the prediction right on ~60 % of the pixels, so the IoUs are not all tiny
    right = rng.random(shape) < 0.6
    pred[right & (truth > 0)] = truth[right & (truth > 0)]
    return truth, pred


def test_unlabelled_reference_pixels_are_ignored(class_map):
    truth, pred = _random_pair(0)
    before = M.labelled_iou(truth, pred, class_map)
    pred2 = pred.copy()
    pred2[truth == 0] = 1 + (pred2[truth == 0] % 4)  # change only where nobody labelled
    assert M.labelled_iou(truth, pred2, class_map) == before
    pred3 = pred.copy()
    i = np.argwhere(truth == 2)[0]
    pred3[tuple(i)] = 3 if pred3[tuple(i)] != 3 else 4  # one labelled pixel changes: the score moves
    assert M.labelled_iou(truth, pred3, class_map)["iou_Tumor"] != before["iou_Tumor"]


def test_predicted_zero_is_a_miss_and_labels_beyond_the_map_raise(class_map):
    truth = np.array([2, 2, 2, 2])
    assert M.labelled_iou(truth, np.array([2, 2, 2, 0]), class_map)["iou_Tumor"] == pytest.approx(0.75)
    with pytest.raises(ParameterError, match="class map"):
        M.confusion_matrix(truth, np.array([2, 2, 2, 5]), 4)
    with pytest.raises(ParameterError, match="class map"):
        M.confusion_matrix(np.array([9, 2, 2, 2]), truth, 4)


def test_headline_and_mean_follow_the_class_map(class_map):
    truth, pred = _random_pair(3)
    cm = M.confusion_matrix(truth, pred, 4)
    scores = M.iou_scores(cm, class_map)
    assert scores["headline_iou"] == scores[f"iou_{class_map.headline.name}"]
    assert M.iou_scores(cm, class_map, headline="Stroma")["headline_iou"] == scores["iou_Stroma"]
    # mean over the classes the reference labels: a class absent from the truth is left out
    truth[truth == 4] = 0
    s = M.labelled_iou(truth, pred, class_map)
    assert s["mean_iou"] == pytest.approx(np.mean([s["iou_Background"], s["iou_Tumor"], s["iou_Stroma"]]))


def test_training_validation_and_evaluation_give_the_same_iou(class_map, tmp_path: Path):
    """05's Trainer.validate and 08's evaluate_labels score the same pixels identically."""
    from helpers.train import TrainConfig, Trainer

    tiles = [_random_pair(s, (32, 32)) for s in range(3)]
    trainer = Trainer(tmp_path, TrainConfig(), class_map, overwrite=False, resume=False)
    trainer.val_images = [np.zeros((32, 32, 3), np.uint8)] * len(tiles)
    trainer.val_labels = [t for t, _ in tiles]
    trainer.predict_labels = lambda images, batch_size=None: [p for _, p in tiles]
    val = trainer.validate()
    # 08 on the same pixels: the tiles side by side as one "slide"
    res = ev.evaluate_labels(np.hstack([p for _, p in tiles]), np.hstack([t for t, _ in tiles]), class_map)
    m = res.metrics.set_index("class")
    for name in class_map.names:
        assert val[f"iou_{name}"] == pytest.approx(m.loc[name, "iou"], nan_ok=True)
    assert val["mean_iou"] == pytest.approx(res.summary["mean_iou"])
    assert val["headline_iou"] == pytest.approx(res.summary["tumor_iou"])
    assert 0.2 < val["headline_iou"] < 1  # a real, non-trivial value
