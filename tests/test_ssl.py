"""Self-supervised pre-training (helpers.ssl): masks, the masked loss, learning, weight transfer, the 05 hook."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import ssl as S
from helpers.errors import ParameterError

SMALL = (32, 16, 16, 8, 8)  # decoder filters of the tiny test networks


def _tiles(n: int = 4, side: int = 64, seed: int = 0) -> list[np.ndarray]:
    """Textured tiles: smooth colour gradients plus a few dark discs (something to reconstruct)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side]
    out = []
    for _ in range(n):
        base = np.stack([180 + 60 * np.sin(xx / rng.uniform(6, 12)), 120 + 50 * np.cos(yy / rng.uniform(6, 12)),
                         170 + 40 * np.sin((xx + yy) / 9.0)], -1)
        for _ in range(3):
            cy, cx, r = rng.integers(0, side, 2).tolist() + [int(rng.integers(5, 12))]
            base[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (80, 40, 120)
        out.append(base.clip(0, 255).astype(np.uint8))
    return out


def test_block_mask_hides_the_requested_fraction():
    rng = np.random.default_rng(0)
    for frac, bs in ((0.5, 16), (0.25, 8), (0.75, 32)):
        m = S.block_mask((64, 128), bs, frac, rng)
        assert m.shape == (64, 128) and m.dtype == bool
        assert m.mean() == pytest.approx(frac)  # sides are multiples of the block: exact
    # blocks are square: every hidden pixel's block of the grid (shifted) is hidden as a whole
    m = S.block_mask((64, 64), 16, 0.5, np.random.default_rng(3))
    rows = np.flatnonzero(np.diff(m.astype(int), axis=0).any(1)) + 1  # lines where the pattern changes
    assert np.all(np.diff(rows) % 16 == 0)
    odd = np.mean([S.block_mask((70, 50), 16, 0.5, rng).mean() for _ in range(50)])  # ragged sides: about right
    assert abs(odd - 0.5) < 0.05
    a, b = S.block_mask((64, 64), 16, 0.5, np.random.default_rng(7)), S.block_mask((64, 64), 16, 0.5, np.random.default_rng(7))
    assert np.array_equal(a, b) and not np.array_equal(a, S.block_mask((64, 64), 16, 0.5, np.random.default_rng(8)))


def test_masked_loss_counts_only_hidden_pixels():
    rng = np.random.default_rng(1)
    target = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
    mask = np.stack([S.block_mask((32, 32), 8, 0.5, rng) for _ in range(2)])[..., None].astype(np.float32)
    y = np.concatenate([target, mask], -1)
    wrong_outside = target + 5.0 * (1 - mask)  # errors only where nothing is hidden
    assert float(S.masked_mse(y, wrong_outside)) == pytest.approx(0.0, abs=1e-6)
    wrong_inside = target + 2.0 * mask
    assert float(S.masked_mse(y, wrong_inside)) == pytest.approx(4.0, rel=1e-4)
    # the batch: hidden pixels are 0 (the mean) in the input, the target is the untouched preprocessed tile
    from helpers.model import preprocess

    tiles = _tiles(2, 64)
    cfg = S.SSLConfig(epochs=1, block_size=16, mask_fraction=0.5)
    x, y = S.make_batch(tiles, cfg, np.random.default_rng(2))
    hidden = y[..., 3] > 0
    assert hidden.mean() == pytest.approx(0.5)
    assert np.all(x[hidden] == 0) and np.allclose(x[~hidden], preprocess(np.stack(tiles))[~hidden])
    assert np.allclose(y[..., :3], preprocess(np.stack(tiles)))


def test_region_keeps_pixels_outside_unseen(tmp_path):
    """ssl_region: tiles wholly outside are left out; outside pixels are blanked in input and target, never hidden."""
    import pandas as pd

    from helpers.io import write_image

    tiles = _tiles(3, 64)
    rows = []
    for i, (x, im) in enumerate(zip((0, 64, 192), tiles)):  # level-0 = 2 tile px (downsample 2)
        write_image(im, tmp_path / f"t{i}.png")
        rows.append(dict(image_path=str(tmp_path / f"t{i}.png"), slide="s", x=x, y=0, w=128, h=128, downsample=2.0))
    table = pd.DataFrame(rows + [dict(rows[0], slide="other")])
    (tmp_path / "region.json").write_text('{"s": [0, 0, 160, 128]}')  # tile 0 whole, tile 1 its left 48 px, tile 2 none
    items = S.tile_items(table, str(tmp_path / "region.json"))
    assert [(p.split("/")[-1], box) for p, box in items] == [("t0.png", (0, 0, 64, 64)), ("t1.png", (0, 0, 48, 64))]
    assert S.tile_items(table) == list(table["image_path"])  # no region: every tile, whole
    tile = S._tile(items[1])
    assert tile.shape == (64, 64, 4) and (tile[:, :48, 3] == 255).all() and (tile[:, 48:, 3] == 0).all()
    cfg = S.SSLConfig(epochs=1, block_size=16, mask_fraction=0.5)
    x, y = S.make_batch([tile, S._tile(items[0])], cfg, np.random.default_rng(0))
    assert np.all(x[0, :, 48:] == 0) and np.all(y[0, :, 48:, :3] == 0) and not y[0, :, 48:, 3].any()
    assert y[0, :, :48, 3].any() and not np.all(x[0, :, :48] == 0)
    with pytest.raises(ParameterError, match="ssl_region"):
        S.tile_items(table, str(tmp_path / "missing.json"))


@pytest.mark.slow
def test_pretraining_lowers_the_reconstruction_loss():
    import keras

    keras.utils.set_random_seed(0)
    tiles = _tiles(4, 64)
    cfg = S.SSLConfig(epochs=3, steps_per_epoch=5, batch_size=2, learning_rate=3e-3, block_size=16,
                      decoder_filters=SMALL, seed=0)
    net = S.build_reconstruction_net(cfg)
    before = S.reconstruction_loss(net, tiles, cfg)
    net, history = S.pretrain(tiles, cfg, net)
    after = S.reconstruction_loss(net, tiles, cfg)
    assert [h["epoch"] for h in history] == [1, 2, 3] and all(np.isfinite(h["loss"]) for h in history)
    x, y = S.make_batch(tiles, cfg, np.random.default_rng(0))  # the same masks reconstruction_loss uses
    mean_prediction = float(S.masked_mse(y, np.zeros_like(x)))  # filling the hidden blocks with the mean
    assert after < 0.8 * min(before, mean_prediction), (before, after, mean_prediction)
    fig = S.plot_ssl(net, tiles, history, cfg)
    assert len(fig.axes) == 3 * 3 + 1


@pytest.mark.slow
@pytest.mark.parametrize("n_classes", [4, 3])  # 3: the head has the reconstruction's shape and still stays
def test_weights_transfer_into_the_segmentation_model(n_classes):
    from helpers.model import build_model

    cfg = S.SSLConfig(epochs=1, decoder_filters=SMALL)
    source = S.build_reconstruction_net(cfg)
    target = build_model(n_classes, None, decoder_filters=SMALL)
    head_before = target.get_layer("final_conv").get_weights()[0].copy()
    moved = S.transfer_weights(source, target)
    assert moved["weights"] > 100 and moved["layers"] > 50 and moved["not_transferred"] == ["final_conv"]
    assert np.array_equal(target.get_layer("final_conv").get_weights()[0], head_before)
    for name in ("stem_conv", "block6a_expand_conv", "decoder_stage4b_conv"):
        for a, b in zip(source.get_layer(name).get_weights(), target.get_layer(name).get_weights()):
            assert np.array_equal(a, b), name
    bn = target.get_layer("stem_bn").get_weights()  # batch-norm statistics travel too
    assert all(np.array_equal(a, b) for a, b in zip(source.get_layer("stem_bn").get_weights(), bn))


@pytest.mark.slow
def test_train_model_pretrains_records_and_resumes_without_again(tmp_path, monkeypatch):
    from test_train import make_synthetic_workdir

    from helpers import train as T

    wd = make_synthetic_workdir(tmp_path, n=4, tile=64)
    cfg = T.TrainConfig(epochs=1, warmup_epochs=1, batch_size=2, steps_per_epoch=2, val_fraction=0.3, split_by="pixels",
                        encoder_weights=None, decoder_filters=SMALL, gif_tiles=2, augment=False, learning_rate=1e-3,
                        seed=1, ssl_epochs=1, ssl_steps_per_epoch=2, ssl_block_size=16,
                        ssl_region=str(tmp_path / "region.json"))
    (tmp_path / "region.json").write_text('{"s1": [0, 0, 128, 256]}')  # the left half of the 256-px slide
    params = T.train_model(wd, cfg, frames=False)
    start = params["encoder_weights_start"]
    assert start["source"] == "ssl" and start["epochs"] == 1 and np.isfinite(start["final_loss"])
    assert start["weights_transferred"] > 100 and params["split"]["n_train"] == 16 and start["tiles"] == 8
    assert start["cpu_seconds"] > 0 and start["seconds"] > 0
    assert params["timings"]["ssl_cpu_s"] == start["cpu_seconds"] <= params["timings"]["total_cpu_s"]
    assert params["warmup_epochs_run"] == 0  # no frozen-encoder warm-up after ssl
    assert (wd / "model" / "ssl.png").is_file()
    state = json.loads((wd / "model" / "training_state.json").read_text())
    assert state["encoder_weights_start"] == start
    # a resumed run (more epochs) continues from last.keras and does not pre-train again

    def boom(*a, **k):
        raise AssertionError("pre-trained again on resume")

    monkeypatch.setattr(S, "pretrain_into", boom)
    cfg.epochs = 2
    params2 = T.train_model(wd, cfg, frames=False)
    assert params2["encoder_weights_start"] == start and params2["epochs"] == 2


@pytest.mark.parametrize("field,value", [("ssl_epochs", -1), ("ssl_steps_per_epoch", 0), ("ssl_learning_rate", 0.0),
                                         ("ssl_block_size", 0), ("ssl_mask_fraction", 1.0), ("ssl_mask_fraction", 0.0)])
def test_bad_ssl_parameters_are_one_line_errors(field, value):
    from helpers.train import TrainConfig

    TrainConfig(ssl_epochs=2).check()  # the good values pass
    with pytest.raises(ParameterError, match=field):
        TrainConfig(**{field: value}).check()


def test_bench_real_passes_the_training_part_as_ssl_region(tmp_path):
    """bench_real: with ssl on, 05 pre-trains only on the training part (the prepared region file); off: no region."""
    import yaml

    from benchmarks import bench_real as B

    base = tmp_path / "base"
    base.mkdir()
    (base / "05_train_model.yaml").write_text("epochs: 2\n")
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / B.SSL_REGION).write_text('{"img": [0, 0, 10, 20]}')
    B.write_params(base, wd / "params", {"05_train_model": {"ssl_epochs": 3}})
    values = yaml.safe_load((wd / "params" / "05_train_model.yaml").read_text())
    assert values["ssl_epochs"] == 3 and values["ssl_region"] == str((wd / B.SSL_REGION).resolve())
    B.write_params(base, wd / "params")
    assert "ssl_region" not in yaml.safe_load((wd / "params" / "05_train_model.yaml").read_text())
