"""Denser training labels from strokes with a pixel classifier (helpers.densify, 03's ``densify``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers.consistency import region_mask
from helpers.densify import SoftVote, densify_images, fit_forest, fit_mlp, fit_teacher, pixel_features, tile_canvases
from helpers.errors import ParameterError
from helpers.io import read_image
from helpers.labels import disagreement_with_truth, refine_tiles, truth_tile
from helpers.tiles import export_tiles


def _two_tissues(size: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pink smooth stroma on the left, purple dotted 'tumour' on the right; truth 3 / 2."""
    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), np.float32)
    img[:] = (215, 150, 190)
    truth = np.full((size, size), 3, np.uint8)
    truth[:, size // 2:] = 2
    img[:, size // 2:] = (170, 110, 175)
    dots = (rng.random((size, size)) < 0.08) & (truth == 2)
    img[dots] = (90, 40, 120)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), truth


def test_features_shape_and_scale():
    img, _ = _two_tissues(64)
    f = pixel_features(img, mpp=1.0)
    assert f.shape == (64, 64, 3 * 4 * 8) and f.dtype == np.float32 and np.isfinite(f).all()
    # sigma is in um: at 2 um/px the same image is twice as coarse, so its responses differ
    assert not np.allclose(f, pixel_features(img, mpp=2.0))


def test_forest_labels_the_unlabelled_pixels_it_is_sure_of():
    img, truth = _two_tissues(96)
    strokes = np.zeros_like(truth)
    strokes[40:56, 10:26] = 3  # one small stroke per class
    strokes[40:56, 70:86] = 2
    (new,), info = densify_images([img], [strokes], mpp=1.0, confidence=0.8, per_class=500)
    assert np.array_equal(new[strokes > 0], strokes[strokes > 0])  # the annotation is never changed
    added = (strokes == 0) & (new > 0)
    assert added.sum() > 0.5 * (strokes == 0).sum(), info  # most of the tissue gets a label
    assert (new[added] == truth[added]).mean() > 0.95
    assert info["added_px"] == int(added.sum()) and info["training_px"] == int((strokes > 0).sum())
    assert set(info["added_by_class"]) <= {2, 3}
    # a stricter confidence labels fewer pixels; one class alone cannot train a classifier
    (strict,), _ = densify_images([img], [strokes], mpp=1.0, confidence=1.0, per_class=500)
    assert (strict > 0).sum() < (new > 0).sum()
    one = np.where(strokes == 2, 0, strokes)
    (same,), info1 = densify_images([img], [one], mpp=1.0)
    assert np.array_equal(same, one) and info1["added_px"] == 0
    with pytest.raises(ParameterError, match="densify_confidence"):
        densify_images([img], [strokes], mpp=1.0, confidence=0)


def test_forest_mlp_is_the_mean_of_the_two_classifiers():
    """``densify: forest_mlp``: the teacher's probabilities are the mean of the forest's and the network's."""
    img, truth = _two_tissues(96)
    x = pixel_features(img, mpp=1.0).reshape(truth.size, -1)
    y = truth.ravel()
    rng = np.random.default_rng(0)
    pick = rng.permutation(len(y))[:1500]
    both = fit_teacher(x[pick], y[pick], "forest_mlp", seed=3)
    forest, mlp = fit_forest(x[pick], y[pick], 3), fit_mlp(x[pick], y[pick], 3)
    p_both = both.predict_proba(x)
    assert isinstance(both, SoftVote) and list(both.classes_) == [2, 3]
    assert np.allclose(p_both, (forest.predict_proba(x) + mlp.predict_proba(x)) / 2, atol=1e-6)
    assert not np.allclose(p_both, forest.predict_proba(x), atol=1e-3)  # the network does change it
    assert (both.predict(x) == y).mean() > 0.95
    strokes = np.zeros_like(truth)
    strokes[40:56, 10:26] = 3
    strokes[40:56, 70:86] = 2
    (new,), info = densify_images([img], [strokes], mpp=1.0, confidence=0.8, per_class=500, method="forest_mlp")
    added = (strokes == 0) & (new > 0)
    assert np.array_equal(new[strokes > 0], strokes[strokes > 0]) and added.sum() > 0.5 * (strokes == 0).sum()
    assert (new[added] == truth[added]).mean() > 0.95
    with pytest.raises(ParameterError, match="forest_mlp"):  # the error names the choices
        densify_images([img], [strokes], mpp=1.0, method="svm")
    with pytest.raises(ValueError, match="different classes"):
        SoftVote([forest, fit_forest(x[pick], np.where(y[pick] == 2, 1, y[pick]), 3)])


def test_tiles_are_put_back_on_their_slide_grid():
    rows = [{"slide": "a", "x": 0, "y": 0, "downsample": 2.0}, {"slide": "a", "x": 64, "y": 128, "downsample": 2.0},
            {"slide": "b", "x": 10, "y": 20, "downsample": 1.0}]
    c = tile_canvases(rows, [(64, 64)] * 3)
    assert c["a|2"]["shape"] == (128, 96) and c["a|2"]["tiles"] == {0: (0, 0), 1: (64, 32)}
    assert c["b|1"]["shape"] == (64, 64) and c["b|1"]["tiles"] == {2: (0, 0)}


@pytest.mark.slow
def test_refine_with_densify_on_the_demo_slide(tmp_path, class_map):
    """03 with ``densify='forest'``: more labelled pixels, the added ones mostly right; annotations kept."""
    from helpers.demo import make_demo

    wd = tmp_path / "wd"
    make_demo(wd, width=1024, height=1024, progress=False)
    export_tiles(wd, class_map, mpp=2.0, tile_size=128, stride=64, min_labelled_fraction=0.01)
    plain = refine_tiles(wd, class_map)
    plain_labels = {r.tile_id: read_image(wd / r.label) for r in plain.itertuples()}
    err_plain = disagreement_with_truth(wd, plain)["wrong_fraction"]
    dense = refine_tiles(wd, class_map, overwrite=True, densify="forest", densify_confidence=0.8)
    info = json.loads((wd / "labels" / "densify.json").read_text())
    assert info["added_px"] > 0 and info["training_px"] > 0
    from helpers.teacher import load_teacher

    teacher = load_teacher(wd / "labels" / "teacher.joblib")  # kept for 07's teacher_weight
    assert teacher["classes"] == sorted(teacher["classes"]) and len(teacher["classes"]) >= 2
    assert teacher["mpp"] == pytest.approx(2.0) and teacher["colours"] == "raw" and teacher["method"] == "forest"
    assert info["method"] == "forest"
    grown = added = right = beyond = 0
    for r in dense.itertuples():
        lab, before = read_image(wd / r.label), plain_labels[r.tile_id]
        assert np.array_equal(lab[before > 0], before[before > 0])
        assert int((lab == 0).sum()) == r.px_unlabelled
        new = (before == 0) & (lab > 0)
        grown += int(new.sum())
        beyond += int((new & ~region_mask(r._asdict(), lab.shape, {str(r.slide): [0, 0, 512, 1024]})).sum())
        t = truth_tile(wd, r._asdict(), lab.shape)
        added += int((new & (t > 0)).sum())
        right += int((new & (lab == t)).sum())
    assert grown > 0.2 * sum(int((b > 0).sum()) for b in plain_labels.values())
    assert right > 0.75 * added, (right, added)  # 0.835 measured (the demo strokes are sloppy)
    err_dense = disagreement_with_truth(wd, dense)["wrong_fraction"]
    assert err_dense < err_plain + 0.10, (err_plain, err_dense)
    # a region (the benchmark's training half): nothing is added outside its box
    box = tmp_path / "box.json"
    box.write_text(json.dumps({str(dense["slide"].iloc[0]): [0, 0, 512, 1024]}))
    boxed = refine_tiles(wd, class_map, overwrite=True, densify="forest", densify_region=str(box))
    outside = inside = 0
    for r in boxed.itertuples():
        lab, before = read_image(wd / r.label), plain_labels[r.tile_id]
        new = (before == 0) & (lab > 0)
        inside_box = region_mask(r._asdict(), lab.shape, {str(r.slide): [0, 0, 512, 1024]})
        outside += int((new & ~inside_box).sum())
        inside += int((new & inside_box).sum())
    assert beyond > 0 and outside == 0 and inside > 0  # without the box, pixels right of x=512 were labelled
    with pytest.raises(ParameterError, match="densify_region"):
        refine_tiles(wd, class_map, overwrite=True, densify="forest", densify_region=str(tmp_path / "none.json"))
    with pytest.raises(ParameterError, match="densify"):
        refine_tiles(wd, class_map, overwrite=True, densify="magic")
    before_err = {p.name: p.read_bytes() for p in (wd / "labels" / "tiles").iterdir()}
    with pytest.raises(ParameterError, match="densify_confidence"):
        refine_tiles(wd, class_map, overwrite=True, densify="forest", densify_confidence=1.5)
    assert {p.name: p.read_bytes() for p in (wd / "labels" / "tiles").iterdir()} == before_err
