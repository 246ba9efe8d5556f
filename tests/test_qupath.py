"""QuPath GeoJSON export: label image -> features -> label image, conventions, import script."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest

from helpers.qupath import labels_to_features, make_feature, write_feature_collection

ROOT = Path(__file__).resolve().parent.parent


def shapes_with_holes(h: int = 240, w: int = 320) -> np.ndarray:
    """Hand-made labels: a tumour ring with a stroma island holding a tumour core, a
    rectangle of 'other' with a glass hole, a diagonal-touching pair and single pixels."""
    import cv2

    lab = np.ones((h, w), np.uint8)
    cv2.circle(lab, (90, 110), 80, 2, -1)
    cv2.circle(lab, (90, 110), 40, 3, -1)
    cv2.circle(lab, (90, 110), 12, 2, -1)
    cv2.rectangle(lab, (200, 20), (300, 200), 4, -1)
    cv2.rectangle(lab, (230, 60), (270, 120), 1, -1)
    lab[210:220, 200:210] = 2
    lab[220:230, 210:220] = 2  # touches the block above at a corner only
    lab[5, 5] = 3
    lab[5, 310] = 2
    return lab


def _rasterize(features: list[dict], class_map, shape: tuple[int, int], downsample: float) -> np.ndarray:
    from shapely.geometry import shape as to_shape

    from helpers.annotations import rasterize

    items = [(to_shape(f["geometry"]), class_map.label_of(f["properties"]["classification"]["name"])) for f in features]
    return rasterize(items, x=0, y=0, width=shape[1], height=shape[0], downsample=downsample, fill=1)


@pytest.mark.parametrize("downsample", [1.0, 4.0, 2.5])
@pytest.mark.parametrize("simplify", [None, 0.25, 0.5])
def test_round_trip_keeps_holes(class_map, downsample, simplify):
    lab = shapes_with_holes()
    feats = labels_to_features(lab, class_map, downsample, mpp=0.5, simplify_tolerance=simplify)
    back = _rasterize(feats, class_map, lab.shape, downsample)
    agreement = (back == lab).mean()
    assert agreement >= 0.99, agreement
    if not simplify:
        assert agreement == 1.0  # pixel-edge outlines rasterize back exactly
    by_class = {}
    for f in feats:
        by_class.setdefault(f["properties"]["classification"]["name"], []).append(f)
    assert "Background" not in by_class
    # ring + core + corner-touching pair (two regions, 4-connected) + single pixel
    assert len(by_class["Tumor"]) == 5
    ring = max(by_class["Tumor"], key=lambda f: f["properties"]["measurements"]["Area µm^2"])
    assert len(ring["geometry"]["coordinates"]) == 2  # exterior + one hole
    other = by_class["Other"][0]
    assert len(other["geometry"]["coordinates"]) == 2


def test_area_and_probability_measurements(class_map):
    lab = np.ones((50, 60), np.uint8)
    lab[10:30, 20:40] = 2  # 400 px
    probs = np.zeros((50, 60, 4), np.float32)
    probs[..., 1] = 0.25
    probs[10:30, 20:30, 1] = 0.75  # half the region at 0.75 -> mean 0.5
    feats = labels_to_features(lab, class_map, 2.0, probabilities=probs, mpp=0.5)
    assert len(feats) == 1
    m = feats[0]["properties"]["measurements"]
    # 400 label px * (2 level-0 px)^2 * (0.5 um)^2 = 400 um^2
    assert m["Area µm^2"] == pytest.approx(400.0)
    assert m["Mean Tumor probability"] == pytest.approx(0.5, abs=1e-3)
    u8 = np.clip(np.rint(probs * 255), 0, 255).astype(np.uint8)
    m8 = labels_to_features(lab, class_map, 2.0, probabilities=u8, mpp=0.5)[0]["properties"]["measurements"]
    assert m8["Mean Tumor probability"] == pytest.approx(0.5, abs=0.01)
    assert labels_to_features(lab, class_map, 2.0, exclude=())[0]["properties"]["classification"]["name"] == "Background"
    assert labels_to_features(lab, class_map, 2.0, min_area_px=401) == []


def validate_qupath_feature(f: dict, reference: dict, slide_size: tuple[float, float] | None = None) -> None:
    """A feature follows QuPath's GeoJSON conventions (and the real export's structure)."""
    from shapely.geometry import shape

    assert set(reference) <= set(f), f"missing keys {set(reference) - set(f)}"
    assert f["type"] == "Feature" == reference["type"]
    assert str(uuid.UUID(f["id"])) == f["id"]
    assert f["geometry"]["type"] in ("Polygon", "MultiPolygon")
    geom = shape(f["geometry"])
    assert geom.is_valid and not geom.is_empty and geom.area > 0
    if slide_size:
        x0, y0, x1, y1 = geom.bounds
        assert x0 >= 0 and y0 >= 0 and x1 <= slide_size[0] + 1e-6 and y1 <= slide_size[1] + 1e-6
    props = f["properties"]
    assert props["objectType"] in ("annotation", "detection")
    assert type(props["objectType"]) is type(reference["properties"]["objectType"])
    cls = props["classification"]
    assert isinstance(cls["name"], str) and cls["name"]
    assert len(cls["color"]) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in cls["color"])
    meas = props["measurements"]
    assert isinstance(meas, dict) and meas
    assert all(isinstance(k, str) and isinstance(v, float) and np.isfinite(v) for k, v in meas.items())
    for ring in [geom.exterior, *geom.interiors] if geom.geom_type == "Polygon" else []:
        assert ring.coords[0] == ring.coords[-1]


def test_every_feature_follows_qupath_conventions(class_map, shared_data, tmp_path):
    real = json.loads((shared_data / "qupath" / "qupath-0.5-export.geojson").read_text())
    assert real["type"] == "FeatureCollection"
    reference = real["features"][0]
    lab = shapes_with_holes()
    probs = np.eye(4, dtype=np.float32)[lab - 1]
    for object_type in ("annotation", "detection"):
        feats = labels_to_features(lab, class_map, 4.0, probabilities=probs, mpp=0.25, object_type=object_type)
        path = write_feature_collection(feats, tmp_path / f"{object_type}.geojson")
        fc = json.loads(path.read_text())
        assert fc["type"] == real["type"] and set(fc) == set(real)
        assert len({f["id"] for f in fc["features"]}) == len(fc["features"])
        for f in fc["features"]:
            validate_qupath_feature(f, reference, slide_size=(320 * 4, 240 * 4))
            assert f["properties"]["objectType"] == object_type
            c = class_map.by_label(class_map.label_of(f["properties"]["classification"]["name"]))
            assert f["properties"]["classification"]["color"] == list(c.color)
    # the real export itself passes the geometry/id part of the check (sanity of the validator)
    from shapely.geometry import shape

    for f in real["features"]:
        assert shape(f["geometry"]).is_valid and str(uuid.UUID(f["id"])) == f["id"]


def test_import_script_parses_and_has_header():
    from groovy_check import ensure_groovy, parse_groovy  # noqa: F401 - tests/ is on sys.path

    path = ROOT / "groovy" / "import_predictions.groovy"
    text = path.read_text()
    for word in ("Purpose", "Requirements", "Inputs", "Outputs", "QuPath 0.5", "USER SETTINGS",
                 "QuPath script -p project.qpproj groovy/import_predictions.groovy", "PathIO.readObjects"):
        assert word in text, word
    ensure_groovy()
    assert parse_groovy(path) == []


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("band_rows", [7, 32, 100])
def test_banded_tracing_equals_whole_image(class_map, connectivity, band_rows):
    """Tracing in bands of rows (joined across seams) gives the whole image's regions, areas and means."""
    from shapely.geometry import shape

    lab = shapes_with_holes()
    rng = np.random.default_rng(band_rows)
    probs = rng.integers(0, 256, (*lab.shape, 4), dtype=np.uint8)
    kw = dict(probabilities=probs, mpp=0.5, simplify_tolerance=None, connectivity=connectivity)
    whole = labels_to_features(lab, class_map, 2.0, **kw)
    banded = labels_to_features(lab, class_map, 2.0, band_rows=band_rows, **kw)
    assert len(banded) == len(whole) > 5
    for a, b in zip(whole, banded):  # same order (raster order of first pixels)
        assert a["properties"]["classification"] == b["properties"]["classification"]
        ma, mb = a["properties"]["measurements"], b["properties"]["measurements"]
        assert ma.keys() == mb.keys()
        for k in ma:
            assert mb[k] == pytest.approx(ma[k], abs=1e-4), k
        ga, gb = shape(a["geometry"]), shape(b["geometry"])
        assert gb.is_valid and ga.symmetric_difference(gb).area < 1e-6
    back = _rasterize(banded, class_map, lab.shape, 2.0)
    assert (back == lab).mean() == 1.0


