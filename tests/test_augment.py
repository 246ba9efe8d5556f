"""Augmentation: label safety on random masks, serialization round trip, HED jitter, preview."""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import pytest

from helpers import augment
from helpers.views import augment as augment_views
from helpers.errors import HistoUNetError, OutputExistsError, ParameterError
from helpers.io import read_image

STRONG_GEOMETRY = dict(flip=0.5, rotate90=1.0, scale=0.3, rotate=30, elastic=30, blur=0, noise=0, brightness=0,
                       contrast=0, hed_sigma=0, hed_bias=0)


def _random_masks(n: int = 6, size: int = 96, seed: int = 0) -> list[np.ndarray]:
    """Blobby label masks with 0 (unlabelled) and a few classes, like sparse annotations."""
    rng = np.random.default_rng(seed)
    masks = []
    for i in range(n):
        small = rng.integers(0, 5, (size // 8, size // 8)).astype(np.uint8)
        if i % 2:
            small[small == 2] = 0  # some masks lack a class: it must not appear
        masks.append(cv2.resize(small, (size, size), interpolation=cv2.INTER_NEAREST))
    return masks


def test_no_new_label_values_and_padding_is_unlabelled():
    aug = augment.default_augmentation(**STRONG_GEOMETRY, seed=1)
    report = augment.check_label_safety(aug, _random_masks(), rounds=15, seed=2)
    assert report["padding_pixels"] > 0, "strong zoom/rotation must pad somewhere: the check would be vacuous"
    assert report["new_label_values"] == 0
    assert report["labelled_padding_pixels"] == 0


def test_masks_follow_the_image_geometry():
    """Mask and image must move together: a labelled square stays under the painted square."""
    aug = augment.default_augmentation(**{**STRONG_GEOMETRY, "elastic": 0}, seed=3)
    for _ in range(20):
        img = np.full((96, 96, 3), 200, np.uint8)
        img[30:60, 20:50] = (20, 20, 20)
        mask = np.zeros((96, 96), np.uint8)
        mask[30:60, 20:50] = 3
        out = aug(image=img, mask=mask)
        dark, lab = out["image"].max(axis=2) < 60, out["mask"] == 3
        assert lab.sum() > 0
        agree = (dark == lab).mean()
        assert agree > 0.97, f"mask and image disagree on {1 - agree:.1%} of pixels"


def test_every_geometric_transform_is_nearest_and_fills_zero():
    aug = augment.default_augmentation(**STRONG_GEOMETRY)
    for t in aug.transforms:
        if isinstance(t, A.DualTransform) and hasattr(t, "mask_interpolation"):
            assert t.mask_interpolation == cv2.INTER_NEAREST, type(t).__name__
        if hasattr(t, "fill_mask"):
            assert t.fill_mask == 0, type(t).__name__
            assert t.border_mode == cv2.BORDER_CONSTANT
            assert min(t.fill) >= 240, "image padding must be white (glass)"


def test_unlabelled_area_does_not_shrink_where_padding_applies():
    """An all-unlabelled mask stays all-unlabelled; a fully labelled mask only loses pixels to padding."""
    aug = augment.default_augmentation(**STRONG_GEOMETRY, seed=4)
    img = np.full((64, 64, 3), 128, np.uint8)
    for _ in range(20):
        assert not aug(image=img, mask=np.zeros((64, 64), np.uint8))["mask"].any()
        out = aug(image=img, mask=np.full((64, 64), 2, np.uint8))["mask"]
        assert set(np.unique(out)) <= {0, 2}


def test_save_load_round_trip_gives_identical_results(tmp_path):
    aug = augment.default_augmentation(elastic=10, rotate=5)
    path = augment.save_augmentation(aug, tmp_path / "augment.yaml")
    assert "HEDJitter" in path.read_text()
    loaded = augment.load_augmentation(path)
    assert [type(t).__name__ for t in loaded.transforms] == [type(t).__name__ for t in aug.transforms]
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = _random_masks(1, 64)[0]
    aug.set_random_seed(7)
    loaded.set_random_seed(7)
    a, b = aug(image=img, mask=mask), loaded(image=img, mask=mask)
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["mask"], b["mask"])
    json_path = augment.save_augmentation(aug, tmp_path / "augment.json")
    assert isinstance(augment.load_augmentation(json_path), A.Compose)
    with pytest.raises(OutputExistsError):
        augment.save_augmentation(aug, path)


def test_load_errors(tmp_path):
    with pytest.raises(HistoUNetError, match="04_augment_tiles"):
        augment.load_augmentation(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("transform: {__class_fullname__: NoSuchTransform}\n")
    with pytest.raises(HistoUNetError):
        augment.load_augmentation(bad)


def test_strengths_are_validated():
    with pytest.raises(ParameterError):
        augment.default_augmentation(scale=-0.1)
    with pytest.raises(ParameterError):
        augment.default_augmentation(flip=2)
    assert len(augment.default_augmentation(**{k: 0 for k in STRONG_GEOMETRY}).transforms) == 0


def test_hed_jitter_identity_and_variation(shared_data):
    tile = read_image(shared_data / "stain" / "TUM-AEPINLNQ.png")
    assert np.array_equal(augment.HEDJitter(0, 0, p=1)(image=tile)["image"], tile)
    jitter = augment.HEDJitter(sigma=0.2, bias=0.02, p=1)
    jitter.set_random_seed(0)
    outs = [jitter(image=tile)["image"] for _ in range(4)]
    diffs = [np.abs(o.astype(int) - tile).mean() for o in outs]
    assert all(o.dtype == np.uint8 and o.shape == tile.shape for o in outs)
    assert 1 < np.mean(diffs) < 40, diffs
    assert len({o.tobytes() for o in outs}) == 4
    f = augment.HEDJitter(0, 0, p=1)(image=tile.astype(np.float32) / 255)["image"]
    assert f.dtype == np.float32 and np.abs(f * 255 - tile).max() < 0.5


def test_preview_figure(class_map):
    import matplotlib

    matplotlib.use("Agg")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    fig = augment_views.plot_preview(augment.default_augmentation(), images, _random_masks(2, 64), class_map, n_aug=2)
    assert len(fig.axes) == 2 * 2 * 3


def test_widget_builds_headless(class_map):
    import matplotlib

    matplotlib.use("Agg")
    import ipywidgets as widgets

    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)]
    box = augment_views.augmentation_widget(images, _random_masks(1, 48), class_map, scale=0.2)
    assert isinstance(box, widgets.VBox)
    sliders = [w for col in box.children[0].children for w in col.children]
    assert {s.description for s in sliders} >= {"scale", "hed_sigma", "elastic"}
    assert next(s for s in sliders if s.description == "scale").value == 0.2
    box.children[1].children[0].click()  # re-roll redraws without error
