"""Whole-slide inference: stitching, resume, bad input, real slides, QuPath export round trip."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest

from helpers.config import load_class_map

ROOT = Path(__file__).resolve().parent.parent

#: Colours of the synthetic slide, one per class of data/classes.yaml (label 1..4).
COLOURS = {1: (242, 242, 242), 2: (95, 40, 135), 3: (235, 150, 195), 4: (245, 215, 110)}


def make_colour_model(model_dir: Path, class_map, mpp: float = 1.0, tile_size: int = 64,
                      normalizer: str | None = None) -> Path:
    """A tiny per-pixel 'U-Net' stand-in: nearest class colour, as a 1x1 convolution.

    Being per-pixel, its stitched whole-slide output must equal the model applied to the
    whole image at once, whatever the tiling: that is what the stitching tests check.
    """
    import keras

    from helpers.io import write_yaml
    from helpers.model import preprocess

    cents = preprocess(np.array([COLOURS[c.label] for c in class_map.classes], np.uint8)[None])[0]  # (C, 3)
    w = 2 * cents.T * 4.0
    b = -(cents**2).sum(1) * 4.0
    inp = keras.Input((None, None, 3))
    out = keras.layers.Conv2D(len(cents), 1, activation="softmax")(inp)
    model = keras.Model(inp, out)
    model.layers[-1].set_weights([w[None, None].astype(np.float32), b.astype(np.float32)])
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save(model_dir / "best.keras")
    write_yaml({"mpp": mpp, "tile_size": tile_size, "classes": class_map.to_dict(), "normalizer": normalizer},
               model_dir / "training_params.yaml", overwrite=True)
    (model_dir / "training_state.json").write_text('{"encoder_weights_start": {"source": "none", "text": "none (random)"}}')
    return model_dir


def synthetic_image(width: int = 400, height: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """RGB image + its true labels: glass, a stroma block with a tumour ring (a hole) and 'other'."""
    import cv2

    lab = np.ones((height, width), np.uint8)
    cv2.rectangle(lab, (20, 20), (width - 60, height - 30), 3, -1)
    cv2.circle(lab, (width // 3, height // 2), min(width, height) // 3, 2, -1)
    cv2.circle(lab, (width // 3, height // 2), min(width, height) // 8, 3, -1)
    cv2.rectangle(lab, (width - 120, 40), (width - 80, height - 60), 4, -1)
    lut = np.zeros((256, 3), np.uint8)
    for k, c in COLOURS.items():
        lut[k] = c
    rng = np.random.default_rng(seed)
    img = np.clip(lut[lab].astype(np.int16) + rng.integers(-6, 7, lab.shape + (3,)), 0, 255).astype(np.uint8)
    return img, lab


def write_slide(path: Path, img: np.ndarray, mpp: float | None = 0.5) -> Path:
    """A tiled pyramidal TIFF OpenSlide opens (zlib, so colours are exact)."""
    from helpers.rasters import write_pyramid_tiff

    h, w = img.shape[:2]
    write_pyramid_tiff(path, img, width=w, height=h, channels=3, kind="rgb", compression="zlib", tile=128,
                       mpp=mpp, downsample=1.0, overwrite=True)
    return path


@pytest.fixture(scope="module")
def class_map_():
    return load_class_map(ROOT / "data" / "classes.yaml")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, class_map_):
    """A colour model (1 um/px, 64 px tiles) and a 0.5 um/px synthetic slide with glass around it."""
    d = tmp_path_factory.mktemp("infer")
    make_colour_model(d / "model", class_map_, mpp=1.0, tile_size=64)
    img, lab = synthetic_image(640, 480)
    big = np.full((480 + 200, 640 + 300, 3), COLOURS[1], np.uint8)  # extra glass: tiles to skip
    big[:480, :640] = img
    truth = np.ones(big.shape[:2], np.uint8)
    truth[:480, :640] = lab
    write_slide(d / "slide.tiff", big, mpp=0.5)
    return d, big, truth


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
    from helpers.infer import predict_slide, read_probabilities

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


def test_resume_after_interruption_gives_same_result(setup, monkeypatch):
    import helpers.infer as infer

    d, _, _ = setup
    kw = dict(overlap=16, blend="gaussian", batch_size=4, progress=False, checkpoint_seconds=0)
    full = infer.predict_slide(d / "slide.tiff", d / "model", d / "uninterrupted", **kw)

    class Stop(Exception):
        pass

    def interrupt(band):
        if band == 3:
            raise Stop

    monkeypatch.setattr(infer, "_band_done", interrupt)
    with pytest.raises(Stop):
        infer.predict_slide(d / "slide.tiff", d / "model", d / "resumed", **kw)
    assert not (d / "resumed" / "probabilities.tiff").exists()
    assert json.loads((d / "resumed" / ".partial" / "state.json").read_text())["next_band"] == 4
    monkeypatch.setattr(infer, "_band_done", lambda band: None)
    res = infer.predict_slide(d / "slide.tiff", d / "model", d / "resumed", **kw)
    assert res.resumed_from_band == 4
    a, b = infer.read_probabilities(d / "uninterrupted"), infer.read_probabilities(d / "resumed")
    assert np.array_equal(a, b)
    assert full.tiles_tissue == res.tiles_tissue


def test_export_outputs_and_tumour_iou(setup, class_map_):
    from shapely.geometry import shape

    from helpers.annotations import annotations_to_label_image
    from helpers.infer import export_prediction, predict_slide
    from helpers.rasters import raster_info, read_raster

    d, big, truth = setup
    out = d / "export"
    predict_slide(d / "slide.tiff", d / "model", out, overlap=4, progress=False)
    summary = export_prediction(out, min_area_um2=50, opening_px=1, closing_px=1, fill_holes_um2=20)
    for name in ("labels.tiff", "probabilities.tiff", "slide.geojson", "overlay.png", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    info = raster_info(out / "labels.tiff")
    assert info["downsample"] == pytest.approx(2.0)
    labels = read_raster(out / "labels.tiff")
    assert labels.shape == (340, 470)
    true_small = truth[::2, ::2][:340, :470]
    # GeoJSON -> labels at model resolution, compared with the dense truth
    fc = json.loads((out / "slide.geojson").read_text())
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == summary["features"] >= 3
    back = annotations_to_label_image(out / "slide.geojson", class_map_, slide_size=big.shape[1::-1], downsample=2.0)
    back = back[:340, :470]
    back[back == 0] = 1  # unannotated = background
    assert (back == labels).mean() >= 0.99  # round trip of the prediction
    t, p = true_small == 2, back == 2
    iou = (t & p).sum() / (t | p).sum()
    assert iou >= 0.95, iou
    # the tumour ring keeps its hole as an interior ring
    tumour = [f for f in fc["features"] if f["properties"]["classification"]["name"] == "Tumor"]
    assert len(tumour) == 1 and len(tumour[0]["geometry"]["coordinates"]) == 2
    assert shape(tumour[0]["geometry"]).is_valid
    s = json.loads((out / "summary.json").read_text())
    assert s["areas_mm2"]["Tumor"] > 0 and 0 < s["tumour_fraction"] < 1
    assert s["tiles"] > 0 and s["predict_seconds"] > 0
    assert s["encoder_weights_start"]["text"] == "none (random)"  # copied from the model's training_state.json


def test_existing_results_refused_unless_overwrite(setup):
    from helpers.errors import OutputExistsError
    from helpers.infer import export_prediction, predict_slide

    d, _, _ = setup
    out = d / "again"
    predict_slide(d / "slide.tiff", d / "model", out, overlap=1, progress=False)
    with pytest.raises(OutputExistsError, match="again"):
        predict_slide(d / "slide.tiff", d / "model", out, overlap=1, progress=False)
    export_prediction(out)
    with pytest.raises(OutputExistsError, match="labels.tiff"):
        export_prediction(out)
    predict_slide(d / "slide.tiff", d / "model", out, overlap=1, progress=False, overwrite=True)
    assert not (out / "summary.json").exists()  # stale 'done' marker removed


def _one_line(exc: pytest.ExceptionInfo, name: str) -> None:
    from helpers.errors import HistoUNetError

    assert isinstance(exc.value, HistoUNetError)
    msg = str(exc.value)
    assert "\n" not in msg and name in msg, msg


def test_bad_inputs(setup, tmp_path, class_map_, shared_data):
    from helpers.config import ClassMap, TissueClass
    from helpers.errors import ClassMapError, MissingMppError, SlideError
    from helpers.infer import predict_slide

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
    import helpers.rasters as rasters
    from helpers.infer import DiskFullError, predict_slide, read_probabilities

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
    _one_line(e, "probabilities.tiff")
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert visible == [], visible  # nothing under a final name
    assert (out / ".partial" / "state.json").is_file()  # finished bands kept for the retry
    monkeypatch.setattr(rasters, "write_pyramid_tiff", real)
    res = predict_slide(d / "slide.tiff", d / "model", out, overlap=1, progress=False)
    assert res.resumed_from_band > 0
    assert read_probabilities(out).shape == (340, 470, 4)


@pytest.mark.parametrize("name,mpp", [("CMU-1-Small-Region.svs", None), ("tcga-cr-7395-01a-01-ts1.svs", 0.5)])
def test_real_slides_give_valid_geojson(tmp_path, class_map_, shared_data, name, mpp):
    from shapely.geometry import shape

    from helpers.infer import export_prediction, predict_slide

    make_colour_model(tmp_path / "model", class_map_, mpp=4.0, tile_size=64)
    out = tmp_path / "pred"
    res = predict_slide(shared_data / "slides" / name, tmp_path / "model", out, mpp=mpp, overlap=1, progress=False)
    assert res.tiles_tissue > 0 and res.downsample == pytest.approx(4.0 / (mpp or 0.499), rel=0.01)
    summary = export_prediction(out, min_area_um2=500)
    fc = json.loads((out / f"{Path(name).stem}.geojson").read_text())
    assert len(fc["features"]) == summary["features"] > 0
    for f in fc["features"]:
        assert shape(f["geometry"]).is_valid
        assert f["properties"]["classification"]["name"] != "Background"


def test_viewer_builds_headless(setup):
    import ipywidgets as w

    from helpers.infer import export_prediction, predict_slide, prediction_viewer

    d, _, _ = setup
    out = d / "viewer"
    predict_slide(d / "slide.tiff", d / "model", out, overlap=1, progress=False)
    export_prediction(out)
    viewer = prediction_viewer(out, max_size=256, zoom_size=128)
    assert isinstance(viewer, w.VBox)
    images = [c for c in viewer.children[-1].children if isinstance(c, w.Image)]
    mode = viewer.children[0].children[0]
    seen = set()
    for option in mode.options:  # raw / post-processed / probability all render
        mode.value = option
        seen.add(images[0].value[:8] == b"\x89PNG\r\n\x1a\n" and len(images[1].value) > 100)
    assert seen == {True}


def test_batch_skips_done_and_continues_past_failures(setup, tmp_path, shared_data, capsys):
    import shutil

    from helpers.batch import main

    d, _, _ = setup
    wd = tmp_path / "wd"
    shutil.copytree(d / "model", wd / "model")
    slides = tmp_path / "incoming"
    slides.mkdir()
    shutil.copy(d / "slide.tiff", slides / "good.tiff")
    shutil.copy(shared_data / "slides" / "broken.svs", slides / "bad.svs")
    params = tmp_path / "p.yaml"
    params.write_text("overlap: 1\nbatch_size: 4\nmin_area_um2: 100.0\n")
    rc = main(["--slides", str(slides), "--workdir", str(wd), "--params", str(params)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "FAILED bad" in err and "broken" not in err.split("FAILED bad")[0]
    summary = json.loads((wd / "predictions" / "good" / "summary.json").read_text())
    assert summary["features"] > 0
    assert (wd / "notebooks" / "batch" / "07_infer_slide_good.ipynb").is_file()
    (slides / "bad.svs").unlink()
    rc = main(["--slides", str(slides), "--workdir", str(wd), "--params", str(params)])
    assert rc == 0
    assert "0 done, 1 skipped, 0 failed" in capsys.readouterr().out


def test_round_trip_on_demo_prediction(tmp_path, class_map_):
    """label image -> GeoJSON -> label image on a noisy prediction of the demo slide (hundreds of regions)."""
    from helpers.annotations import annotations_to_label_image
    from helpers.demo import make_demo
    from helpers.infer import export_prediction, predict_slide
    from helpers.rasters import read_raster

    demo = make_demo(tmp_path, width=1024, height=1024, seed=0, progress=False)
    make_colour_model(tmp_path / "cmodel", class_map_, mpp=1.0, tile_size=64)
    out = tmp_path / "pred"
    predict_slide(demo["slide"], tmp_path / "cmodel", out, overlap=4, progress=False)
    summary = export_prediction(out, smoothing=None, min_area_um2=None)
    assert summary["features"] > 50  # unsmoothed: many small regions, holes within holes
    labels = read_raster(out / "labels.tiff")
    back = annotations_to_label_image(out / "demo.geojson", class_map_, slide_size=(1024, 1024), downsample=2.0)
    back[back == 0] = 1  # Background is not exported
    assert (back == labels).mean() >= 0.99


def test_normalizer_auto_is_the_training_one_and_resumes_identically(setup, tmp_path, shared_data, monkeypatch):
    import shutil

    import imageio.v3 as iio

    import helpers.infer as infer
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
    res = infer.predict_slide(d / "slide.tiff", wd / "model", wd / "a", **kw)
    assert res.normalizer == str(wd / "stain" / "normalizer.json")
    plain = infer.predict_slide(d / "slide.tiff", wd / "model", wd / "plain", normalizer=None, **kw)
    assert plain.normalizer is None
    assert not np.array_equal(infer.read_probabilities(wd / "a"), infer.read_probabilities(wd / "plain"))

    def interrupt(band):
        if band == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(infer, "_band_done", interrupt)
    with pytest.raises(KeyboardInterrupt):
        infer.predict_slide(d / "slide.tiff", wd / "model", wd / "b", **kw)
    monkeypatch.setattr(infer, "_band_done", lambda band: None)
    assert infer.predict_slide(d / "slide.tiff", wd / "model", wd / "b", **kw).resumed_from_band == 3
    assert np.array_equal(infer.read_probabilities(wd / "a"), infer.read_probabilities(wd / "b"))
    (wd / "stain" / "normalizer.json").unlink()
    with pytest.raises(ParameterError, match="normalizer.json"):
        infer.predict_slide(d / "slide.tiff", wd / "model", wd / "c", **kw)


def test_row_store_and_raster_rows_read_what_was_written(tmp_path):
    from helpers.infer import RasterRows, RowStore
    from helpers.rasters import read_raster, write_pyramid_tiff

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


@pytest.mark.parametrize("kw", [
    dict(smoothing="gaussian", smoothing_size=2.0, fill_holes_um2=20, min_area_um2=50),  # whole-image components
    dict(smoothing="gaussian", smoothing_size=1.0, opening_px=2, closing_px=1),  # labels only in on-disk rows
    dict(),  # the defaults
])
def test_banded_export_equals_whole_image_postprocess(setup, class_map_, monkeypatch, kw):
    import helpers.infer as infer
    from helpers import postprocess as pp
    from helpers.infer import export_prediction, predict_slide, read_probabilities
    from helpers.qupath import labels_to_features
    from helpers.rasters import read_raster

    d, _, _ = setup
    out = d / "banded"
    if not (out / "probabilities.tiff").is_file():
        predict_slide(d / "slide.tiff", d / "model", out, overlap=1, progress=False)
    monkeypatch.setattr(infer, "EXPORT_BAND_ROWS", 48)  # many seams on a 340-row raster
    summary = export_prediction(out, overwrite=True, **kw)
    assert not [p for p in out.iterdir() if p.name.startswith(".export")]  # scratch rows removed
    probs = read_probabilities(out)
    whole = pp.postprocess(probs, mpp=summary["raster"]["mpp"], **{"min_area_um2": 0.0, **kw}).labels
    labels = read_raster(out / "labels.tiff")
    if "opening_px" in kw:
        assert (labels == whole).mean() >= 0.999  # documented: morphology may differ at band seams
        whole = labels
    else:
        assert np.array_equal(labels, whole)
    assert summary["areas_mm2"] == infer.summarize(whole, class_map_, summary["raster"]["mpp"])["areas_mm2"]
    ref = labels_to_features(whole, class_map_, 2.0, probabilities=probs, mpp=0.5)
    fc = json.loads((out / "slide.geojson").read_text())
    assert len(fc["features"]) == len(ref) == summary["features"]

    def key(f: dict) -> tuple:  # streamed features come in the order regions complete
        m = f["properties"]["measurements"]
        return (f["properties"]["classification"]["name"], round(m["Area µm^2"], 2),
                round(next(v for k, v in m.items() if k.startswith("Mean")), 3))

    for a, b in zip(sorted(ref, key=key), sorted(fc["features"], key=key)):
        assert key(a) == key(b)
        assert a["properties"]["measurements"] == pytest.approx(b["properties"]["measurements"], abs=1e-3)
