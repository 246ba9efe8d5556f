"""Training (05): masked loss, labelled-pixel IoU, region/slide split, input pipeline, a short run, resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import dataset as D
from helpers import losses as L
from helpers import metrics as M
from helpers import split as S
from helpers import train as T
from helpers.errors import HistoUNetError, OutputExistsError, ParameterError


def make_synthetic_workdir(root: Path, n: int = 6, tile: int = 64, stride: int | None = None, slides=("s1",),
                           seed: int = 0) -> Path:
    """A tiny labels/ step: textured tiles (tumour dark blobs, stroma pink, glass white), sparse labels."""
    import cv2

    from helpers.io import write_image

    rng = np.random.default_rng(seed)
    stride = stride or tile
    rows = []
    (root / "labels" / "tiles").mkdir(parents=True, exist_ok=True)
    for slide in slides:
        side = stride * (n - 1) + tile
        yy, xx = np.mgrid[0:side, 0:side]
        truth = np.full((side, side), 3, np.uint8)  # stroma
        truth[: side // 5] = 1  # glass along the top
        for _ in range(n):
            cy, cx, r = rng.integers(side // 5, side), rng.integers(0, side), rng.integers(tile // 3, tile)
            truth[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 2  # tumour nests
        colors = {1: (240, 240, 240), 2: (90, 40, 120), 3: (230, 150, 190)}
        img = np.zeros((side, side, 3), np.float32)
        for lab, col in colors.items():
            img[truth == lab] = col
        img += rng.normal(0, 18, img.shape)
        img = cv2.GaussianBlur(img, (3, 3), 0).clip(0, 255).astype(np.uint8)
        sparse = np.where((xx // 5 + yy // 7) % 3 == 0, truth, 0).astype(np.uint8)  # a third labelled
        for y in range(0, side - tile + 1, stride):
            for x in range(0, side - tile + 1, stride):
                tid = f"{slide} [d=1,x={x},y={y},w={tile},h={tile}]"
                im_rel, lab_rel = f"labels/tiles/{tid}.png", f"labels/tiles/{tid}-labelled.png"
                lab = sparse[y:y + tile, x:x + tile]
                write_image(img[y:y + tile, x:x + tile], root / im_rel)
                write_image(lab, root / lab_rel)
                counts = np.bincount(lab.ravel(), minlength=5)
                rows.append(dict(tile_id=tid, slide=slide, image=im_rel, label=lab_rel, x=x, y=y, w=tile, h=tile,
                                 downsample=1.0, mpp=1.0, px_unlabelled=counts[0], px_Background=counts[1],
                                 px_Tumor=counts[2], px_Stroma=counts[3], px_Other=counts[4]))
    pd.DataFrame(rows).to_csv(root / "labels" / "manifest.csv", index=False)
    return root


# ---------------------------------------------------------------- metrics
def test_confusion_and_iou_on_hand_made_masks(class_map):
    truth = np.array([[0, 0, 2, 2],
                      [1, 1, 2, 2],
                      [1, 1, 3, 3],
                      [0, 0, 3, 3]])
    pred = np.array([[2, 2, 2, 2],   # unlabelled pixels predicted tumour: must not count
                     [1, 2, 2, 2],
                     [1, 1, 3, 2],
                     [3, 3, 3, 3]])
    cm = M.confusion_matrix(truth, pred, 4)
    assert cm.shape == (5, 5) and cm[1:].sum() == 12  # row 0 (unlabelled) is not scored
    iou = M.iou_from_confusion(cm)
    # tumour: TP 4, FP 2 (one background, one stroma), FN 0 -> 4/6
    assert iou[1] == pytest.approx(4 / 6)
    # background: TP 3, FN 1, FP 0 -> 3/4 ; stroma: TP 3, FN 1 -> 3/4 ; other: absent -> NaN
    assert iou[0] == pytest.approx(0.75) and iou[2] == pytest.approx(0.75)
    assert np.isnan(iou[3])
    res = M.labelled_iou(truth, pred, class_map)
    assert res["iou_Tumor"] == pytest.approx(4 / 6)
    assert res["mean_iou"] == pytest.approx((0.75 + 4 / 6 + 0.75) / 3)


def test_perfect_and_disjoint_iou():
    t = np.array([1, 1, 2, 2, 0])
    assert np.allclose(M.iou_from_confusion(M.confusion_matrix(t, np.array([1, 1, 2, 2, 1]), 2)), 1.0)
    assert np.allclose(M.iou_from_confusion(M.confusion_matrix(t, np.array([2, 2, 1, 1, 1]), 2)), 0.0)


# ---------------------------------------------------------------- loss
def _random_softmax(rng, shape):
    z = rng.normal(size=shape).astype(np.float32) * 3
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("weights", [None, [0.5, 2.0, 1.0, 1.5]])
@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_loss_ignores_unlabelled_pixels(weights, gamma):
    rng = np.random.default_rng(1)
    loss = L.make_loss(4, ce_weight=1.0, dice_weight=1.0, focal_gamma=gamma, class_weights=weights)
    y = rng.integers(0, 5, (2, 16, 16)).astype(np.uint8)
    y[:, :4] = 0
    p1 = _random_softmax(rng, (2, 16, 16, 4))
    p2 = p1.copy()
    unl = y == 0
    p2[unl] = _random_softmax(rng, (int(unl.sum()), 4))  # change only unlabelled predictions
    l1, l2 = float(loss(y, p1)), float(loss(y, p2))
    assert l1 == pytest.approx(l2, rel=1e-6, abs=1e-6)
    # ...while changing one labelled pixel does change it (the test can fail)
    p3 = p1.copy()
    i = np.argwhere(~unl)[0]
    p3[tuple(i)] = np.roll(p3[tuple(i)], 1)
    assert abs(float(loss(y, p3)) - l1) > 1e-6
    # a perfect prediction scores lower than a random one
    perfect = np.eye(4, dtype=np.float32)[np.clip(y.astype(int) - 1, 0, 3)]
    assert float(loss(y, perfect)) < l1


def test_loss_all_unlabelled_is_finite():
    loss = L.make_loss(4)
    y = np.zeros((1, 8, 8), np.uint8)
    assert np.isfinite(float(loss(y, _random_softmax(np.random.default_rng(0), (1, 8, 8, 4)))))


def _two_colour_image(side: int = 32) -> np.ndarray:
    img = np.zeros((1, side, side, 3), np.float32)
    img[:, :, : side // 2] = (0.55, 0.25, 0.60)  # purple left (nuclei-rich)
    img[:, :, side // 2:] = (0.90, 0.65, 0.80)  # pink right (stroma)
    return img


def test_crf_term_prefers_borders_on_colour_edges():
    img = _two_colour_image()
    follows = np.zeros((1, 32, 32), int)
    follows[:, :, 16:] = 1  # border on the colour edge
    cuts = np.zeros((1, 32, 32), int)
    cuts[:, 16:, :] = 1  # border across uniform colour
    onehot = np.eye(4, dtype=np.float32)
    f = float(L.local_crf_loss(onehot[follows], img, radius=3, downscale=1))
    c = float(L.local_crf_loss(onehot[cuts], img, radius=3, downscale=1))
    const = float(L.local_crf_loss(onehot[np.zeros((1, 32, 32), int)], img, radius=3, downscale=1))
    uniform = float(L.local_crf_loss(np.full((1, 32, 32, 4), 0.25, np.float32), img, radius=3, downscale=1))
    assert const == pytest.approx(0.0, abs=1e-7)
    assert f < 1e-3 < c  # colours 0.4 apart at sigma 0.1: the edge is nearly free
    assert c < uniform <= 0.75  # an undecided map costs most (1 - 1/4 of the same-colour pairs)
    assert len(L.crf_offsets(3)) == (7 * 7 - 1) // 2


def test_crf_term_reaches_unlabelled_pixels_and_needs_the_image():
    rng = np.random.default_rng(0)
    img = _two_colour_image(16)
    lab = np.zeros((1, 16, 16), np.float32)
    lab[:, 2:5, 2:5] = 2  # a small stroke; the rest is unlabelled
    target = np.concatenate([lab[..., None], img], -1)
    plain = L.make_loss(4)
    crf = L.make_loss(4, crf_weight=1.0, crf_radius=2, crf_downscale=1)
    p1 = _random_softmax(rng, (1, 16, 16, 4))
    p2 = p1.copy()
    p2[:, 10:, 10:] = _random_softmax(rng, (6, 6, 4))  # change unlabelled pixels only
    assert float(plain(lab, p1)) == pytest.approx(float(plain(lab, p2)), abs=1e-6)
    assert float(plain(target, p1)) == pytest.approx(float(plain(lab, p1)), abs=1e-6)  # image channels ignored
    assert abs(float(crf(target, p1)) - float(crf(target, p2))) > 1e-4
    import tensorflow as tf

    p = tf.Variable(p1)
    with tf.GradientTape() as tape:
        value = crf(target, p)
    grad = tape.gradient(value, p).numpy()
    assert np.abs(grad[0, 12, 12]).sum() > 0  # an unlabelled pixel gets a gradient
    with pytest.raises(ValueError, match="image_in_target"):
        crf(lab, p1)
    restored = type(crf).from_config(crf.get_config())
    assert restored.crf_weight == 1.0 and restored.crf_radius == 2


def test_crf_parameters_are_checked():
    with pytest.raises(ParameterError, match="crf_weight"):
        T.TrainConfig(crf_weight=-1.0).check()
    with pytest.raises(ParameterError, match="crf_radius"):
        T.TrainConfig(crf_weight=1.0, crf_radius=0).check()


def test_class_weights_favour_rare_classes():
    w = L.class_weights_from_counts(np.array([1000, 10, 500, 0]))
    assert w[1] > w[2] > w[0]
    assert w[3] == 1.0


# ---------------------------------------------------------------- split
def test_region_split_never_puts_overlapping_tiles_on_both_sides(tmp_path):
    wd = make_synthetic_workdir(tmp_path, n=8, tile=64, stride=32)  # overlapping tiles
    df = pd.read_csv(wd / "labels" / "manifest.csv")
    s = S.split_tiles(df, 0.25, by="region", block_size=128, seed=3, class_names=["Background", "Tumor", "Stroma"])
    assert set(s["split"]) == {"train", "val", "excluded"}
    tr, va = s[s.split == "train"], s[s.split == "val"]
    for _, a in tr.iterrows():
        touch = (a.x <= va.x + va.w) & (a.x + a.w >= va.x) & (a.y <= va.y + va.h) & (a.y + a.h >= va.y)
        assert not touch.any(), f"train tile {a.tile_id} touches a validation tile"
    assert 0.05 < len(va) / len(s) < 0.6
    assert va["px_Tumor"].sum() > 0 and tr["px_Tumor"].sum() > 0
    # same seed -> same split
    s2 = S.split_tiles(df, 0.25, by="region", block_size=128, seed=3, class_names=["Background", "Tumor", "Stroma"])
    assert (s2["split"] == s["split"]).all()


def test_slide_split_keeps_slides_whole(tmp_path):
    wd = make_synthetic_workdir(tmp_path, n=3, tile=32, slides=("a", "b", "c", "d"))
    df = pd.read_csv(wd / "labels" / "manifest.csv")
    s = S.split_tiles(df, 0.25, by="auto", seed=0, class_names=["Tumor"])
    assert (s.groupby("slide")["split"].nunique() == 1).all()
    assert set(s["split"]) == {"train", "val"}
    with pytest.raises(ParameterError):
        S.split_tiles(df[df.slide == "a"], 0.25, by="slide")


def test_missing_manifest_says_run_01(tmp_path):
    with pytest.raises(HistoUNetError, match="01_export_tiles"):
        D.find_tile_manifest(tmp_path)


# ---------------------------------------------------------------- pipeline
def test_dataset_yields_preprocessed_batches(tmp_path):
    wd = make_synthetic_workdir(tmp_path, n=3, tile=64)
    df = pd.read_csv(wd / "labels" / "manifest.csv")
    ds = D.make_dataset([str(wd / p) for p in df.image], [str(wd / p) for p in df.label], 4, True, crop_size=32)
    x, y = next(iter(ds))
    assert x.shape == (4, 32, 32, 3) and x.dtype.name == "float32"
    assert y.shape == (4, 32, 32) and y.dtype.name == "uint8"
    assert float(x.numpy().mean()) < 3 and set(np.unique(y.numpy())) <= {0, 1, 2, 3}
    # with the image in the target (the CRF term): label, then the same tile as RGB 0..1
    ds = D.make_dataset([str(wd / p) for p in df.image], [str(wd / p) for p in df.label], 2, False,
                        image_in_target=True)
    x, y = next(iter(ds))
    assert y.shape == (2, 64, 64, 4) and y.dtype.name == "float32"
    assert set(np.unique(y.numpy()[..., 0])) <= {0, 1, 2, 3}
    from helpers.model import preprocess

    np.testing.assert_allclose(preprocess(np.round(y.numpy()[..., 1:] * 255)), x.numpy(), atol=1e-4)


# ---------------------------------------------------------------- training run + resume
@pytest.mark.slow
def test_two_step_training_then_resume(tmp_path):
    wd = make_synthetic_workdir(tmp_path, n=5, tile=64)
    cfg = T.TrainConfig(epochs=2, warmup_epochs=1, batch_size=2, steps_per_epoch=2, val_fraction=0.3,
                        block_size=128, encoder_weights=None, decoder_filters=(32, 16, 16, 8, 8), gif_tiles=2,
                        augment=False, learning_rate=1e-3, seed=1)
    params = T.train_model(wd, cfg)
    out = wd / "model"
    for name in ("best.keras", "last.keras", "history.csv", "training_params.yaml", "classes.yaml", "split.csv",
                 "manifest.csv"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "frames").glob("*.png")) == ["epoch_001.png", "epoch_002.png"]
    hist = pd.read_csv(out / "history.csv")
    assert list(hist["epoch"]) == [1, 2] and np.isfinite(hist["loss"]).all()
    assert params["encoder_weights_used"] is None and params["mpp"] == 1.0 and params["tile_size"] == 64
    assert 0 <= params["best_tumor_iou"] <= 1
    assert params["headline_class"] == "Tumor"  # the class map's headline role
    done = pd.read_csv(out / "manifest.csv")
    assert {"best.keras", "history.csv", "training_params.yaml"} <= set(done["file"])
    # finished run: the same parameters reuse it, other ones are refused; raising epochs resumes
    mtime = (out / "best.keras").stat().st_mtime_ns
    assert T.train_model(wd, cfg)["best_epoch"] == params["best_epoch"]
    assert (out / "best.keras").stat().st_mtime_ns == mtime
    with pytest.raises(OutputExistsError, match="learning_rate"):
        T.train_model(wd, T.TrainConfig(**{**cfg.__dict__, "learning_rate": cfg.learning_rate * 2}))
    import keras

    steps_before = int(keras.models.load_model(out / "last.keras").optimizer.iterations.numpy())
    assert steps_before == 4
    cfg.epochs = 3
    T.train_model(wd, cfg)
    hist = pd.read_csv(out / "history.csv")
    assert list(hist["epoch"]) == [1, 2, 3]
    assert int(keras.models.load_model(out / "last.keras").optimizer.iterations.numpy()) == steps_before + 2
    from helpers.model import load_trained

    model, p = load_trained(out)
    assert p["epochs"] == 3 and model.output_shape[-1] == 4


def test_training_with_the_crf_term(tmp_path):
    """The CRF term's plumbing in a real run: the image reaches the loss, the loss is finite and saved."""
    import keras

    wd = make_synthetic_workdir(tmp_path, n=4, tile=64)
    cfg = T.TrainConfig(epochs=1, warmup_epochs=0, batch_size=2, steps_per_epoch=2, val_fraction=0.3,
                        block_size=128, encoder_weights=None, decoder_filters=(32, 16, 16, 8, 8), gif_tiles=1,
                        augment=False, learning_rate=1e-3, seed=1, crf_weight=2.0, crf_radius=2)
    params = T.train_model(wd, cfg, frames=False)
    hist = pd.read_csv(wd / "model" / "history.csv")
    assert np.isfinite(hist["loss"]).all()
    assert params["config"]["crf_weight"] == 2.0
    loss = keras.models.load_model(wd / "model" / "last.keras", compile=True).loss
    assert loss.crf_weight == 2.0 and loss.crf_radius == 2  # a resumed run keeps the term
