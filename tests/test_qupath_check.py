"""QuPath 0.5 and 0.7 read every kind of GeoJSON the project writes, with QuPath's own reader.

``qupath-check --strict`` (``../shared/tools/qupath-check``, QuPath's ``PathIO.readObjects``
as *File > Import objects* uses it) must read each file whole, and report the objects,
classes, colours, polygon parts, holes and area that the file holds (counted here with
shapely, independently of the tool). The project's reader (``helpers.annotations``) must
agree with QuPath's on the same files and on a real QuPath 0.5 export.

New GeoJSON outputs of the project belong in :func:`geojson_files`.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from qupath_tools import VERSIONS, check_geojson, require

#: The one QuPath log line --strict turns into a failure although the file was read whole:
#: Resolve hierarchy (an extra step after the import) warns above 100 annotations.
SLOW_RESOLVE = "Resolving hierarchy with"


# ----------------------------------------------------------------------------- files


def _label_cases() -> np.ndarray:
    """A label image (1 = Background) with the shapes region tracing finds hard."""
    lab = np.ones((64, 96), np.uint8)
    lab[2:12, 2:12] = 2
    lab[5:9, 5:9] = 1  # donut
    lab[2:22, 20:40] = 3
    lab[5:19, 23:37] = 1
    lab[8:16, 26:34] = 2  # island (Tumor) in the hole of a Stroma ring
    lab[26:36, 2:12] = 2
    lab[27:35, 3:11] = 1
    lab[26, 2] = 1  # hole touching the outer boundary at one corner
    lab[40:50, 2:12] = 3
    lab[44, 12:17] = 3
    lab[40:50, 17:27] = 3  # one-pixel neck
    lab[26:31, 20:25] = 4
    lab[31:36, 25:30] = 4  # two squares touching at a corner: 2 regions (4-conn.) or 1 (8-conn.)
    lab[60, 60] = 2  # single pixel
    lab[40:58, 40:58] = (np.indices((18, 18)).sum(0) % 2) * 2 + 1  # Tumor/Background checkerboard
    lab[30:40, 70:90] = 2
    lab[33, 75] = lab[34, 76] = 1  # two one-pixel holes touching at a corner
    return lab


@pytest.fixture(scope="module")
def geojson_files(tmp_path_factory, class_map) -> dict[str, Path]:
    """``{kind: file}``: every kind of GeoJSON the project writes (one flat folder, unique names)."""
    from shapely.geometry import MultiPolygon, Polygon, box

    from helpers.demo import make_demo
    from helpers.export import export_prediction
    from helpers.predict import predict_slide
    from helpers.qupath import labels_to_features, make_feature, write_feature_collection
    from slide_fixtures import make_colour_model

    require(VERSIONS[0])
    d = tmp_path_factory.mktemp("qupath_check")
    out = d / "files"
    out.mkdir()
    files: dict[str, Path] = {}

    def add(kind: str, src: Path) -> None:
        files[kind] = shutil.copy(src, out / f"{kind}.geojson")

    # demo annotations (00) and predictions (07) of the demo and the two real slides
    demo = make_demo(d / "wd", width=1024, height=1024, seed=0, progress=False)
    add("demo_annotations", demo["annotations"])
    make_colour_model(d / "model1", class_map, mpp=1.0, tile_size=64)
    make_colour_model(d / "model4", class_map, mpp=4.0, tile_size=64)
    pred = d / "pred_demo"
    predict_slide(demo["slide"], d / "model1", pred, overlap=4, progress=False)
    export_prediction(pred, smoothing=None, min_area_um2=None)  # unsmoothed: holes in islands in holes
    add("prediction_demo", pred / "demo.geojson")
    empty = d / "pred_empty"
    shutil.copytree(pred, empty, ignore=shutil.ignore_patterns("labels.tiff", "*.geojson", "overlay.png", "summary.json"))
    export_prediction(empty, min_area_um2=1e9, overwrite=True)  # no region large enough: an empty prediction
    add("prediction_empty", empty / "demo.geojson")
    shared = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "slides"
    for kind, name, mpp, object_type in [("prediction_cmu_detections", "CMU-1-Small-Region", None, "detection"),
                                         ("prediction_tcga", "tcga-cr-7395-01a-01-ts1", 0.5, "annotation")]:
        p = d / kind
        predict_slide(shared / f"{name}.svs", d / "model4", p, mpp=mpp, overlap=1, progress=False)
        export_prediction(p, min_area_um2=500, object_type=object_type)
        add(kind, p / f"{name}.geojson")

    # hand-made edge cases through the writer (helpers.qupath)
    T, S = class_map.by_label(2), class_map.by_label(3)
    hand = {
        "holes": box(0, 0, 100, 100).difference(box(10, 10, 30, 30)).difference(box(50, 50, 70, 90)),
        "multipolygon": MultiPolygon([box(0, 0, 10, 10), Polygon(box(20, 0, 60, 40).exterior.coords,
                                                                 [box(30, 10, 40, 20).exterior.coords])]),
        "hole_touching_outer_ring": Polygon([(0, 0), (100, 0), (100, 100), (0, 100)], [[(0, 50), (30, 40), (30, 60)]]),
        "one_pixel_neck": box(0, 0, 10, 10).union(box(10, 4, 20, 5)).union(box(20, 0, 30, 10)),
        "very_large_region": box(0, 0, 200_000, 150_000).difference(box(1000, 1000, 2000, 2000)),
        "self_intersecting": Polygon([(0, 0), (10, 10), (10, 0), (0, 10)]),  # the writer repairs it
    }
    for kind, geom in hand.items():
        write_feature_collection([make_feature(geom, T.name, T.color)], out / f"writer_{kind}.geojson")
        files[f"writer_{kind}"] = out / f"writer_{kind}.geojson"
    write_feature_collection([make_feature(hand["holes"], S.name, S.color, object_type="detection", name="d",
                                           measurements={"Area µm^2": 1.5})], out / "writer_detection.geojson")
    files["writer_detection"] = out / "writer_detection.geojson"
    write_feature_collection([], out / "writer_empty.geojson")
    files["writer_empty"] = out / "writer_empty.geojson"

    # the same shapes traced from label images (what 07 exports), both connectivities
    lab = _label_cases()
    probs = np.eye(4, dtype=np.float32)[lab - 1]
    for conn in (4, 8):
        feats = labels_to_features(lab, class_map, 2.0, probabilities=probs, mpp=0.5, connectivity=conn)
        files[f"labels_connectivity{conn}"] = write_feature_collection(feats, out / f"labels_connectivity{conn}.geojson")
    big = np.ones((3000, 4000), np.uint8)
    big[100:2900, 100:3900] = 3
    big[1000:2000, 1000:2000] = 2
    files["labels_very_large"] = write_feature_collection(labels_to_features(big, class_map, 16.0, mpp=0.25),
                                                          out / "labels_very_large.geojson")
    files["labels_empty"] = write_feature_collection(labels_to_features(np.ones((50, 50), np.uint8), class_map, 1.0),
                                                     out / "labels_empty.geojson")
    return files


# ----------------------------------------------------------------------------- expectations


def _expected(path: Path) -> dict:
    """What QuPath should report for a file, counted here with shapely."""
    from shapely.geometry import shape

    feats = json.loads(path.read_text())["features"]
    exp = {"objects": len(feats), "types": Counter(), "classifications": Counter(), "classification_colours": {},
           "polygon_parts": 0, "polygons_with_holes": 0, "holes": 0, "area": 0.0, "measurements": 0}
    for f in feats:
        props = f["properties"]
        exp["types"][props["objectType"]] += 1
        cls = props["classification"]
        exp["classifications"][cls["name"]] += 1
        exp["classification_colours"][cls["name"]] = "[{},{},{}]".format(*cls["color"])
        exp["measurements"] += len(props.get("measurements", {}))
        geom = shape(f["geometry"])
        for poly in getattr(geom, "geoms", [geom]):
            exp["polygon_parts"] += 1
            exp["holes"] += len(poly.interiors)
            exp["polygons_with_holes"] += bool(poly.interiors)
        exp["area"] += geom.area
    return exp


def _assert_read_whole(kind: str, report: dict) -> None:
    """--strict passed, or failed only on the Resolve-hierarchy speed warning (> 100 annotations)."""
    if report["ok"]:
        return
    assert report["failures"] == [f"{len(report['qupath_log'])} WARN/ERROR line(s) logged by QuPath"], (kind, report["failures"])
    assert all(SLOW_RESOLVE in line for line in report["qupath_log"]), (kind, report["qupath_log"])
    assert report["types"].get("annotation", 0) > 100, kind


@pytest.mark.parametrize("version", VERSIONS)
def test_qupath_reads_every_project_geojson(geojson_files, class_map, version):
    from helpers.annotations import read_annotations

    rc, reports = check_geojson(version, *geojson_files.values())
    summary = {}
    for kind, path in geojson_files.items():
        r, exp = reports[path.name], _expected(path)
        _assert_read_whole(kind, r)
        assert r["objects"] == r["hierarchy_objects"] == exp["objects"], kind
        assert r["types"] == dict(exp["types"]), kind
        assert r["classifications"] == dict(exp["classifications"]), kind
        assert r["classification_colours"] == exp["classification_colours"], kind
        assert {k: list(class_map.by_label(class_map.label_of(k)).color) for k in exp["classifications"]} == \
            {k: json.loads(v) for k, v in exp["classification_colours"].items()}, kind
        assert (r["polygon_parts"], r["polygons_with_holes"], r["holes"]) == \
            (exp["polygon_parts"], exp["polygons_with_holes"], exp["holes"]), kind
        assert r["total_area_px"] == pytest.approx(exp["area"], rel=1e-6, abs=1e-6), kind
        assert r["measurements"] == exp["measurements"], kind
        assert r["invalid_geometries"] == 0 and r["null_rois"] == 0, kind
        # the project's reader finds the same objects, classes and area
        anns = read_annotations(path, class_map, object_types=("annotation", "detection"), allow_empty=True)
        assert len(anns) == r["objects"], kind
        assert dict(Counter(a.class_name for a in anns)) == r["classifications"], kind
        assert sum(a.geometry.area for a in anns) == pytest.approx(r["total_area_px"], rel=1e-6, abs=1e-6), kind
        summary[kind] = (r["objects"], r["polygons_with_holes"], r["holes"])
    assert rc in (0, 1) and (rc == 0) == all(r["ok"] for r in reports.values())
    # the files hold what they are meant to (so the checks above are not vacuous)
    assert summary["prediction_demo"][0] > 100 and summary["prediction_demo"][2] > 10
    assert summary["prediction_empty"][0] == summary["writer_empty"][0] == summary["labels_empty"][0] == 0
    assert min(summary[k][0] for k in ("prediction_cmu_detections", "prediction_tcga", "demo_annotations")) > 0
    assert reports[geojson_files["prediction_cmu_detections"].name]["types"] == {"detection": summary["prediction_cmu_detections"][0]}
    assert summary["writer_holes"][1:] == (1, 2) and summary["writer_hole_touching_outer_ring"][1:] == (1, 1)
    assert reports[geojson_files["writer_self_intersecting"].name]["polygon_parts"] == 2
    assert reports[geojson_files["writer_very_large_region"].name]["total_area_px"] > 2.9e10
    assert summary["labels_connectivity4"][0] > summary["labels_connectivity8"][0]


@pytest.mark.parametrize("version", VERSIONS)
def test_readers_agree_on_a_real_qupath_export(shared_data, class_map, version):
    """QuPath 0.5's own export: 3 named annotations without classification, object colour only."""
    from helpers.annotations import read_annotations

    path = shared_data / "qupath" / "qupath-0.5-export.geojson"
    rc, reports = check_geojson(version, path)
    r = reports[path.name]
    assert rc == 0 and r["ok"], r["failures"]
    assert r["objects"] == 3 and r["classifications"] == {"(unclassified)": 3} and r["named"] == 3
    # unclassified for QuPath = skipped by the project's reader (names 'UT', 'I' are no classes) ...
    assert read_annotations(path, class_map, allow_empty=True) == []
    # ... and, given a class, the same 3 polygons with the same area
    anns = read_annotations(path, class_map, unclassified="Tumor")
    assert len(anns) == r["objects"] and sorted(a.name for a in anns) == ["I", "I", "UT"]
    assert sum(a.geometry.area for a in anns) == pytest.approx(r["total_area_px"], rel=1e-12)
    assert r["holes"] == sum(len(getattr(a.geometry, "interiors", [])) for a in anns) == 0


