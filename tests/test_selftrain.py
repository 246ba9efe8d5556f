"""Self-training pseudo-labels (helpers/selftrain.py, issue 11)."""

import json

import numpy as np
import pandas as pd
import pytest

from helpers.errors import HistoUNetError, ParameterError
from helpers.selftrain import ROUND1_TABLE, pseudo_label, pseudo_label_tiles


def test_pseudo_label_fills_only_confident_unlabelled_pixels():
    label = np.array([[0, 0, 3], [0, 0, 0]], np.uint8)
    probs = np.zeros((2, 3, 4), np.float32)
    probs[..., 1] = 0.95  # label 2, confident
    probs[0, 1] = [0.5, 0.3, 0.2, 0.0]  # not confident
    probs[1, 2] = [0.0, 0.0, 0.0, 0.99]  # label 4, but kept out below
    keep_out = np.zeros((2, 3), bool)
    keep_out[1, 2] = True
    out = pseudo_label(label, probs, 0.9, keep_out)
    np.testing.assert_array_equal(out, [[2, 0, 3], [2, 2, 0]])
    assert label[0, 0] == 0  # input untouched
    with pytest.raises(ParameterError):
        pseudo_label(label, probs, 1.5)
    with pytest.raises(ParameterError):
        pseudo_label(label, probs[:1], 0.9)


def _workdir(tmp_path):
    from helpers.io import write_image
    from helpers.rasters import write_pyramid_tiff
    from helpers.steps import mark_done

    wd = tmp_path / "wd"
    (wd / "labels" / "tiles").mkdir(parents=True)
    rows = []
    for i, x in enumerate((0, 64)):  # two 32-px tiles at downsample 2 (64 level-0 px wide)
        lab = np.zeros((32, 32), np.uint8)
        lab[:4, :4] = 3
        name = f"labels/tiles/s [d=2,x={x},y=0,w=64,h=64]-labelled.png"
        write_image(lab, wd / name)
        rows.append({"tile_id": f"t{i}", "slide": "s", "image": "x.png", "label": name, "x": x, "y": 0, "w": 64,
                     "h": 64, "mpp": 1.0, "px_unlabelled": 1008, "px_Background": 0, "px_Tumor": 0, "px_Stroma": 16,
                     "px_Other": 0})
    mark_done(wd / "labels", pd.DataFrame(rows))
    probs = np.zeros((40, 80, 4), np.uint8)
    probs[..., 1] = 250  # Tumor, confident, everywhere
    probs[:, 50:] = [0, 100, 155, 0]  # right part: not confident
    pdir = wd / "predictions" / "s"
    pdir.mkdir(parents=True)
    write_pyramid_tiff(pdir / "probabilities.tiff", probs, width=80, height=40, channels=4, kind="probabilities",
                       downsample=2.0)
    (pdir / "prediction.json").write_text(json.dumps({"downsample": 2.0}))
    return wd


def test_pseudo_label_tiles_writes_a_new_table_and_keeps_round_one(tmp_path):
    wd = _workdir(tmp_path)
    allowed = lambda r, shape: np.ones(shape, bool)  # noqa: E731
    df = pseudo_label_tiles(wd, 0.9, val_fraction=None, allowed=allowed)
    assert (wd / "labels" / ROUND1_TABLE).is_file()
    assert pd.read_csv(wd / "labels" / "manifest.csv")["label"].str.startswith("labels/pseudo/").all()
    from helpers.dataset import read_label_tile

    t0 = read_label_tile(str(wd / df["label"][0]))
    assert (t0[:4, :4] == 3).all()  # annotations kept
    assert (t0[4:, :] == 2).all()  # confident prediction everywhere on tile 0 (raster columns 0-31)
    t1 = read_label_tile(str(wd / df["label"][1]))  # raster columns 32-63: 50+ not confident
    assert (t1[4:, :18] == 2).all() and (t1[:, 18:] == 0).all()
    assert df["px_Tumor"][0] == 32 * 32 - 16 and df["px_pseudo"][0] == 32 * 32 - 16
    # validation blocks and disallowed pixels get nothing; a second call starts again from round 1's table
    left = lambda r, shape: np.broadcast_to(np.arange(shape[1]) < 8, shape)  # noqa: E731
    df2 = pseudo_label_tiles(wd, 0.9, val_fraction=0.5, block_size=16, seed=1, allowed=left)
    from helpers.split import holdout_blocks

    t0b = read_label_tile(str(wd / df2["label"][0]))
    held = holdout_blocks("s", 0, 0, 64, 64, (32, 32), 16, 0.5, 1)
    assert held.any() and (~held).any()
    new = t0b != read_label_tile(str(wd / "labels/tiles/s [d=2,x=0,y=0,w=64,h=64]-labelled.png"))
    assert new.any() and not (new & held).any() and not new[:, 8:].any()


def test_pseudo_label_tiles_needs_predictions(tmp_path):
    wd = _workdir(tmp_path)
    import shutil

    shutil.rmtree(wd / "predictions")
    with pytest.raises(HistoUNetError, match="07_infer_slide"):
        pseudo_label_tiles(wd, 0.9)


def test_bench_real_selftrain_yaml_passes_threshold_and_round_two_values(tmp_path, monkeypatch):
    import benchmarks.selftrain_real as st
    from benchmarks.bench_real import self_training

    seen = {}
    monkeypatch.setattr(st, "round2", lambda wd, threshold, overrides05: seen.update(
        wd=wd, threshold=threshold, overrides=overrides05) or {"timings": {}})
    f = tmp_path / "selftrain.yaml"
    f.write_text("threshold: 0.8\nepochs: 3\n")
    self_training(tmp_path, f)
    assert seen == {"wd": tmp_path, "threshold": 0.8, "overrides": {"epochs": 3}}
    f.write_text("threshold: none\n")
    self_training(tmp_path, f)
    assert seen["threshold"] is None and seen["overrides"] == {}


def test_left_half_allows_only_the_training_part(tmp_path):
    from benchmarks.bench_real import write_truth
    from benchmarks.selftrain_real import left_half
    from helpers.config import load_class_map

    (tmp_path / "truth").mkdir()
    write_truth(tmp_path / "truth" / "s.tiff", np.ones((40, 100), np.uint8), 0.5, load_class_map())
    allowed = left_half(tmp_path)
    m = allowed({"slide": "s", "x": 20, "y": 0, "w": 64, "h": 64}, (32, 32))  # level-0 columns 20-83, midline 50
    assert m.shape == (32, 32) and m[:, :15].all() and not m[:, 15:].any()
