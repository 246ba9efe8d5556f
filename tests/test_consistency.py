"""Consistency (FixMatch) term of 05: the loss, the paired views, the IGNORE labels, a short run."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from helpers import consistency as C
from helpers import losses as L
from helpers import train as T
from helpers.errors import ParameterError


def _softmax(rng, shape, scale=1.0):
    z = rng.normal(size=shape) * scale
    e = np.exp(z - z.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def test_consistency_loss_uses_confident_unlabelled_pixels_only():
    rng = np.random.default_rng(0)
    weak = _softmax(rng, (1, 8, 8, 4), scale=0.1)  # undecided everywhere
    weak[0, :4, :, :] = [0.97, 0.01, 0.01, 0.01]  # confident class 1 in the top half
    labels = np.zeros((1, 8, 8), np.int32)
    labels[0, 0, :] = 2  # a labelled row: not this term's business
    labels[0, 1, :] = C.IGNORE  # neither term
    agree = weak.copy()
    disagree = weak.copy()
    disagree[0, :4] = [0.01, 0.97, 0.01, 0.01]
    v_agree = float(C.consistency_loss(weak, agree, labels, 0.9))
    v_dis = float(C.consistency_loss(weak, disagree, labels, 0.9))
    # 2 confident unlabelled rows of 8 (rows 2, 3) out of 6 unlabelled rows
    assert v_agree == pytest.approx(-np.log(0.97) * 16 / 48, rel=1e-4)
    assert v_dis == pytest.approx(-np.log(0.01) * 16 / 48, rel=1e-4)
    changed = disagree.copy()
    changed[0, 4:] = _softmax(rng, (4, 8, 4))  # below the threshold in the weak view: no target there
    assert float(C.consistency_loss(weak, changed, labels, 0.9)) == pytest.approx(v_dis, rel=1e-5)
    assert float(C.consistency_loss(weak, disagree, labels, 0.99)) == 0.0  # nothing confident enough
    import tensorflow as tf

    w, s = tf.Variable(weak), tf.Variable(disagree)
    with tf.GradientTape() as tape:
        value = C.consistency_loss(w, s, labels, 0.9)
    gw, gs = tape.gradient(value, [w, s])
    assert gw is None or float(tf.reduce_sum(tf.abs(gw))) == 0.0  # the weak view is the teacher
    assert float(tf.reduce_sum(tf.abs(gs[0, 2:4]))) > 0 and float(tf.reduce_sum(tf.abs(gs[0, :2]))) == 0.0


def test_the_loss_splits_a_paired_batch():
    rng = np.random.default_rng(1)
    p = _softmax(rng, (2, 16, 16, 4), scale=4.0)
    lab = np.zeros((2, 16, 16), np.float32)
    lab[:, 3:7, 3:7] = 3
    plain = L.make_loss(4)
    paired = L.make_loss(4, consistency_weight=2.0, consistency_threshold=0.8)
    strong = _softmax(rng, (2, 16, 16, 4))
    both_p, both_y = np.concatenate([p, strong]), np.concatenate([lab, lab])
    expected = float(plain(lab, p)) + 2.0 * float(C.consistency_loss(p, strong, lab.astype(np.int32), 0.8))
    assert float(paired(both_y, both_p)) == pytest.approx(expected, rel=1e-5)
    assert float(C.consistency_loss(p, strong, lab.astype(np.int32), 0.8)) > 0
    ignored = lab.copy()
    ignored[:, 10:, 10:] = C.IGNORE
    assert float(plain(ignored, p)) == pytest.approx(float(plain(lab, p)), rel=1e-6)  # 255 is not a class
    restored = type(paired).from_config(paired.get_config())
    assert restored.consistency_weight == 2.0 and restored.consistency_threshold == 0.8


def _two_class_batch():
    """Unlabelled 8x8: 48 pixels confidently class 1 (majority), 16 confidently class 2; all equally wrong in the strong view."""
    weak = np.full((1, 8, 8, 4), 0.01, np.float32)
    weak[0, :6, :, 0] = 0.97
    weak[0, 6:, :, 1] = 0.97
    strong = np.full((1, 8, 8, 4), 0.25, np.float32)  # -log(0.25) everywhere
    return weak, strong, np.zeros((1, 8, 8), np.int32)


def test_class_balance_weighs_each_predicted_class_the_same():
    weak, strong, labels = _two_class_batch()
    ce = -np.log(0.25)
    assert float(C.consistency_loss(weak, strong, labels, 0.9)) == pytest.approx(ce, rel=1e-5)
    balanced = float(C.consistency_loss(weak, strong, labels, 0.9, balance="class"))
    assert balanced == pytest.approx(ce, rel=1e-5)  # the total is kept, only shared out differently
    import tensorflow as tf

    s = tf.Variable(strong)
    grads = {}
    for mode in ("none", "class"):
        with tf.GradientTape() as tape:
            value = C.consistency_loss(weak, s, labels, 0.9, balance=mode)
        g = tape.gradient(value, s).numpy()
        grads[mode] = abs(g[0, 7, 0, 1]) / abs(g[0, 0, 0, 0])  # minority pixel's pull / majority pixel's
    assert grads["none"] == pytest.approx(1.0, rel=1e-4)
    assert grads["class"] == pytest.approx(3.0, rel=1e-4)  # 48 vs 16 pixels: each class weighs half


def test_distribution_alignment_moves_confidence_to_the_labelled_shares():
    weak, strong, labels = _two_class_batch()
    weak[0, 6:] = [0.12, 0.86, 0.01, 0.01]  # the minority is predicted, but below the threshold
    assert float(C.consistency_loss(weak, strong, labels, 0.9)) == pytest.approx(-np.log(0.25) * 48 / 64, rel=1e-5)
    # the network predicts class 1 on ~77 % of the unlabelled pixels; the labels say 50 / 50
    aligned = float(C.consistency_loss(weak, strong, labels, 0.9, balance="align", prior=[0.5, 0.5, 0.0, 0.0]))
    assert aligned == pytest.approx(-np.log(0.25), rel=1e-5)  # class 2 pixels now pass the threshold
    # labelled shares that agree with the predictions change nothing
    mean = weak[0].reshape(-1, 4).mean(0)
    same = float(C.consistency_loss(weak, strong, labels, 0.9, balance="align", prior=(mean / mean.sum()).tolist()))
    assert same == pytest.approx(-np.log(0.25) * 48 / 64, rel=1e-5)
    with pytest.raises(ValueError, match="prior"):
        C.consistency_loss(weak, strong, labels, 0.9, balance="align")
    with pytest.raises(ValueError, match="balance"):
        C.consistency_loss(weak, strong, labels, 0.9, balance="median")
    loss = L.make_loss(4, consistency_weight=1.0, consistency_balance="align", consistency_prior=[0.5, 0.5, 0, 0])
    restored = type(loss).from_config(loss.get_config())
    assert restored.consistency_balance == "align" and restored.consistency_prior == [0.5, 0.5, 0.0, 0.0]


def test_strong_view_keeps_geometry_and_changes_colour():
    import tensorflow as tf

    rng = np.random.default_rng(2)
    x = np.zeros((3, 32, 32, 3), np.uint8)
    x[:, :, 16:] = (200, 120, 160)
    x[:, :, :16] = (80, 40, 110)
    x = np.clip(x + rng.integers(0, 10, x.shape), 0, 255).astype(np.uint8)
    tf.random.set_seed(0)
    pair_x, pair_y = C.pair_views(x, np.ones((3, 32, 32), np.uint8))
    pair_x = pair_x.numpy()
    assert pair_x.shape == (6, 32, 32, 3) and pair_y.shape == (6, 32, 32)
    assert np.array_equal(pair_x[:3], x.astype(np.float32))  # the weak half is the batch itself
    s = pair_x[3:]
    assert 0 <= s.min() and s.max() <= 255
    assert np.abs(s - x).mean() > 3  # colour changed
    left, right = s[:, 4:28, 4:12].mean(), s[:, 4:28, 20:28].mean()
    assert right > left + 20  # the pale half stays paler: nothing moved


def test_consistency_labels_ignore_validation_blocks_and_outside_the_region(tmp_path):
    from helpers.io import write_image

    full = np.zeros((16, 16), np.uint8)
    full[2:6, 2:6] = 2
    train = full.copy()
    train[2:4, 2:4] = 0  # a validation block
    write_image(full, tmp_path / "full.png")
    write_image(train, tmp_path / "train.png")
    region = tmp_path / "region.json"
    region.write_text(json.dumps({"s1": [0, 0, 40, 64]}))  # level-0 px; the tile is at x=8, downsample 2
    tiles = pd.DataFrame([{"tile_id": "t", "slide": "s1", "x": 8, "y": 0, "w": 32, "h": 32,
                           "label_path": str(tmp_path / "train.png"), "label_path_orig": str(tmp_path / "full.png")}])
    (path,) = C.consistency_labels(tiles, tmp_path / "out", region)
    from helpers.dataset import read_label_tile

    out = read_label_tile(path)
    assert (out[2:4, 2:4] == C.IGNORE).all()  # validation pixels
    assert (out[4:6, 2:6] == 2).all()  # training labels kept
    # box x1=40 -> tile column (40 - 8) / 2 = 16: the whole tile is inside, nothing else ignored
    assert (out[8:] == 0).all() and (out == C.IGNORE).sum() == 4
    region.write_text(json.dumps({"s1": [0, 0, 24, 64]}))  # column (24 - 8) / 2 = 8
    out = read_label_tile(C.consistency_labels(tiles, tmp_path / "out2", region)[0])
    assert (out[8:, 8:] == C.IGNORE).all() and (out[8:, :8] == 0).all()
    assert (out[4:6, 2:6] == 2).all()  # labels are never ignored for the region
    region.write_text(json.dumps({"other": [0, 0, 24, 64]}))
    out = read_label_tile(C.consistency_labels(tiles, tmp_path / "out3", region)[0])
    assert (out[out != 2] == C.IGNORE).all()  # a slide without a box: no unlabelled pixel takes part
    region.write_text("[1, 2]")
    with pytest.raises(ParameterError, match="consistency_region"):
        C.consistency_labels(tiles, tmp_path / "out4", region)


def test_consistency_parameters_are_checked():
    with pytest.raises(ParameterError, match="consistency_weight"):
        T.TrainConfig(consistency_weight=-1.0).check()
    with pytest.raises(ParameterError, match="consistency_threshold"):
        T.TrainConfig(consistency_weight=1.0, consistency_threshold=1.0).check()
    with pytest.raises(ParameterError, match="consistency_balance"):
        T.TrainConfig(consistency_weight=1.0, consistency_balance="median").check()


def test_training_with_the_consistency_term(tmp_path):
    """A short real run: paired batches reach the loss, the term is saved with the model, labels are written."""
    import keras

    from test_train import make_synthetic_workdir

    wd = make_synthetic_workdir(tmp_path, n=4, tile=64)
    cfg = T.TrainConfig(epochs=1, warmup_epochs=0, batch_size=2, steps_per_epoch=2, val_fraction=0.3,
                        encoder_weights=None, decoder_filters=(32, 16, 16, 8, 8), gif_tiles=1,
                        augment=False, learning_rate=1e-3, seed=1, split_by="pixels", consistency_weight=1.0,
                        consistency_threshold=0.5)
    params = T.train_model(wd, cfg, frames=False)
    hist = pd.read_csv(wd / "model" / "history.csv")
    assert np.isfinite(hist["loss"]).all()
    assert params["config"]["consistency_weight"] == 1.0
    loss = keras.models.load_model(wd / "model" / "last.keras", compile=True).loss
    assert loss.consistency_weight == 1.0 and loss.consistency_threshold == 0.5
    written = sorted((wd / "model" / "consistency_labels").glob("*.png"))
    assert written
    from helpers.dataset import read_label_tile

    assert any((read_label_tile(str(p)) == C.IGNORE).any() for p in written)  # the validation blocks


def test_paired_dataset_doubles_the_batch(tmp_path):
    from helpers.consistency import pair_views
    from helpers.dataset import make_dataset
    from helpers.io import write_image

    rng = np.random.default_rng(3)
    img = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    lab = np.zeros((64, 64), np.uint8)
    lab[10:20, 10:20] = 2
    write_image(img, tmp_path / "i.png")
    write_image(lab, tmp_path / "l.png")
    paths = [str(tmp_path / "i.png")] * 3, [str(tmp_path / "l.png")] * 3
    x, y = next(iter(make_dataset(*paths, batch_size=3, training=True, pair=pair_views, image_in_target=True)))
    assert x.shape[0] == 6 and y.shape == (6, 64, 64, 4)
    x, y = x.numpy(), y.numpy()
    assert np.array_equal(y[:3], y[3:])  # the strong half keeps the weak half's labels and image
    assert not np.allclose(x[:3], x[3:])
    plain_x, _ = next(iter(make_dataset(*paths, batch_size=3, training=True)))
    assert plain_x.shape[0] == 3
