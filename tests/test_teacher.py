"""03's forest as a second opinion at inference (helpers.teacher, predict_slide's teacher)."""

from __future__ import annotations

import numpy as np
import pytest

from slide_fixtures import class_map_, setup  # noqa: F401 - fixtures

DS = 2.0  # the colour model works at 1 um/px on the 0.5 um/px slide


@pytest.fixture(scope="module")
def teacher_file(setup, tmp_path_factory):
    """A forest fitted to 300 true pixels per class of the synthetic slide, at the model's resolution."""
    from helpers.densify import SIGMAS_UM, fit_forest, pixel_features
    from helpers.slides import open_slide
    from helpers.teacher import save_teacher

    d, _, truth = setup
    with open_slide(d / "slide.tiff") as s:
        w, h = s.size_at(DS)
        img = s.read(0, 0, w, h, DS)
    lab = truth[::2, ::2][:h, :w]
    feats = pixel_features(img, 1.0)
    rng = np.random.default_rng(0)
    idx = np.concatenate([rng.permutation(np.flatnonzero(lab.ravel() == c))[:300] for c in (1, 2, 3, 4)])
    model = fit_forest(feats.reshape(-1, feats.shape[-1])[idx], lab.ravel()[idx], trees=16)
    path = save_teacher(model, tmp_path_factory.mktemp("teacher") / "teacher.joblib", mpp=1.0, sigmas_um=SIGMAS_UM)
    return path, img, lab


def _whole_image_forest(teacher: dict, img: np.ndarray) -> np.ndarray:
    """The forest on the whole image at once, mirrored at its edges (scipy's ``reflect``, as 03's canvases)."""
    from helpers.teacher import forest_probabilities

    return forest_probabilities(teacher, img, 1.0, 4, 0)


def test_blocks_equal_the_whole_image_and_glass_is_left_alone(setup, teacher_file, tmp_path):
    from helpers.rowstore import RowStore
    from helpers.slides import open_slide
    from helpers.teacher import blend_teacher, load_teacher

    d, _, _ = setup
    path, img, lab = teacher_file
    teacher = load_teacher(path)
    h, w = lab.shape
    unet = np.zeros((h, w, 4), np.uint8)
    unet[..., 3], unet[..., 1] = 200, 55  # a U-Net that calls everything "Other"
    unet[:, w - 100:] = 0
    unet[:, w - 100:, 0] = 255  # ... except glass it is certain of
    whole = _whole_image_forest(teacher, img)
    assert (whole.argmax(-1) + 1 == lab)[:, :w - 100].mean() > 0.9  # the forest itself is right
    for weight in (1.0, 0.5):
        src = RowStore(tmp_path / f"src{weight}.npy", (h, w, 4), np.uint8, create=True)
        src.write(0, unet)
        out = RowStore(tmp_path / f"out{weight}.npy", (h, w, 4), np.uint8, create=True)
        with open_slide(d / "slide.tiff") as slide, pytest.MonkeyPatch.context() as mp:
            mp.setattr("helpers.teacher.BLOCK_PX", 96)  # several blocks and halos inside this small slide
            info = blend_teacher(src, out, slide, DS, 1.0, teacher, weight, bg=0, progress=False)
        got = out.read(0, h).astype(np.int16)
        assert np.array_equal(src.read(0, h), unet)  # the U-Net's rows are kept (a stopped run starts from them)
        assert np.array_equal(got[:, w - 100:], unet[:, w - 100:])
        assert info["pixels"] == h * (w - 100) and info["blocks"] > 4
        expected = np.rint((1 - weight) * unet[:, :w - 100] + weight * 255 * whole[:, :w - 100])
        assert np.abs(got[:, :w - 100] - expected).max() <= 1  # block by block = whole image at once
    src.close()
    out.close()


def test_predict_slide_with_the_teacher(setup, teacher_file, tmp_path):
    from helpers.errors import HistoUNetError, ParameterError
    from helpers.io import read_json
    from helpers.predict import predict_slide, read_probabilities
    from helpers.teacher import load_teacher

    d, _, _ = setup
    path, img, lab = teacher_file
    plain = read_probabilities(predict_slide(d / "slide.tiff", d / "model", tmp_path / "plain", overlap=4,
                                             progress=False).out_dir)
    res = predict_slide(d / "slide.tiff", d / "model", tmp_path / "mixed", overlap=4, progress=False,
                        teacher=path, teacher_weight=0.5)
    mixed = read_probabilities(res.out_dir)
    info = read_json(tmp_path / "mixed" / "prediction.json")["extra"]["teacher"]
    assert info["pixels"] > 0 and info["weight"] == 0.5
    whole = _whole_image_forest(load_teacher(path), img)
    sure_glass = plain[..., 0] >= 254.5 / 255
    assert np.array_equal(mixed[sure_glass], plain[sure_glass])
    expected = 0.5 * plain + 0.5 * whole
    assert np.abs(mixed - expected)[~sure_glass].max() <= 1.5 / 255
    assert not (mixed == plain).all()
    # bad input: one-line errors before any work, naming the file or parameter and the fix
    with pytest.raises(ParameterError, match="densify: forest"):
        predict_slide(d / "slide.tiff", d / "model", tmp_path / "x", teacher=tmp_path / "none.joblib", teacher_weight=0.5)
    with pytest.raises(ParameterError, match="teacher_weight"):
        predict_slide(d / "slide.tiff", d / "model", tmp_path / "x", teacher=path, teacher_weight=1.5)
    import joblib

    joblib.dump({"not": "a teacher"}, tmp_path / "foreign.joblib")
    with pytest.raises(HistoUNetError, match="not a teacher"):
        load_teacher(tmp_path / "foreign.joblib")
    joblib.dump({**load_teacher(path), "classes": [1, 2, 3, 4, 5]}, tmp_path / "five.joblib")
    with pytest.raises(HistoUNetError, match="model has 4 classes"):
        predict_slide(d / "slide.tiff", d / "model", tmp_path / "x", teacher=tmp_path / "five.joblib", teacher_weight=0.5)
    assert not (tmp_path / "x").exists()