@pytest.mark.parametrize("band_rows", [7, 100])
def test_region_pixel_counts_match_connected_components(class_map, band_rows):
    """The pixel count behind min_area_px and the mean probability is each region's own (scipy's labelling)."""
    from scipy import ndimage

    lab = shapes_with_holes()
    for cls in class_map.classes[1:]:
        comp, n = ndimage.label(lab == cls.label)
        sizes = np.bincount(comp.ravel())[1:]
        if not n:
            continue
        for k in sorted({1, int(np.median(sizes)), int(sizes.max())}):
            feats = labels_to_features(lab, class_map, 2.0, min_area_px=k, band_rows=band_rows, simplify_tolerance=None)
            got = sum(f["properties"]["classification"]["name"] == cls.name for f in feats)
            assert got == int((sizes >= k).sum()), (cls.name, k)


def test_streamed_features_are_the_listed_ones(class_map):
    """iter_label_features yields each region once it is complete: the same features as the list."""
    from shapely.geometry import shape

    from helpers.qupath import iter_label_features

    lab = shapes_with_holes()
    listed = labels_to_features(lab, class_map, 2.0, mpp=0.5)
    streamed = list(iter_label_features(lab, class_map, 2.0, mpp=0.5, band_rows=16))
    assert len(streamed) == len(listed) > 5

    def key(f: dict) -> tuple:
        g = shape(f["geometry"])
        return f["properties"]["classification"]["name"], round(g.area, 3), round(g.bounds[0], 3), round(g.bounds[1], 3)

    assert sorted(map(key, streamed)) == sorted(map(key, listed))


