"""The real-tissue training recipe (issue 11): pixel split, glass rules of 03, glass-rich tiles of 01."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from helpers.errors import ParameterError
from helpers.io import read_image, write_image
from helpers.labels import refine_label
from helpers.split import holdout_blocks, split_pixels
from helpers.tiles import export_tiles, read_label_tile

from test_labels import _tile, make_demo_like


def test_holdout_blocks_agree_across_overlapping_tiles():
    a = holdout_blocks("s", 0, 0, 128, 128, (128, 128), 16, 0.3, seed=1)
    b = holdout_blocks("s", 64, 32, 128, 128, (128, 128), 16, 0.3, seed=1)
    assert np.array_equal(a[32:, 64:], b[:96, :64])  # the same level-0 pixels, the same draw
    big = holdout_blocks("s", 0, 0, 4096, 4096, (512, 512), 64, 0.3, seed=1)  # 4096 blocks
    assert 0.25 < big.mean() < 0.35
    assert not np.array_equal(big, holdout_blocks("s", 0, 0, 4096, 4096, (512, 512), 64, 0.3, seed=2))
    assert not np.array_equal(big, holdout_blocks("t", 0, 0, 4096, 4096, (512, 512), 64, 0.3, seed=1))
    # block side in level-0 px; a tile at downsample 2 maps each pixel onto 2 level-0 px
    half = holdout_blocks("s", 0, 0, 256, 256, (128, 128), 16, 0.5, seed=0)
    full = holdout_blocks("s", 0, 0, 256, 256, (256, 256), 16, 0.5, seed=0)
    assert np.array_equal(half, full[::2, ::2])


def test_split_pixels_keeps_every_tile_and_holds_out_blocks(tmp_path, class_map):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(3):
        lab = np.zeros((64, 64), np.uint8)
        lab[8:56, 8:56] = rng.integers(1, 4, (48, 48))
        p = tmp_path / f"t{i}.png"
        write_image(lab, p)
        counts = {f"px_{n}": int((lab == c + 1).sum()) for c, n in enumerate(class_map.names)}
        rows.append({"tile_id": f"t{i}", "slide": "s", "x": 64 * i, "y": 0, "w": 64, "h": 64, "label_path": str(p),
                     **counts})
    df = pd.DataFrame(rows)
    out, val_rows, val_labels = split_pixels(df, read_label_tile, tmp_path / "train", val_fraction=0.3, block_size=8,
                                             seed=0, class_names=class_map.names)
    assert (out["split"] == "train").all() and len(out) == 3  # no tile lost
    assert len(val_rows) == len(val_labels) >= 1
    for r in out.itertuples():
        orig = read_label_tile(df.loc[df.tile_id == r.tile_id, "label_path"].iloc[0])
        train = read_image(r.label_path)
        held = (orig > 0) & (train == 0)
        assert held.sum() == r.px_val > 0  # some labels held out of training ...
        assert np.array_equal(train[train > 0], orig[train > 0])  # ... the rest unchanged
        assert r.px_labelled == int((train > 0).sum())
    total = sum(int((v > 0).sum()) for v in val_labels)
    assert total == out["px_val"].sum()
    assert 0.15 < total / (out["px_val"].sum() + out["px_labelled"].sum()) < 0.45
    with pytest.raises(ParameterError):
        split_pixels(df, read_label_tile, tmp_path / "x", val_fraction=1.5)


def test_split_pixels_gives_a_rare_class_validation_blocks(tmp_path, class_map):
    """A class drawn in one small stroke that the hashed blocks miss still reaches validation."""
    import json

    from helpers.split import VAL_BLOCKS, holdout_blocks, rare_class_blocks

    bs, frac = 8, 0.15
    free = holdout_blocks("s", 0, 0, 128, 64, (64, 128), bs, frac, seed=0)
    # a block the draw keeps in training: the rare class (3) lives only there
    by, bx = next((r, c) for r in range(0, 64, bs) for c in range(0, 128, bs) if not free[r, c])
    rows = []
    for i in range(2):
        lab = np.zeros((64, 64), np.uint8)
        lab[:, :] = 1 + i  # plenty of classes 1 and 2
        p = tmp_path / f"t{i}.png"
        if i == bx // 64:
            lab[by:by + bs, bx % 64:bx % 64 + bs] = 3
        write_image(lab, p)
        rows.append({"tile_id": f"t{i}", "slide": "s", "x": 64 * i, "y": 0, "w": 64, "h": 64, "label_path": str(p)})
    df = pd.DataFrame(rows)
    assert rare_class_blocks(df, read_label_tile, frac, bs, seed=0, n_classes=4) == {"s": [(bx // bs, by // bs)]}
    out, val_rows, val_labels = split_pixels(df, read_label_tile, tmp_path / "train", frac, bs, seed=0,
                                             class_names=class_map.names)
    held = np.concatenate([v.ravel() for v in val_labels])
    assert (held == 3).sum() == bs * bs  # the rare class is validated ...
    assert (held == 1).any() and (held == 2).any()  # ... and the common ones keep their hashed blocks only
    assert json.loads((tmp_path / "train" / VAL_BLOCKS).read_text()) == {"s": [[bx // bs, by // bs]]}
    for r in out.itertuples():
        assert not (read_image(r.label_path) == 3).any()  # and none of it trains
    # a class the draw already validates gets nothing added
    assert rare_class_blocks(df.iloc[[1 - bx // 64]], read_label_tile, frac, bs, seed=0, n_classes=4) == {}


def test_pixel_split_preview_counts_what_split_pixels_holds_out(tmp_path, class_map):
    """05's preview of split_by=pixels: blocks marked val hold exactly the pixels training holds out, per class,
    each counted once although the tiles overlap; the rare class's block is among them; the figure says so."""
    import matplotlib.pyplot as plt

    from helpers.split import pixel_split_blocks
    from helpers.views.train import plot_split

    bs, frac = 8, 0.15
    free = holdout_blocks("s", 0, 0, 96, 64, (64, 96), bs, frac, seed=0)
    by, bx = next((r, c) for r in range(0, 64, bs) for c in range(64, 96, bs) if not free[r, c])
    full = np.zeros((64, 96), np.uint8)
    full[:, :48], full[:, 48:] = 1, 2
    full[by:by + bs, bx:bx + bs] = 3  # one stroke of class 3, in a block the draw keeps in training
    rows = []
    for i, x in enumerate((0, 32)):  # two tiles overlapping by half
        p = tmp_path / f"t{i}.png"
        write_image(full[:, x:x + 64], p)
        rows.append({"tile_id": f"t{i}", "slide": "s", "x": x, "y": 0, "w": 64, "h": 64, "label_path": str(p)})
    df = pd.DataFrame(rows)
    blocks = pixel_split_blocks(df, read_label_tile, frac, bs, seed=0, class_names=class_map.names)
    assert len(blocks) == (64 // bs) * (96 // bs)  # every labelled block once
    px = [f"px_{n}" for n in class_map.names]
    assert blocks[px].to_numpy().sum() == full.size  # overlapping tiles counted once
    val = blocks[blocks["split"] == "val"]
    assert val["px_" + class_map.names[2]].sum() == bs * bs  # the rare class's block is held out
    _, _, val_labels = split_pixels(df, read_label_tile, tmp_path / "train", frac, bs, seed=0,
                                    class_names=class_map.names)
    held = np.concatenate([v.ravel() for v in val_labels])
    for c, col in enumerate(px):
        assert val[col].sum() == int((held == c + 1).sum()), col  # what the preview says is what validates
    fig = plot_split(blocks)
    title = fig.axes[0].get_title()
    plt.close(fig)
    assert "held out:" in title and f"{class_map.names[2]} 100%" in title


def test_glass_in_tissue_unlabelled_and_open_glass_only(class_map):
    img, lab, lumen = _tile()
    off = dict(min_region=0, border_band=0, glass_in_annotations=False, free_glass=False)
    g = refine_label(img, lab, class_map, **{**off, "glass_in_annotations": True, "glass_in_tissue_unlabelled": True})
    assert (g[lumen] == 0).all()  # the lumen inside a Stroma annotation is no longer Background
    assert (g[:, 24:32] == 0).all() and (g[:, 50:][~lumen[:, 50:]] == 3).mean() > 0.95
    bg = lab.copy()
    bg[:, :20] = 1  # a Background stroke on glass keeps its label
    g2 = refine_label(img, bg, class_map, **{**off, "glass_in_annotations": True, "glass_in_tissue_unlabelled": True})
    assert (g2[:, :20] == 1).all()
    # free glass: with a minimum area, the open glass (left third) counts, the enclosed lumen not
    unl = np.zeros_like(lab)
    f = refine_label(img, unl, class_map, **{**off, "free_glass": True, "free_glass_margin": 2,
                                             "free_glass_min_area": 1000})
    assert (f[:, :20] == 1).all() and (f[lumen] == 0).all()
    f0 = refine_label(img, unl, class_map, **{**off, "free_glass": True, "free_glass_margin": 2})
    assert (f0[lumen] == 1).mean() > 0.5  # without it, the lumen is labelled Background


def test_glass_rich_tiles(tmp_path, class_map):
    wd = tmp_path / "wd"
    make_demo_like(wd)
    plain = export_tiles(wd, class_map, mpp=1.0, tile_size=64, stride=64, min_labelled_fraction=0.5)
    more = export_tiles(wd, class_map, mpp=1.0, tile_size=64, stride=64, min_labelled_fraction=0.5, glass_tiles=3,
                        overwrite=True)
    extra = more[~more["tile_id"].isin(plain["tile_id"])]
    assert len(extra) == 3 and (extra["px_unlabelled"] == 64 * 64).all()
    from helpers.tissue import glass_mask

    for r in extra.itertuples():
        assert glass_mask(read_image(wd / r.image)).mean() >= 0.2
    # inside the annotations' bounding box (by the tile centre)
    cx, cy = extra["x"] + 64, extra["y"] + 64  # level-0 centre (slide 0.5 um/px, tiles 1 um/px)
    assert ((cx > 760 - 585) & (cx < 760 + 585) & (cy > 500 - 405) & (cy < 500 + 405)).all()


def test_tta_undoes_each_transform():
    from helpers.tta import TTA_MODES, with_tta

    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    ident = lambda x: x.astype(np.float32) / 255  # noqa: E731 - an equivariant "model": output = input
    for mode in TTA_MODES:
        assert np.allclose(with_tta(ident, mode)(tiles), tiles / 255)
    # a model that is not equivariant (reads the left column everywhere) is averaged over the transforms
    left = lambda x: np.repeat(x[:, :, :1].astype(np.float32), x.shape[2], axis=2)  # noqa: E731
    out = with_tta(left, "d4")(tiles)
    assert out.shape == tiles.shape and not np.allclose(out, left(tiles))
    calls = []
    with_tta(lambda x: calls.append(1) or x.astype(np.float32), "flips")(tiles)
    assert len(calls) == 4
    with pytest.raises(ParameterError):
        with_tta(ident, "rot45")


def test_split_pixels_scores_each_pixel_once(tmp_path, class_map):
    lab = np.full((64, 64), 2, np.uint8)
    rows = []
    for i, x in enumerate((0, 16, 32)):  # three tiles overlapping by 48 px
        p = tmp_path / f"t{i}.png"
        write_image(lab, p)
        rows.append({"tile_id": f"t{i}", "slide": "s", "x": x, "y": 0, "w": 64, "h": 64, "label_path": str(p),
                     "px_Tumor": 64 * 64})
    out, val_rows, val_labels = split_pixels(pd.DataFrame(rows), read_label_tile, tmp_path / "train", 0.4, 8, seed=3)
    union = np.zeros((64, 96), bool)
    held_total = 0
    for r, v in zip(val_rows.itertuples(), val_labels):
        held_total += int((v > 0).sum())
        assert not (union[:, r.x:r.x + 64] & (v > 0)).any()  # no pixel twice
        union[:, r.x:r.x + 64] |= v > 0
    full = holdout_blocks("s", 0, 0, 96, 64, (64, 96), 8, 0.4, seed=3)
    assert held_total == union.sum() and union.sum() >= 0.8 * full.sum()


def test_checkpoint_metric_is_checked():
    from helpers.train import TrainConfig

    TrainConfig(checkpoint_metric="mean").check()
    with pytest.raises(ParameterError, match="checkpoint_metric"):
        TrainConfig(checkpoint_metric="dice").check()


def test_bench_real_overrides():
    from benchmarks.bench_real import parse_overrides

    assert parse_overrides(["05_train_model.epochs=24", "05_train_model.split_by=pixels", "03_refine_labels.x=true"]) == {
        "05_train_model": {"epochs": 24, "split_by": "pixels"}, "03_refine_labels": {"x": True}}
    with pytest.raises(ParameterError, match="NOTEBOOK.PARAMETER"):
        parse_overrides(["epochs=3"])
