"""Whole-slide prediction (helpers.predict): stitching, resume, bad input, disk full, the training normalizer."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest

from slide_fixtures import class_map_, setup, synthetic_image, write_slide  # noqa: F401 - fixtures


def _model_on_whole(d: Path, slide_path: Path) -> np.ndarray:
    import keras

    from helpers.model import preprocess
    from helpers.slides import open_slide

    model = keras.models.load_model(d / "model" / "best.keras")
    with open_slide(slide_path) as s:
        w, h = s.size_at(2.0)
        img = s.read(0, 0, w, h, 2.0)
    return model.predict(preprocess(img[None]), verbose=0)[0]


@pytest.mark.parametrize("overlap,blend", [(16, "gaussian"), (4, "mean"), (1, "gaussian")])
def test_stitched_probabilities_equal_whole_image_prediction(setup, overlap, blend):
    from helpers.predict import predict_slide, read_probabilities

    d, _, _ = setup
    out = d / f"pred_{overlap}_{blend}"
    res = predict_slide(d / "slide.tiff", d / "model", out, overlap=overlap, blend=blend, batch_size=4, progress=False)
    probs = read_probabilities(out)
    assert probs.shape == (res.height, res.width, 4) == (340, 470, 4)
    assert res.downsample == pytest.approx(2.0)
    assert 0 < res.tiles_tissue < res.tiles_grid  # glass-only tiles were skipped
    expected = _model_on_whole(d, d / "slide.tiff")
    # a per-pixel model gives the same value in every overlapping tile: blending must not change it
    assert np.abs(probs - expected).max() <= 1.5 / 255
    assert not (out / ".partial").exists()


@pytest.mark.parametrize("overlap", [16, 4, 1])
def test_tiles_wait_for_full_batches_across_band_ends(setup, monkeypatch, overlap):
    """Every model call but the last is a full batch: a band's last tiles wait for the next band's (no glass padding)."""
    import helpers.predict as predict
    import helpers.runtime as runtime
    from helpers.accumulate import BandAccumulator
    from helpers.predict import predict_slide, read_probabilities

    d, _, _ = setup
    sizes: list[int] = []
    make = runtime.make_predictor

    def counting(*a, **k):
        pred = make(*a, **k)
        inner = pred.predict
        pred.predict = lambda tiles: (sizes.append(len(tiles)), inner(tiles))[1]
        return pred

    monkeypatch.setattr(runtime, "make_predictor", counting)
    buffers: list[BandAccumulator] = []
    waiting: list[int] = []

    class Recording(BandAccumulator):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            buffers.append(self)

        def add(self, *a, **k):
            super().add(*a, **k)
            waiting.append(len(self.waiting))

    monkeypatch.setattr(predict, "BandAccumulator", Recording)
    out = d / f"batches_{overlap}"
    res = predict_slide(d / "slide.tiff", d / "model", out, overlap=overlap, batch_size=8, progress=False,
                        checkpoint_seconds=1e9)
    assert sum(sizes) == res.tiles_tissue
    assert len(sizes) == -(-res.tiles_tissue // 8), sizes  # ceil(tiles / batch): only the slide's last batch is short
    # the blending buffer is one tile tall (its width is the raster's); the next band's tiles of a batch wait aside
    assert [b.rows for b in buffers] == [res.tile_size]
    assert 0 < max(waiting) < 8
    assert np.abs(read_probabilities(out) - _model_on_whole(d, d / "slide.tiff")).max() <= 1.5 / 255


def test_resume_after_interruption_gives_same_result(setup, monkeypatch):
    import helpers.predict as predict

    d, _, _ = setup
    kw = dict(overlap=16, blend="gaussian", batch_size=4, progress=False, checkpoint_seconds=0)
    full = predict.predict_slide(d / "slide.tiff", d / "model", d / "uninterrupted", **kw)

    class Stop(Exception):
        pass

    def interrupt(band):
        if band == 3:
            raise Stop

    monkeypatch.setattr(predict, "_band_done", interrupt)
    with pytest.raises(Stop):
        predict.predict_slide(d / "slide.tiff", d / "model", d / "resumed", **kw)
    assert not (d / "resumed" / "probabilities.tiff").exists()
    assert json.loads((d / "resumed" / ".partial" / "state.json").read_text())["next_band"] == 4
    monkeypatch.setattr(predict, "_band_done", lambda band: None)
    res = predict.predict_slide(d / "slide.tiff", d / "model", d / "resumed", **kw)
    assert res.resumed_from_band == 4
    a, b = predict.read_probabilities(d / "uninterrupted"), predict.read_probabilities(d / "resumed")
    assert np.array_equal(a, b)
    assert full.tiles_tissue == res.tiles_tissue


def _one_line(exc: pytest.ExceptionInfo, name: str) -> None:
    from helpers.errors import HistoUNetError

    assert isinstance(exc.value, HistoUNetError)
    msg = str(exc.value)
    assert "\n" not in msg and name in msg, msg


def test_bad_inputs(setup, tmp_path, class_map_, shared_data):
    from helpers.config import ClassMap, TissueClass
    from helpers.errors import ClassMapError, MissingMppError, SlideError
    from helpers.predict import predict_slide

    d, _, _ = setup
    # model / class-map mismatch: a user class map with other classes
    other = ClassMap((TissueClass(1, "Background", (0, 0, 0)), TissueClass(2, "Tumor", (1, 1, 1))), source="mine.yaml")
    with pytest.raises(ClassMapError) as e:
        predict_slide(d / "slide.tiff", d / "model", tmp_path / "a", class_map=other, progress=False)
    _one_line(e, "mine.yaml")
    # ... and a model whose outputs disagree with its own training_params classes
    import shutil

    bad_model = tmp_path / "model3"
    shutil.copytree(d / "model", bad_model)
    from helpers.io import read_yaml, write_yaml

    p = read_yaml(bad_model / "training_params.yaml")
    p["classes"]["classes"] = p["classes"]["classes"][:3]
    write_yaml(p, bad_model / "training_params.yaml", overwrite=True)
    with pytest.raises(ClassMapError) as e:
        predict_slide(d / "slide.tiff", bad_model, tmp_path / "b", progress=False)
    _one_line(e, "best.keras")
    # no tissue
    blank = write_slide(tmp_path / "blank.tiff", np.full((300, 300, 3), 243, np.uint8))
    with pytest.raises(SlideError) as e:
        predict_slide(blank, d / "model", tmp_path / "c", progress=False)
    _one_line(e, "blank.tiff")
    # smaller than one tile at model resolution (100 px at 0.5 um/px = 50 px at 1 um/px < 64)
    small = write_slide(tmp_path / "small.tiff", synthetic_image(100, 100)[0])
    with pytest.raises(SlideError) as e:
        predict_slide(small, d / "model", tmp_path / "d", progress=False)
    _one_line(e, "small.tiff")
    # missing mpp
    with pytest.raises(MissingMppError) as e:
        predict_slide(shared_data / "slides" / "tcga-cr-7395-01a-01-ts1.svs", d / "model", tmp_path / "e", progress=False)
    _one_line(e, "tcga-cr-7395-01a-01-ts1.svs")
    # corrupt slide
    with pytest.raises(SlideError) as e:
        predict_slide(shared_data / "slides" / "broken.svs", d / "model", tmp_path / "f", progress=False)
    _one_line(e, "broken.svs")
    # bad parameters
    from helpers.errors import ParameterError

    with pytest.raises(ParameterError):
        predict_slide(d / "slide.tiff", d / "model", tmp_path / "g", overlap=9, progress=False)
    with pytest.raises(ParameterError):
        predict_slide(d / "slide.tiff", d / "model", tmp_path / "g", blend="max", progress=False)
    with pytest.raises(ParameterError, match="tile_size"):
        predict_slide(d / "slide.tiff", d / "model", tmp_path / "g", tile_size=100, progress=False)


def test_disk_full_leaves_no_half_written_file(setup, monkeypatch):
    import helpers.rowstore as rasters  # the row-wise writer calls the pyramid writer from here
    from helpers.errors import DiskFullError
    from helpers.predict import predict_slide, read_probabilities

    d, _, _ = setup
    out = d / "diskfull"
    real = rasters.write_pyramid_tiff

    def failing(path, source, **kw):
        calls = {"n": 0}

        def read_tile(x, y, w, h):
            calls["n"] += 1
            if calls["n"] > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return np.asarray(source[y:y + h, x:x + w])

        kw.update(width=source.shape[1], height=source.shape[0], channels=source.shape[2], dtype=source.dtype)
        return real(path, read_tile, **kw)

    monkeypatch.setattr(rasters, "write_pyramid_tiff", failing)
    with pytest.raises(DiskFullError) as e:
        predict_slide(d / "slide.tiff", d / "model", out, overlap=1, progress=False)
    _one_line(e, "diskfull")  # the folder to free or change
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert visible == [], visible  # nothing under a final name
    assert (out / ".partial" / "state.json").is_file()  # finished bands kept for the retry
    monkeypatch.setattr(rasters, "write_pyramid_tiff", real)
    res = predict_slide(d / "slide.tiff", d / "model", out, overlap=1, progress=False)
    assert res.resumed_from_band > 0
    assert read_probabilities(out).shape == (340, 470, 4)


def test_normalizer_auto_is_the_training_one_and_resumes_identically(setup, tmp_path, shared_data, monkeypatch):
    import shutil

    import imageio.v3 as iio

    import helpers.predict as predict
    from helpers.errors import ParameterError
    from helpers.io import read_yaml, write_yaml
    from helpers.stain import fit_normalizer

    d, _, _ = setup
    wd = tmp_path / "wd"
    shutil.copytree(d / "model", wd / "model")
    ref = np.asarray(iio.imread(shared_data / "stain" / "TUM-AEPINLNQ.png"))[..., :3].copy()
    fit_normalizer(ref, method="reinhard").save(wd / "stain" / "normalizer.json")
    p = read_yaml(wd / "model" / "training_params.yaml")
    p["normalizer"] = "stain/normalizer.json"  # relative to the workdir, as 05 writes it
    write_yaml(p, wd / "model" / "training_params.yaml", overwrite=True)
    kw = dict(overlap=4, batch_size=4, progress=False, checkpoint_seconds=0)
    res = predict.predict_slide(d / "slide.tiff", wd / "model", wd / "a", **kw)
    assert res.normalizer == str(wd / "stain" / "normalizer.json")
    plain = predict.predict_slide(d / "slide.tiff", wd / "model", wd / "plain", normalizer=None, **kw)
    assert plain.normalizer is None
    assert not np.array_equal(predict.read_probabilities(wd / "a"), predict.read_probabilities(wd / "plain"))

    def interrupt(band):
        if band == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(predict, "_band_done", interrupt)
    with pytest.raises(KeyboardInterrupt):
        predict.predict_slide(d / "slide.tiff", wd / "model", wd / "b", **kw)
    monkeypatch.setattr(predict, "_band_done", lambda band: None)
    assert predict.predict_slide(d / "slide.tiff", wd / "model", wd / "b", **kw).resumed_from_band == 3
    assert np.array_equal(predict.read_probabilities(wd / "a"), predict.read_probabilities(wd / "b"))
    (wd / "stain" / "normalizer.json").unlink()
    with pytest.raises(ParameterError, match="normalizer.json"):
        predict.predict_slide(d / "slide.tiff", wd / "model", wd / "c", **kw)


def test_model_classes_carry_roles(class_map_):
    """A model folder's classes keep their roles; older folders without roles get them by the conventional names."""
    from helpers.errors import ClassMapError
    from helpers.model import background_index, class_map_from_params, headline_index

    cmap = class_map_from_params(class_map_.to_dict(), "training_params.yaml")
    assert cmap.names == class_map_.names
    assert (background_index(cmap), headline_index(cmap)) == (0, 1)
    renamed = [{"label": 1, "name": "Carcinoma", "color": [1, 2, 3], "role": "headline"},
               {"label": 2, "name": "Glass", "color": [4, 5, 6], "role": "background"}]
    cmap = class_map_from_params({"classes": renamed}, "p.yaml")
    assert (background_index(cmap), headline_index(cmap)) == (1, 0)
    old = class_map_from_params({"Background": 1, "Tumor": 2, "Stroma": 3}, "old.yaml")  # before roles
    assert (old.background.name, old.headline.name) == ("Background", "Tumor")
    none = class_map_from_params([{"label": 1, "name": "A"}, {"label": 2, "name": "B"}], "n.yaml")
    assert (background_index(none), headline_index(none)) == (0, None)
    with pytest.raises(ClassMapError, match="bad.yaml"):
        class_map_from_params(["not a class"], "bad.yaml")


