"""Pyramidal TIFF rasters: round trips, OpenSlide compatibility, streaming and atomic writes."""

from __future__ import annotations

import numpy as np
import pytest

from helpers.errors import HistoUNetError, OutputExistsError
from helpers.rasters import RasterError, pyramid_shapes, raster_info, read_raster, write_pyramid_tiff


def _rgb(h: int, w: int) -> np.ndarray:
    """A smooth RGB test picture (JPEG keeps smooth images close)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.stack([
        128 + 100 * np.sin(xx / 97.0), 128 + 100 * np.cos(yy / 61.0), 128 + 90 * np.sin((xx + yy) / 150.0),
    ], axis=-1).round().astype(np.uint8)


def _labels(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Blocky labels with values 1, 3 and 7 (no 2): lower levels must not invent a 2."""
    rng = np.random.default_rng(seed)
    coarse = rng.choice(np.array([1, 3, 7], np.uint8), size=(h // 8 + 1, w // 8 + 1))
    return np.kron(coarse, np.ones((8, 8), np.uint8))[:h, :w]


def test_pyramid_shapes_halve_until_one_tile():
    assert pyramid_shapes(4096, 4096, 256) == [(4096, 4096), (2048, 2048), (1024, 1024), (512, 512), (256, 256)]
    assert pyramid_shapes(300, 100, 256) == [(300, 100), (150, 50)]
    assert pyramid_shapes(200, 100, 256) == [(200, 100)]


def test_labels_round_trip_exact_and_lower_levels_keep_values(tmp_path):
    lab = _labels(1000, 1300)
    path = write_pyramid_tiff(tmp_path / "l.tiff", lab, kind="labels", downsample=2.0, mpp=1.0)
    info = raster_info(path)
    assert (info["width"], info["height"], info["kind"], info["downsample"]) == (1300, 1000, "labels", 2.0)
    assert info["mpp"] == pytest.approx(1.0)
    assert len(info["levels"]) == 4
    back = read_raster(path)
    assert back.dtype == np.uint8 and back.shape == lab.shape
    np.testing.assert_array_equal(back, lab)
    for ds in (4, 8, 16, 11.0):
        low = read_raster(path, downsample=ds)
        assert low.shape == (round(2000 / ds), round(2600 / ds))
        assert set(np.unique(low)) <= {1, 3, 7}
        # Mostly the same as the level-0 labels sampled at the same places.
        step = ds / 2
        idx_y = (np.arange(low.shape[0]) * step + step / 2).astype(int).clip(0, 999)
        idx_x = (np.arange(low.shape[1]) * step + step / 2).astype(int).clip(0, 1299)
        assert (low == lab[np.ix_(idx_y, idx_x)]).mean() > 0.8
    # A region in slide pixels (raster downsample 2): slide (100, 200, 50, 60) = raster [100:130, 50:75].
    np.testing.assert_array_equal(read_raster(path, 2, (100, 200, 50, 60)), lab[100:130, 50:75])


def test_rgb_round_trip_close_and_region_outside_is_white(tmp_path):
    img = _rgb(700, 900)
    path = write_pyramid_tiff(tmp_path / "s.tiff", img, mpp=0.5, quality=95)
    back = read_raster(path)
    assert back.shape == img.shape
    assert np.abs(back.astype(int) - img).mean() < 2.0
    half = read_raster(path, downsample=2)
    assert half.shape == (350, 450, 3)
    assert np.abs(half.astype(int) - img[::2, ::2]).mean() < 4.0
    corner = read_raster(path, 1, (-50, -50, 100, 100))
    assert (corner[:50, :50] == 255).all()
    assert np.abs(corner[60:, 60:].astype(int) - img[10:50, 10:50]).mean() < 3.0


def test_probabilities_float_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    prob = rng.random((300, 520, 4)).astype(np.float32)
    path = write_pyramid_tiff(tmp_path / "p.tiff", prob, kind="probabilities", downsample=4)
    np.testing.assert_array_equal(read_raster(path), prob)
    low = read_raster(path, downsample=8)
    assert low.shape == (150, 260, 4)
    assert low.mean() == pytest.approx(prob.mean(), abs=1e-3)


def test_openslide_opens_rgb_pyramid_with_mpp_and_levels(tmp_path):
    import openslide

    img = _rgb(4096, 4096)
    path = write_pyramid_tiff(tmp_path / "slide.tiff", img, mpp=0.5)
    osr = openslide.OpenSlide(str(path))
    try:
        assert osr.level_count >= 3
        assert osr.dimensions == (4096, 4096)
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert float(osr.properties["openslide.mpp-y"]) == pytest.approx(0.5)
        assert osr.level_downsamples[1] == pytest.approx(2.0)
        tile = np.asarray(osr.read_region((1000, 2000), 0, (256, 256)))[..., :3]
        # Colours come back right (not swapped channels or YCbCr read as RGB).
        assert np.abs(tile.astype(int) - img[2000:2256, 1000:1256]).mean() < 2.0
        low = np.asarray(osr.read_region((0, 0), 2, (1024, 1024)))[..., :3]
        assert np.abs(low.astype(int) - img[::4, ::4]).mean() < 6.0
    finally:
        osr.close()


def test_callable_source_matches_array_source(tmp_path):
    lab = _labels(600, 1100, seed=3)
    calls = []

    def read_tile(x, y, w, h):
        calls.append((x, y, w, h))
        return lab[y:y + h, x:x + w]

    path = write_pyramid_tiff(tmp_path / "c.tiff", read_tile, width=1100, height=600, channels=1, kind="labels")
    np.testing.assert_array_equal(read_raster(path), lab)
    assert all(h <= 256 for _, _, _, h in calls)
    covered = np.zeros(lab.shape, int)
    for x, y, w, h in calls:
        covered[y:y + h, x:x + w] += 1
    assert (covered == 1).all()


def test_failing_source_leaves_no_file(tmp_path):
    def read_tile(x, y, w, h):
        if y >= 256:
            raise RuntimeError("scanner fell over")
        return np.zeros((h, w, 3), np.uint8)

    target = tmp_path / "out" / "x.tiff"
    with pytest.raises(RuntimeError):
        write_pyramid_tiff(target, read_tile, width=600, height=600)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_overwrite_refused_then_allowed(tmp_path):
    img = _rgb(100, 100)
    path = write_pyramid_tiff(tmp_path / "o.tiff", img)
    with pytest.raises(OutputExistsError):
        write_pyramid_tiff(path, img)
    write_pyramid_tiff(path, 255 - img, overwrite=True)
    assert read_raster(path).mean() > 255 - img.mean() - 3


def test_missing_and_corrupt_files_raise_clear_errors(tmp_path):
    with pytest.raises(RasterError, match="not found"):
        raster_info(tmp_path / "nope.tiff")
    bad = tmp_path / "bad.tiff"
    bad.write_bytes(b"this is not a tiff at all")
    with pytest.raises(HistoUNetError) as err:
        read_raster(bad)
    assert "bad.tiff" in str(err.value) and "\n" not in str(err.value)


def test_bad_parameters_are_rejected(tmp_path):
    with pytest.raises(HistoUNetError, match="rgb"):
        write_pyramid_tiff(tmp_path / "a.tiff", np.zeros((10, 10), np.uint8), kind="rgb")
    with pytest.raises(HistoUNetError, match="width and height"):
        write_pyramid_tiff(tmp_path / "b.tiff", lambda x, y, w, h: None)
    with pytest.raises(HistoUNetError, match="JPEG"):
        write_pyramid_tiff(tmp_path / "c.tiff", np.zeros((10, 10), np.uint8), kind="labels", compression="jpeg")


def test_row_store_and_raster_rows_read_what_was_written(tmp_path):
    from helpers.rasters import read_raster, write_pyramid_tiff
    from helpers.rowstore import RasterRows, RowStore

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (300, 170, 4), dtype=np.uint8)
    store = RowStore(tmp_path / "p.npy", a.shape, np.uint8, create=True)
    for y in range(0, 300, 64):
        store.write(y, a[y:y + 64])
    assert np.array_equal(store[10:250], a[10:250])
    assert np.array_equal(store[5:9, 3:7, 2], a[5:9, 3:7, 2])
    assert np.array_equal(store(128, 256, 40, 44), a[256:300, 128:168])
    store.close()
    assert np.array_equal(np.load(tmp_path / "p.npy"), a)  # a plain .npy file (resumable)
    write_pyramid_tiff(tmp_path / "p.tiff", RowStore(tmp_path / "p.npy"), width=170, height=300, channels=4,
                       kind="probabilities", downsample=2.5)
    rows = RasterRows(tmp_path / "p.tiff")
    assert rows.shape == a.shape and rows.dtype == np.uint8
    assert np.array_equal(rows[0:300], read_raster(tmp_path / "p.tiff")) and np.array_equal(rows[0:300], a)
    assert np.array_equal(rows[37:101, :, 1], a[37:101, :, 1])


def test_row_store_reads_right_rows_from_two_threads_at_once(tmp_path):
    """07's export reads one labels store from two threads (labels.tiff beside the GeoJSON): each read gets its rows.

    With seek + read on one shared handle the threads moved each other's file position: a prostate slide's
    export failed with "file is shorter than its header says", and other reads could return other rows.
    """
    from concurrent.futures import ThreadPoolExecutor

    from helpers.rowstore import RowStore

    h, w = 4096, 1024
    a = (np.arange(h, dtype=np.uint32)[:, None] * 7 + np.arange(w)[None, :]).astype(np.uint8)
    store = RowStore(tmp_path / "l.npy", a.shape, np.uint8, create=True)
    store.write(0, a)

    def reader(seed: int) -> int:
        rng = np.random.default_rng(seed)
        bad = 0
        for _ in range(400):
            y0 = int(rng.integers(0, h - 256))
            n = int(rng.integers(1, 256))
            bad += not np.array_equal(store[y0:y0 + n], a[y0:y0 + n])
            x = int(rng.integers(0, w - 64))
            bad += not np.array_equal(store(x, y0, 64, n), a[y0:y0 + n, x:x + 64])
        return bad

    with ThreadPoolExecutor(4) as pool:
        assert sum(pool.map(reader, range(4))) == 0
    store.close()


def test_pyramid_reductions_match_their_plain_definitions():
    """The fast 2x2 reductions equal the plain ones: rint of the float mean, and the full vote."""
    from scipy import ndimage

    from helpers.rasters import _reduce2, _vote

    rng = np.random.default_rng(0)
    for dtype, top in ((np.uint8, 256), (np.uint16, 65536), (np.uint8, 3)):  # (0, 3): many exact .5 ties
        block = rng.integers(0, top, (37, 51, 4)).astype(dtype)  # odd sizes: edge padding
        padded = np.pad(block, ((0, 1), (0, 1), (0, 0)), mode="edge")
        mean = padded.reshape(19, 2, 26, 2, 4).mean(axis=(1, 3), dtype=np.float64)
        assert np.array_equal(_reduce2(block, "probabilities"), np.rint(mean).astype(dtype))
    smooth = (ndimage.gaussian_filter(rng.random((64, 96)), 4) * 40 % 4).astype(np.uint8)[..., None]
    for lab in (smooth, rng.integers(0, 4, (64, 96, 1)).astype(np.uint8), np.full((64, 96, 1), 2, np.uint8)):
        a, b, c, d = lab[0::2, 0::2], lab[0::2, 1::2], lab[1::2, 0::2], lab[1::2, 1::2]
        assert np.array_equal(_reduce2(lab, "labels"), _vote(a, b, c, d))
    # the vote itself: a majority wins; a 2-2 tie goes to the top-left pair
    one = lambda *v: np.array(v, np.uint8).reshape(2, 2, 1)  # noqa: E731
    assert _reduce2(one(1, 2, 2, 3), "labels").item() == 2
    assert _reduce2(one(1, 2, 2, 1), "labels").item() == 1