@pytest.mark.parametrize("version", VERSIONS)
def test_check_rejects_what_qupath_rejects(tmp_path, version):
    """The checks above can fail: raw GeoJSON (not the project's writer) that QuPath refuses or alters."""
    def write(name: str, geometry: dict, classification: dict) -> Path:
        feat = {"type": "Feature", "id": "00000000-0000-4000-8000-000000000001", "geometry": geometry,
                "properties": {"objectType": "annotation", "classification": classification}}
        p = tmp_path / name
        p.write_text(json.dumps({"type": "FeatureCollection", "features": [feat]}))
        return p

    square = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]}
    bowtie = {"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]}
    no_colour = write("no_colour.geojson", square, {"name": "Tumor"})
    self_intersecting = write("bowtie.geojson", bowtie, {"name": "Tumor", "color": [200, 0, 0]})
    rc, reports = check_geojson(version, no_colour, self_intersecting)
    assert rc == 1
    assert not reports["no_colour.geojson"]["ok"] and "exception" in reports["no_colour.geojson"]
    bow = reports["bowtie.geojson"]
    assert not bow["ok"]
    if version == "0.5":  # silently split into 2 parts
        assert bow["polygon_parts"] == 2 and any("polygon part" in f for f in bow["failures"])
    else:  # the whole file rejected
        assert "exception" in bow


def test_missing_tools_or_java_skip_on_a_fresh_clone_and_fail_under_ci(monkeypatch, tmp_path):
    """No ../shared or no Java: a one-line skip reason; with CI=true the same is a failure."""
    import qupath_tools

    def outcome() -> tuple[type, str]:
        qupath_tools.unavailable.cache_clear()
        try:
            qupath_tools.require("0.7")
        except BaseException as exc:  # noqa: BLE001 - pytest's Skipped/Failed are BaseExceptions
            return type(exc), str(exc)
        finally:
            qupath_tools.unavailable.cache_clear()
        return type(None), ""

    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(qupath_tools, "TOOLS", tmp_path / "nowhere")
    kind, msg = outcome()
    assert kind is pytest.skip.Exception and "nowhere not found" in msg and "\n" not in msg
    monkeypatch.setenv("CI", "true")
    kind, msg = outcome()
    assert kind is pytest.fail.Exception and msg.startswith("CI=true but ")
    monkeypatch.undo()
    qupath_tools.unavailable.cache_clear()
    if qupath_tools.unavailable("0.7") is None:  # tools present: a Java that does not run is reported too
        monkeypatch.delenv("CI", raising=False)
        monkeypatch.setenv("JAVA", str(tmp_path / "no-java"))
        kind, msg = outcome()
        assert kind is pytest.skip.Exception and "needs Java >= 21" in msg and "\n" not in msg
