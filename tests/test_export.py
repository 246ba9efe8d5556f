"""Prediction export (helpers.export) and its figures: outputs, QuPath GeoJSON round trips, banded export, viewer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from slide_fixtures import class_map_, make_colour_model, setup  # noqa: F401 - fixtures


def test_export_outputs_and_tumour_iou(setup, class_map_):
    from shapely.geometry import shape

    from helpers.annotations import annotations_to_label_image
    from helpers.export import export_prediction
    from helpers.predict import predict_slide
    from helpers.rasters import raster_info, read_raster

    d, big, truth = setup
    out = d / "export"
    predict_slide(d / "slide.tiff", d / "model", out, overlap=4, progress=False)
    summary = export_prediction(out, min_area_um2=50, opening_px=1, closing_px=1, fill_holes_um2=20)
    for name in ("labels.tiff", "probabilities.tiff", "slide.geojson", "overlay.png", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    import pandas as pd

    done = pd.read_csv(out / "manifest.csv")  # the done marker, written last, lists the folder's files
    assert {"labels.tiff", "slide.geojson", "summary.json", "prediction.json"} <= set(done["file"])
    assert (done["bytes"] > 0).all()
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
    assert set(s["seconds_by_part"]) == {"labels", "geojson", "summary", "overlay"}
    assert all(v >= 0 for v in s["seconds_by_part"].values())


def test_existing_results_refused_unless_overwrite(setup):
    from helpers.errors import OutputExistsError
    from helpers.export import export_prediction
    from helpers.predict import predict_slide

    d, _, _ = setup
    out = d / "again"
    first = predict_slide(d / "slide.tiff", d / "model", out, overlap=1, progress=False)
    probs = (out / "probabilities.tiff").stat().st_mtime_ns
    # the same settings: the finished slide is reused, untouched; other settings are refused
    assert predict_slide(d / "slide.tiff", d / "model", out, overlap=1, progress=False).seconds == first.seconds
    assert (out / "probabilities.tiff").stat().st_mtime_ns == probs
    with pytest.raises(OutputExistsError, match="again.*overlap"):
        predict_slide(d / "slide.tiff", d / "model", out, overlap=4, progress=False)
    summary = export_prediction(out)
    labels = (out / "labels.tiff").stat().st_mtime_ns
    assert export_prediction(out) == summary and (out / "labels.tiff").stat().st_mtime_ns == labels
    with pytest.raises(OutputExistsError, match="min_area_um2"):
        export_prediction(out, min_area_um2=50.0)
    predict_slide(d / "slide.tiff", d / "model", out, overlap=1, progress=False, overwrite=True)
    assert not (out / "summary.json").exists()  # stale 'done' markers removed
    assert not (out / "manifest.csv").exists()


@pytest.mark.parametrize("name,mpp", [("CMU-1-Small-Region.svs", None), ("tcga-cr-7395-01a-01-ts1.svs", 0.5)])
def test_real_slides_give_valid_geojson(tmp_path, class_map_, shared_data, name, mpp):
    from shapely.geometry import shape

    from helpers.export import export_prediction
    from helpers.predict import predict_slide

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

    from helpers.export import export_prediction
    from helpers.predict import predict_slide
    from helpers.views.predict import prediction_viewer

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


def test_round_trip_on_demo_prediction(tmp_path, class_map_):
    """label image -> GeoJSON -> label image on a noisy prediction of the demo slide (hundreds of regions)."""
    from helpers.annotations import annotations_to_label_image
    from helpers.demo import make_demo
    from helpers.export import export_prediction
    from helpers.predict import predict_slide
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


@pytest.mark.parametrize("kw", [
    dict(smoothing="gaussian", smoothing_size=2.0, fill_holes_um2=20, min_area_um2=50),  # whole-image components
    dict(smoothing="gaussian", smoothing_size=1.0, opening_px=2, closing_px=1),  # labels only in on-disk rows
    dict(),  # the defaults
])
def test_banded_export_equals_whole_image_postprocess(setup, class_map_, monkeypatch, kw):
    import helpers.export as export
    from helpers import postprocess as pp
    from helpers.export import export_prediction
    from helpers.predict import predict_slide, read_probabilities
    from helpers.qupath import labels_to_features
    from helpers.rasters import read_raster

    d, _, _ = setup
    out = d / "banded"
    if not (out / "probabilities.tiff").is_file():
        predict_slide(d / "slide.tiff", d / "model", out, overlap=1, progress=False)
    monkeypatch.setattr(export, "EXPORT_BAND_ROWS", 48)  # many seams on a 340-row raster
    summary = export_prediction(out, overwrite=True, **kw)
    assert not [p for p in out.iterdir() if p.name.startswith(".export") and p.name != ".export_params.json"]  # scratch rows removed
    probs = read_probabilities(out)
    whole = pp.postprocess(probs, mpp=summary["raster"]["mpp"], **{"min_area_um2": 0.0, **kw}).labels
    labels = read_raster(out / "labels.tiff")
    if "opening_px" in kw:
        assert (labels == whole).mean() >= 0.999  # documented: morphology may differ at band seams
        whole = labels
    else:
        assert np.array_equal(labels, whole)
    assert summary["areas_mm2"] == export.summarize(whole, class_map_, summary["raster"]["mpp"])["areas_mm2"]
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


def test_summary_fractions_follow_the_roles(tmp_path):
    """Tissue area leaves out the background role and the fraction is the headline role's, whatever the names."""
    from helpers.config import load_class_map
    from helpers.export import summarize

    (tmp_path / "c.yaml").write_text(
        "classes:\n"
        "  - {label: 1, name: Glass, color: [200, 200, 200], role: background}\n"
        "  - {label: 2, name: Healthy, color: [0, 200, 0]}\n"
        "  - {label: 3, name: Carcinoma, color: [200, 0, 0], role: headline}\n")
    lab = np.ones((100, 100), np.uint8)
    lab[:50] = 2
    lab[:10] = 3  # 1,000 px of 5,000 tissue px
    s = summarize(lab, load_class_map(tmp_path / "c.yaml"), mpp=10.0)  # 1 px = 1e-4 mm^2
    assert s["tissue_mm2"] == pytest.approx(0.5)
    assert s["tumour_fraction"] == pytest.approx(0.2)
    assert s["areas_mm2"]["Glass"] == pytest.approx(0.5)



