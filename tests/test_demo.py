"""The demo slide: a real pyramidal TIFF, valid sparse annotations, an aligned dense truth."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers.demo import demo_class_names, make_demo
from helpers.errors import OutputExistsError, ParameterError

SIZE = 1536  # small, yet enough for >= 3 pyramid levels (1536 -> 768 -> 384 -> 192)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    wd = tmp_path_factory.mktemp("demo")
    return make_demo(wd, width=SIZE, height=SIZE, mpp=0.5, seed=3, progress=False)


def test_slide_opens_in_openslide_with_levels_and_mpp(demo):
    import openslide

    osr = openslide.OpenSlide(str(demo["slide"]))
    try:
        assert osr.dimensions == (SIZE, SIZE)
        assert osr.level_count >= 3
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert osr.properties["tiff.ImageDescription"].startswith('{"histo_unet"')
    finally:
        osr.close()
    from helpers.slides import open_slide

    with open_slide(demo["slide"]) as slide:
        assert slide.mpp == pytest.approx(0.5)
        assert slide.read(0, 0, 64, 64, downsample=4).shape == (64, 64, 3)


def test_annotations_are_valid_sparse_qupath_features(demo, class_map):
    import uuid

    from shapely.geometry import shape
    from shapely.ops import unary_union

    data = json.loads(demo["annotations"].read_text())
    assert data["type"] == "FeatureCollection"
    feats = data["features"]
    assert len(feats) >= 4
    geoms, names = [], set()
    for f in feats:
        uuid.UUID(f["id"])
        props = f["properties"]
        assert props["objectType"] == "annotation"
        cls = props["classification"]
        assert cls["name"] in class_map.names
        assert list(class_map.by_label(class_map.label_of(cls["name"])).color) == cls["color"]
        g = shape(f["geometry"])
        assert g.geom_type in ("Polygon", "MultiPolygon") and g.is_valid and g.area > 0
        minx, miny, maxx, maxy = g.bounds
        assert minx >= 0 and miny >= 0 and maxx <= SIZE and maxy <= SIZE
        geoms.append(g)
        names.add(cls["name"])
    assert names == set(demo_class_names(class_map).values())  # every class annotated somewhere
    tissue = demo["stats"]["tissue_fraction"] * SIZE * SIZE
    assert unary_union(geoms).area <= 0.15 * tissue


def test_truth_aligns_with_the_slide(demo, class_map):
    from helpers.rasters import raster_info, read_raster

    info = raster_info(demo["truth"])
    assert info["kind"] == "labels" and info["downsample"] == 1.0 and info["width"] == SIZE
    truth = read_raster(demo["truth"])
    rgb = read_raster(demo["slide"]).astype(np.float32)
    assert set(np.unique(truth)) == set(class_map.labels)
    gray = rgb.mean(axis=2)
    od = -np.log(np.clip(rgb, 1, 255) / 255.0)
    by = {name: truth == class_map.label_of(name) for name in demo_class_names(class_map).values()}
    glass, tumour, stroma, other = by["Background"], by["Tumor"], by["Stroma"], by["Other"]
    assert gray[glass].mean() > 225 and np.percentile(gray[glass], 5) > 200
    assert gray[tumour].mean() < gray[stroma].mean() - 10
    # Hematoxylin absorbs red: tumour (crowded nuclei) has more red-channel OD than stroma.
    assert od[..., 0][tumour].mean() > od[..., 0][stroma].mean() + 0.05
    assert gray[other].mean() < 220 and gray[stroma].mean() < 225
    # Class borders of the truth are where the image changes: glass next to tissue is bright.
    edge = glass & ~np.roll(glass, 3, axis=1)
    assert gray[edge].mean() > 200


def test_same_seed_same_truth_and_annotations(demo, tmp_path):
    from helpers.rasters import read_raster

    again = make_demo(tmp_path, width=SIZE, height=SIZE, mpp=0.5, seed=3, progress=False)
    np.testing.assert_array_equal(read_raster(again["truth"]), read_raster(demo["truth"]))
    assert again["annotations"].read_text() == demo["annotations"].read_text()
    a = read_raster(again["slide"], region=(500, 500, 256, 256))
    b = read_raster(demo["slide"], region=(500, 500, 256, 256))
    np.testing.assert_array_equal(a, b)


def test_other_seed_other_slide(demo, tmp_path):
    from helpers.rasters import read_raster

    other = make_demo(tmp_path, width=SIZE, height=SIZE, mpp=0.5, seed=4, progress=False)
    assert (read_raster(other["truth"]) != read_raster(demo["truth"])).mean() > 0.05


def test_rendering_does_not_depend_on_the_tiling():
    from helpers.demo import DemoSlide

    model = DemoSlide(1024, 1024, 0.5, 1, {"glass": 1, "tumour": 2, "stroma": 3, "other": 4})
    whole = model.render_rgb(200, 300, 400, 300)
    left, right = model.render_rgb(200, 300, 150, 300), model.render_rgb(350, 300, 250, 300)
    diff = np.abs(np.concatenate([left, right], axis=1).astype(int) - whole)
    assert diff.max() <= 2 and diff.mean() < 0.05
    lab = model.render_labels(200, 300, 400, 300)
    assert (np.concatenate([model.render_labels(200, 300, 150, 300), model.render_labels(350, 300, 250, 300)], axis=1) == lab).mean() > 0.999


def test_overwrite_refused_and_bad_sizes(demo):
    wd = demo["slide"].parent.parent
    with pytest.raises(OutputExistsError):
        make_demo(wd, width=SIZE, height=SIZE, seed=3, progress=False)
    with pytest.raises(ParameterError):
        make_demo(wd, name="tiny", width=100, height=100, progress=False)


def _truth_under(feature, truth: np.ndarray, ds: float) -> np.ndarray:
    """Truth labels under one annotation (truth read at downsample ``ds``)."""
    import cv2
    from shapely.geometry import shape

    mask = np.zeros(truth.shape, np.uint8)
    geom = shape(feature["geometry"])
    for poly in getattr(geom, "geoms", [geom]):
        cv2.fillPoly(mask, [np.round(np.asarray(poly.exterior.coords) / ds).astype(np.int32)], 1)
    return truth[mask > 0]


def test_annotations_mostly_right_but_some_imperfect(demo, class_map):
    """Annotations are mostly on their class, yet some spill over, as real ones do."""
    from helpers.rasters import read_raster

    ds = 2.0
    truth = read_raster(demo["truth"], downsample=ds)
    feats = json.loads(demo["annotations"].read_text())["features"]
    glass = class_map.background.label
    spills = []
    for f in feats:
        under = _truth_under(f, truth, ds)
        own = class_map.label_of(f["properties"]["classification"]["name"])
        assert (under == own).mean() > 0.6, f["properties"].get("name")
        spills.append((f["properties"].get("name", ""), (under != own).mean(), (under == glass).mean()))
    roi = [s for s in spills if s[0] == "tumour region of interest"]
    assert roi and roi[0][1] > 0.01  # the tumour outline covers some non-tumour tissue
    touching = [s for s in spills if s[0] == "stroma stroke touching glass"]
    assert touching and touching[0][2] > 0.005  # the stroma stroke reaches the glass