@pytest.mark.parametrize("overlap", [1, 4, 16])
def test_strip_reader_gives_the_tiles_a_per_tile_read_gives(setup, overlap):
    """Each row strip is read once; every tile must still equal a direct read of that tile."""
    from helpers.predict import OVERLAP_STRIDE, grid_positions
    from helpers.slides import open_slide
    from helpers.strips import read_bands

    d, _, _ = setup
    tile, ds = 64, 2.0
    stride = tile // OVERLAP_STRIDE[overlap]
    with open_slide(d / "slide.tiff") as s:
        W, H = s.size_at(ds)
        ys, xs = grid_positions(H, tile, stride), grid_positions(W, tile, stride)
        assert (H - tile) % stride  # the last band is aligned to the end, off the stride grid
        tissue = [[x for x in xs if (x // stride + b) % 3] for b in range(len(ys))]  # ragged rows, some gaps
        tissue[1] = []
        tm = {"read": 0.0, "normalize": 0.0}
        seen, n_reads = 0, 0
        orig = s.read

        def counting(*a, **k):
            nonlocal n_reads
            n_reads += 1
            return orig(*a, **k)

        s.read = counting
        for b, y, row_x, tiles, _ in read_bands(s, ys, tissue, tile, ds, lambda im: 255 - im, 2, max_span=200,
                                                timings=tm):
            assert y == ys[b] and row_x == [x for x in tissue[b] if x in row_x]
            for x, t in zip(row_x, tiles):
                assert np.array_equal(t, 255 - orig(round(x * ds), round(y * ds), tile, tile, ds))
                seen += 1
        assert seen == sum(len(r) for r in tissue[2:])
        assert n_reads <= 2 * len(ys)  # one read per strip, not one per band and run
        assert tm["read"] > 0 and tm["normalize"] > 0