def _find(picture: np.ndarray, part: np.ndarray) -> tuple[int, int]:
    """Top-left corner where ``part`` occurs in ``picture`` pixel for pixel (AssertionError if nowhere)."""
    h, w = part.shape[:2]
    patch = part[:2, :8]
    views = np.lib.stride_tricks.sliding_window_view(picture, patch.shape)[..., 0, :, :, :]
    for y, x in zip(*np.nonzero(np.all(views == patch, axis=(-3, -2, -1)))):
        if np.array_equal(picture[y:y + h, x:x + w], part):
            break
    else:
        raise AssertionError("not found unchanged in the picture")
    return x, y


def test_overlay_picture_holds_the_slide_and_the_overlay_unchanged(tmp_path, class_map_):
    """07's overlay.png: the thumbnail's pixels, beside helpers.viz.overlay's (the legend aside), under a title."""
    import imageio.v3 as iio

    from helpers.viz import overlay, overlay_picture, save_png

    rng = np.random.default_rng(0)
    thumb = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    labels = rng.integers(1, class_map_.n_classes + 1, (150, 200), dtype=np.uint8)
    pic = overlay_picture(thumb, labels, class_map_, title="slide: predicted classes", hidden=(1,))
    save_png(pic, tmp_path / "overlay.png")
    back = iio.imread(tmp_path / "overlay.png")
    assert np.array_equal(back, pic)  # PNG is lossless at any zlib level
    assert pic.shape[1] > 800 and pic.shape[0] > 300 + 20  # two panels side by side, a title band above
    x0, y0 = _find(pic, thumb)
    right = overlay(thumb, labels, class_map_, hidden=(1,))
    assert not np.array_equal(right, thumb)
    x1, y1 = _find(pic, right[:150])  # the upper half: the legend sits in the lower right corner
    assert y1 == y0 and x1 >= x0 + 400  # side by side, the slide first
    assert not np.array_equal(pic[y0 + 150:y0 + 300, x1:x1 + 400], right[150:])  # the legend is drawn over it


def test_overlay_legend_marks_the_class_left_clear(class_map_):
    """07's overlay leaves glass (background) clear: its legend swatch is empty, the drawn classes' are solid."""
    from helpers.model import background_index
    from helpers.viz import overlay_picture

    thumb = np.full((240, 320, 3), 128, np.uint8)  # blending over grey never gives a class colour exactly
    labels = np.repeat(np.arange(1, class_map_.n_classes + 1, dtype=np.uint8), 80 // class_map_.n_classes + 1)[None]
    bg = class_map_.classes[background_index(class_map_)]
    pic = overlay_picture(thumb, np.repeat(labels[:, :80], 60, 0), class_map_, hidden=(bg.label,))

    def solid(color) -> int:
        return int(np.all(pic == np.array(color, np.uint8), axis=-1).sum())

    assert solid(bg.color) < 20  # neither painted in the panel nor as a swatch (a few anti-aliased text pixels)
    for c in class_map_.classes:
        if c.label != bg.label:
            assert solid(c.color) >= 100, c.name  # a solid swatch of the class colour
