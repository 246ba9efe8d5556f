"""QuPath GeoJSON reading and rasterization (helpers.annotations)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from shapely.geometry import MultiPolygon, Point, Polygon, box

from helpers.annotations import Annotation, annotations_to_label_image, class_areas, rasterize, read_annotations
from helpers.errors import AnnotationError, ClassMapError, HistoUNetError
from helpers.qupath import make_feature, write_feature_collection


def _write(tmp_path, features, name="a.geojson"):
    path = tmp_path / name
    write_feature_collection(features, path, overwrite=True)
    return path


def _one_line(exc: pytest.ExceptionInfo, *needles: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg


def test_real_qupath_export_unclassified_is_skipped_or_mapped(shared_data, class_map, caplog):
    path = shared_data / "qupath" / "qupath-0.5-export.geojson"
    with caplog.at_level(logging.WARNING):
        assert read_annotations(path, class_map, allow_empty=True) == []
    assert "skipped 3 annotation(s) without a classification" in caplog.text
    with pytest.raises(AnnotationError) as exc:
        read_annotations(path, class_map)
    _one_line(exc, str(path), "classification")
    anns = read_annotations(path, class_map, unclassified="Tumor")
    assert len(anns) == 3 and {a.class_name for a in anns} == {"Tumor"} and {a.label for a in anns} == {2}
    assert {a.name for a in anns} == {"UT", "I"}
    assert all(a.geometry.area > 1000 for a in anns)
    with pytest.raises(AnnotationError):
        read_annotations(path, class_map, unclassified="error")


def test_unclassified_feature_named_like_a_class_takes_that_class(tmp_path, class_map):
    f = make_feature(box(0, 0, 10, 10), None, None, name="Stroma")
    anns = read_annotations(_write(tmp_path, [f]), class_map)
    assert [a.class_name for a in anns] == ["Stroma"] and anns[0].label == 3


def test_not_geojson(tmp_path, class_map):
    bad = tmp_path / "notes.geojson"
    bad.write_text("this is not json")
    with pytest.raises(AnnotationError) as exc:
        read_annotations(bad, class_map)
    _one_line(exc, str(bad), "not a GeoJSON")
    other = tmp_path / "other.geojson"
    other.write_text(json.dumps({"hello": [1, 2]}))
    with pytest.raises(AnnotationError) as exc:
        read_annotations(other, class_map)
    _one_line(exc, str(other), "not GeoJSON")
    with pytest.raises(AnnotationError, match="not found"):
        read_annotations(tmp_path / "missing.geojson", class_map)


def test_self_intersecting_polygon_is_repaired_with_warning(tmp_path, class_map, caplog):
    bowtie = {"type": "Polygon", "coordinates": [[[0, 0], [100, 100], [100, 0], [0, 100], [0, 0]]]}
    feature = {"type": "Feature", "geometry": bowtie,  # written by hand: make_feature would repair it
               "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}}}
    path = _write(tmp_path, [feature])
    with caplog.at_level(logging.WARNING):
        anns = read_annotations(path, class_map)
    assert "make_valid" in caplog.text and str(path) in caplog.text
    assert anns[0].geometry.is_valid
    assert anns[0].geometry.area == pytest.approx(5000)  # two triangles of 2500


def test_unknown_class_names_listed(tmp_path, class_map):
    path = _write(tmp_path, [make_feature(box(0, 0, 5, 5), "Necrosis", (0, 0, 0)),
                             make_feature(box(0, 0, 5, 5), "Tumour", (0, 0, 0)),
                             make_feature(box(0, 0, 5, 5), "Tumor", (0, 0, 0))])
    with pytest.raises(ClassMapError) as exc:
        read_annotations(path, class_map)
    _one_line(exc, str(path), "Necrosis, Tumour", "Background, Tumor, Stroma, Other")


def test_annotations_outside_slide(tmp_path, class_map, caplog):
    path = _write(tmp_path, [make_feature(box(5000, 5000, 6000, 6000), "Tumor", (200, 0, 0))])
    with pytest.raises(AnnotationError) as exc:
        read_annotations(path, class_map, slide_size=(1000, 800))
    _one_line(exc, str(path), "outside the slide", "1000x800")
    # partly outside: clipped; one of two outside: dropped with a warning
    path2 = _write(tmp_path, [make_feature(box(900, 700, 1100, 900), "Tumor", (200, 0, 0)),
                              make_feature(box(5000, 5000, 6000, 6000), "Stroma", (0, 0, 0))], "b.geojson")
    with caplog.at_level(logging.WARNING):
        anns = read_annotations(path2, class_map, slide_size=(1000, 800))
    assert len(anns) == 1 and anns[0].geometry.area == pytest.approx(100 * 100)
    assert "outside the slide" in caplog.text


def test_no_annotations(tmp_path, class_map):
    path = _write(tmp_path, [])
    with pytest.raises(AnnotationError) as exc:
        read_annotations(path, class_map)
    _one_line(exc, str(path), "no polygon annotations")
    assert isinstance(exc.value, HistoUNetError)
    points = _write(tmp_path, [make_feature(Point(3, 3), "Tumor", (0, 0, 0))], "p.geojson")
    with pytest.raises(AnnotationError):
        read_annotations(points, class_map)


def test_rasterize_holes_multipolygons_and_overlaps(class_map):
    ring = Point(200, 200).buffer(150).difference(Point(200, 200).buffer(60))  # hole
    multi = MultiPolygon([box(400, 20, 480, 100), box(400, 300, 480, 380)])
    nest = Point(300, 200).buffer(40)  # overlaps the ring: smaller wins
    anns = [Annotation(ring, "Stroma", 3), Annotation(multi, "Other", 4), Annotation(nest, "Tumor", 2)]
    lab = rasterize(anns, x=0, y=0, width=256, height=256, downsample=2)
    assert lab.dtype == np.uint8 and lab.shape == (256, 256)
    assert lab[100, 100] == 0  # hole centre at (200, 200) level 0
    assert lab[100, 150] == 2  # nest centre (300, 200) drawn over the ring
    assert lab[30, 220] == 4 and lab[170, 220] == 4  # both parts of the MultiPolygon
    areas = class_areas(anns, class_map)
    counts = np.bincount(lab.ravel(), minlength=5)
    for name, label in [("Tumor", 2), ("Stroma", 3), ("Other", 4)]:
        assert counts[label] == pytest.approx(areas[name] / 4, rel=0.01), name
    # the order of the input does not matter
    lab2 = rasterize(list(reversed(anns)), x=0, y=0, width=256, height=256, downsample=2)
    assert np.array_equal(lab, lab2)
    # (geometry, label) pairs and an offset region
    sub = rasterize([(box(10, 10, 30, 30), 1)], x=10, y=10, width=10, height=10, downsample=1)
    assert sub[:, :].sum() == 100 * 1 and rasterize([(box(10, 10, 30, 30), 1)], x=100, y=100, width=4, height=4, downsample=1).sum() == 0


def test_annotations_to_label_image_roundtrip(tmp_path, class_map):
    poly = Polygon([(100, 100), (700, 120), (650, 500), (120, 450)])
    path = _write(tmp_path, [make_feature(poly, "Tumor", (200, 0, 0))])
    lab = annotations_to_label_image(path, class_map, slide_size=(800, 600), downsample=4)
    assert lab.shape == (150, 200)
    assert (lab == 2).sum() == pytest.approx(poly.area / 16, rel=0.01)