def test_glass_left_out_by_role_not_by_name(tmp_path):
    """The class with role background is not exported, whatever its name; a map without one exports all."""
    from helpers.config import load_class_map
    from helpers.qupath import iter_label_features, write_features_stream

    (tmp_path / "c.yaml").write_text(
        "classes:\n"
        "  - {label: 1, name: Tissue, color: [0, 200, 0]}\n"
        "  - {label: 2, name: Glass, color: [200, 200, 200], role: background}\n")
    cmap = load_class_map(tmp_path / "c.yaml")
    lab = np.full((40, 40), 2, np.uint8)
    lab[10:20, 10:20] = 1
    names = [f["properties"]["classification"]["name"] for f in labels_to_features(lab, cmap)]
    assert names == ["Tissue"]
    streamed = list(iter_label_features(lab, cmap, band_rows=8))
    assert [f["properties"]["classification"]["name"] for f in streamed] == ["Tissue"]
    (tmp_path / "n.yaml").write_text("classes:\n  - {label: 1, name: A, color: [0, 0, 0]}\n"
                                     "  - {label: 2, name: B, color: [9, 9, 9]}\n")
    assert len(labels_to_features(lab, load_class_map(tmp_path / "n.yaml"))) == 2
    # the streaming writer gives the same FeatureCollection JSON as the list writer
    n = write_features_stream(iter(streamed), tmp_path / "s.geojson")
    write_feature_collection(streamed, tmp_path / "l.geojson")
    assert n == 1
    assert json.loads((tmp_path / "s.geojson").read_text()) == json.loads((tmp_path / "l.geojson").read_text())


def test_make_feature_repairs_invalid_polygons_and_uses_qupaths_grid():
    """QuPath 0.6+ rejects a whole file for one self-intersecting polygon and rounds coordinates to 0.01 px."""
    from shapely.geometry import Polygon, shape

    bowtie = Polygon([(0, 0), (10, 10), (10, 0), (0, 10)])
    assert not bowtie.is_valid
    for geometry in (bowtie, {"type": "Polygon", "coordinates": [list(bowtie.exterior.coords)]}):
        geom = shape(make_feature(geometry, "Tumor", (200, 0, 0))["geometry"])
        assert geom.is_valid and geom.geom_type == "MultiPolygon" and geom.area == pytest.approx(50)
    fine = Polygon([(0.123456, 0), (10.987654, 0.004), (5, 7.777777)])
    coords = make_feature(fine, "Tumor", (200, 0, 0))["geometry"]["coordinates"][0]
    assert all(round(v, 2) == v for xy in coords for v in xy)
    assert shape({"type": "Polygon", "coordinates": [coords]}).area == pytest.approx(fine.area, abs=0.1)
    with pytest.raises(ValueError, match="grid"):
        make_feature(Polygon([(0, 0), (1, 0), (1, 0.001)]), "Tumor", (200, 0, 0))
