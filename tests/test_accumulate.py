"""The rolling blending buffer (helpers.accumulate): one tile tall, tiles below it wait aside."""

from __future__ import annotations

import numpy as np
import pytest


def _whole(tiles, H, W, n_cls, weights):
    acc = np.zeros((H, W, n_cls), np.float64)
    wsum = np.zeros((H, W), np.float64)
    for y, x, p in tiles:
        t = weights.shape[0]
        acc[y:y + t, x:x + t] += p * weights[..., None]
        wsum[y:y + t, x:x + t] += weights
    return acc, wsum


@pytest.mark.parametrize("stride", [32, 16, 8])
def test_advance_equals_whole_image_blending_with_tiles_out_of_buffer_order(stride):
    """Tiles arrive in batches that cross band ends (next band before the buffer moves): the rows come out as
    whole-image blending gives them, the buffer stays one tile tall, and nothing is left waiting."""
    from helpers.accumulate import BandAccumulator, finalize_rows
    from helpers.predict import blend_weights

    rng = np.random.default_rng(0)
    tile, n_cls, W = 32, 3, 100
    ys = list(range(0, 97, stride))
    H = ys[-1] + tile + 5  # 5 rows no tile covers
    weights = blend_weights(tile, "gaussian")
    tiles = [(y, x, rng.random((tile, tile, n_cls), np.float32)) for y in ys for x in range(0, W - tile + 1, 17)
             if rng.random() > 0.3]
    acc, wsum = _whole(tiles, H, W, n_cls, weights)
    expected = finalize_rows(acc.astype(np.float32), wsum.astype(np.float32), bg=0)

    blender = BandAccumulator(W, n_cls, tile, weights, rows=tile)
    out = np.full((H, W, n_cls), 7, np.uint8)
    written: list[tuple[int, int]] = []

    def write(row0, rows):
        written.append((row0, len(rows)))
        out[row0:row0 + len(rows)] = rows

    most_waiting = 0
    batch = 5
    for i in range(0, len(tiles), batch):
        for y, x, p in tiles[i:i + batch]:
            blender.add(y, x, p.copy())
        most_waiting = max(most_waiting, len(blender.waiting))
        unread = tiles[i + batch][0] if i + batch < len(tiles) else H
        blender.advance(unread, 0, write)
        assert not blender.waiting
        assert blender.acc.shape[0] == tile
    assert 0 < most_waiting < batch  # the batches did cross band ends
    assert sum(n for _, n in written) == H and written[0][0] == 0  # every row once, in order
    assert all(a + n == b for (a, n), (b, _) in zip(written, written[1:]))
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1


def test_a_tile_above_the_finished_rows_is_refused():
    from helpers.accumulate import BandAccumulator

    b = BandAccumulator(64, 2, 16, np.ones((16, 16), np.float32), rows=16)
    b.add(0, 0, np.ones((16, 16, 2), np.float32))
    b.advance(8, 0, lambda r, a: None)
    assert b.top == 8
    with pytest.raises(ValueError, match="above the first unfinished row"):
        b.add(4, 0, np.ones((16, 16, 2), np.float32))


def test_finalize_rows_is_the_rounded_weighted_mean_and_background_where_no_tile_lies():
    """uint8 = rint(acc / wsum * 255) (at most one step off float64's, nearly always equal); uncovered pixels are
    the background class at 255 and 0 elsewhere; chunk boundaries change nothing."""
    from helpers.accumulate import finalize_rows

    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.ones(4), size=(37, 29)).astype(np.float32)
    w = rng.choice(np.array([0.0, 0.25, 1.0, 3.5], np.float32), size=(37, 29))
    acc = p * w[..., None]
    expected = np.rint(acc.astype(np.float64) / np.where(w > 0, w, 1)[..., None] * 255).astype(int)
    uncovered = w == 0
    assert uncovered.any() and (~uncovered).any()
    for chunk in (1, 5, 64):
        got = finalize_rows(acc, w, bg=2, chunk_rows=chunk)
        assert got.dtype == np.uint8 and got.shape == acc.shape
        diff = np.abs(got.astype(int) - expected)[~uncovered]
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99
        assert (got[uncovered, 2] == 255).all() and (got[uncovered][:, [0, 1, 3]] == 0).all()
    full = finalize_rows(p, np.ones_like(w), bg=0)  # all covered: no background written anywhere
    assert np.abs(full.astype(int) - np.rint(p.astype(np.float64) * 255)).max() <= 1 and full[..., 0].min() < 255
