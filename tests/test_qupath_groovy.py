"""The Groovy scripts run on QuPath 0.5's and 0.7's own classes (``qupath-script``).

* ``groovy/export_tiles.groovy`` writes the tiles of the Python route (helpers.tiles):
  same names and positions, identical images, labels equal up to edge pixels;
* ``groovy/import_predictions.groovy`` replaces earlier predicted objects with a
  prediction GeoJSON, QuPath's reader giving the classes their colours;
* both throw on errors (non-zero exit, a message naming the problem).

The test slide is the demo slide with a strip of glass on its right, sprinkled with
tissue specks and annotated Tumor: its tiles fall on both sides of the glass rule.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from qupath_tools import ROOT, VERSIONS, dump_levels, require, run_script, script_with_settings

EXPORT = ROOT / "groovy" / "export_tiles.groovy"
IMPORT = ROOT / "groovy" / "import_predictions.groovy"
#: Settings of both routes in the comparison (small tiles, half overlap: many tiles on 1280x1024 px).
MPP, TILE, STRIDE = 1.0, 128, 64
#: QuPath's own export of every object after the import script (test-only epilogue).
EPILOGUE = "\nexportAllObjectsToGeoJson(buildFilePath(PROJECT_BASE_DIR, 'after.geojson'), 'FEATURE_COLLECTION')\n"


@pytest.fixture(scope="module")
def slide(tmp_path_factory, class_map) -> dict:
    """The glassy demo slide (zlib tiled TIFF, 0.5 um/px), its annotations, its decoded levels."""
    from shapely.geometry import box

    from helpers.demo import make_demo
    from helpers.qupath import make_feature, write_feature_collection
    from helpers.rasters import write_pyramid_tiff
    from helpers.slides import open_slide

    require(VERSIONS[0])
    d = tmp_path_factory.mktemp("qupath_groovy")
    demo = make_demo(d / "demo", width=1024, height=1024, seed=0, progress=False)
    with open_slide(demo["slide"]) as s:
        image = np.zeros((1024, 1280, 3), np.uint8)
        image[:, :1024] = s.read(0, 0, 1024, 1024, 1.0)
    rng = np.random.default_rng(0)
    strip = np.clip(238 + rng.integers(-4, 5, (1024, 256, 3)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:1024, 0:256]
    for _ in range(90):  # tissue discs, denser further down: glass fractions from 1.0 to ~0.9
        cy, cx, r = int(1024 * np.sqrt(rng.random())), rng.integers(0, 256), rng.integers(5, 10)
        strip[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = (205, 130, 185)
    for _ in range(300):  # specks the glass rule's opening removes
        cy, cx = rng.integers(0, 1024), rng.integers(0, 255)
        strip[cy:cy + 2, cx:cx + 2] = (190, 110, 170)
    image[:, 1024:] = strip
    wd = d / "wd"
    path = wd / "slides" / "glassy.tiff"
    path.parent.mkdir(parents=True)
    write_pyramid_tiff(path, image, width=1280, height=1024, channels=3, kind="rgb", compression="zlib", tile=128,
                       mpp=0.5, downsample=1.0)
    feats = json.loads(Path(demo["annotations"]).read_text())["features"]
    tumor = class_map.by_label(class_map.label_of("Tumor"))
    feats.append(make_feature(box(1024, 0, 1280, 1024), tumor.name, tumor.color, name="tumour on glass"))
    geojson = write_feature_collection(feats, wd / "annotations" / "glassy.geojson")
    return {"dir": d, "wd": wd, "slide": path, "geojson": geojson, "levels": dump_levels(path, d / "levels")}


@pytest.fixture(scope="module")
def python_tiles(slide, class_map) -> dict:
    """The Python route's tiles with the script's rules, and without the glass rule."""
    from helpers.tiles import export_tiles

    kw = dict(slides=slide["wd"] / "slides", annotations=slide["wd"] / "annotations", mpp=MPP, tile_size=TILE,
              stride=STRIDE)
    export_tiles(slide["wd"], class_map, **kw)
    export_tiles(slide["dir"] / "no_glass_rule", class_map, max_glass_fraction=1.0, **kw)
    names = lambda folder: {p.name for p in folder.glob("*.png")}  # noqa: E731
    return {"dir": slide["wd"] / "tiles", "names": names(slide["wd"] / "tiles"),
            "names_without_glass_rule": names(slide["dir"] / "no_glass_rule" / "tiles")}


def _edge_distance(anns, x: float, y: float) -> float:
    from shapely.geometry import Point

    return min(a.geometry.boundary.distance(Point(x, y)) for a in anns)


@pytest.mark.parametrize("version", VERSIONS)
def test_export_script_writes_the_python_routes_tiles(slide, python_tiles, class_map, version, tmp_path):
    from helpers.annotations import read_annotations
    from helpers.io import read_image
    from helpers.tiles import parse_tile_name, read_label_tile

    script = script_with_settings(EXPORT, tmp_path / "export.groovy", requestedPixelSize=str(MPP), tileSize=str(TILE),
                                  overlap=str(TILE - STRIDE))
    proc = run_script(version, script, slide["levels"], slide["geojson"], tmp_path / "project")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "project" / "tiles"
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # the temporary folder is gone
    names = {p.name for p in out.glob("*.png")}
    # same tile set: names (slide, downsample, x, y, w, h) and so positions
    assert names == python_tiles["names"]
    n_tiles = len(names) // 2
    glass_skipped = (len(python_tiles["names_without_glass_rule"]) - len(python_tiles["names"])) // 2
    assert n_tiles >= 20 and glass_skipped >= 3  # both sides of the glass rule are exercised
    m = re.search(r"Exported (\d+) tiles .*: (\d+) annotated, (\d+) under 0.05 labelled, (\d+) more than 0.95 glass",
                  proc.stdout)
    assert m and int(m.group(1)) == n_tiles and int(m.group(4)) == glass_skipped, proc.stdout
    # identical images; labels equal but for pixels whose corner lies on an annotation edge (within
    # 0.05 level-0 px: Java2D's rounding, and CORNER_OFFSET, see helpers.annotations)
    anns = read_annotations(slide["geojson"], class_map, slide_size=(1280, 1024))
    differ = total = 0
    for name in sorted(n for n in names if n.endswith("-labelled.png")):
        image = name.replace("-labelled.png", ".png")
        assert np.array_equal(read_image(out / image), read_image(python_tiles["dir"] / image)), image
        qp, py = read_label_tile(out / name), read_label_tile(python_tiles["dir"] / name)
        info = parse_tile_name(name.removesuffix("-labelled.png"))
        for r, c in zip(*np.nonzero(qp != py)):
            corner = (info["x"] + c * info["downsample"], info["y"] + r * info["downsample"])
            assert _edge_distance(anns, *corner) < 0.05, (name, r, c, qp[r, c], py[r, c])
        differ += int((qp != py).sum())
        total += qp.size
    agreement = 1 - differ / total
    print(f"QuPath {version}: {n_tiles} tiles, {glass_skipped} skipped as glass; labels agree on {agreement:.6%} "
          f"({differ} of {total} px)")
    assert agreement >= 0.999


def _prediction_files(tmp_path: Path, class_map) -> tuple[Path, Path, dict]:
    """Earlier objects of the image, and a prediction written by the project's writer."""
    from shapely.geometry import box

    from helpers.qupath import labels_to_features, make_feature, write_feature_collection

    lab = np.ones((256, 320), np.uint8)
    lab[20:200, 20:150] = 3
    lab[60:120, 50:110] = 2
    lab[80:100, 70:90] = 3  # stroma in a tumour hole in stroma
    lab[30:90, 200:300] = 4
    lab[50:60, 230:240] = 1  # hole
    feats = labels_to_features(lab, class_map, 4.0, mpp=0.5)
    feats.append(make_feature(box(1100, 100, 1200, 200), "Necrosis", (50, 50, 50)))  # a class the script keeps
    pred = write_feature_collection(feats, tmp_path / "project" / "predictions" / "glassy" / "glassy.geojson")
    earlier = [
        make_feature(box(0, 0, 300, 300), "Tumor", (10, 20, 30)),  # earlier import, another colour
        make_feature(box(400, 0, 500, 100), "Tumor", (10, 20, 30)),
        make_feature(box(0, 400, 100, 500), "Stroma", (150, 200, 150), object_type="detection"),
        make_feature(box(600, 600, 700, 700), "Necrosis", (50, 50, 50)),  # kept: not replaced
        make_feature(box(800, 800, 900, 900), "Immune cells", (0, 0, 255)),  # kept
        make_feature(box(900, 0, 1000, 100), None, None, name="a person's outline"),  # kept
    ]
    before = write_feature_collection(earlier, tmp_path / "earlier.geojson")
    return before, pred, {"earlier": earlier, "predicted": feats}


@pytest.mark.parametrize("version", VERSIONS)
def test_import_script_replaces_earlier_predictions(slide, class_map, version, tmp_path):
    from shapely.geometry import shape

    before, pred, objs = _prediction_files(tmp_path, class_map)
    script = script_with_settings(IMPORT, tmp_path / "import.groovy", epilogue=EPILOGUE)
    proc = run_script(version, script, slide["levels"], before, tmp_path / "project")
    assert proc.returncode == 0, proc.stderr[-2000:]
    n_pred = len(objs["predicted"])
    assert f"Imported {n_pred} objects into glassy.tiff from {pred} (removed 3 earlier ones)" in proc.stdout
    assert "WARNING glassy: classes [Necrosis] are not in CLASSES_TO_REPLACE" in proc.stdout
    after = json.loads((tmp_path / "project" / "after.geojson").read_text())["features"]

    def cls(f: dict) -> str | None:
        return (f["properties"].get("classification") or {}).get("name")

    by_class = Counter(cls(f) for f in after)
    expected = Counter(cls(f) for f in objs["predicted"]) + Counter({"Necrosis": 1, "Immune cells": 1, None: 1})
    assert by_class == expected
    # the predicted regions, holes kept; nothing of the earlier Tumor/Stroma objects left
    for name in ("Tumor", "Stroma", "Other"):
        got = [shape(f["geometry"]) for f in after if cls(f) == name]
        want = [shape(f["geometry"]) for f in objs["predicted"] if cls(f) == name]
        assert sum(g.area for g in got) == pytest.approx(sum(g.area for g in want), rel=1e-6), name
        assert sum(len(p.interiors) for g in got for p in getattr(g, "geoms", [g])) == \
            sum(len(p.interiors) for g in want for p in getattr(g, "geoms", [g])), name
        assert all(f["properties"]["objectType"] == "annotation" for f in after if cls(f) == name)
    assert sum(len(shape(f["geometry"]).interiors) for f in after if shape(f["geometry"]).geom_type == "Polygon") >= 2
    assert not any(f["properties"]["objectType"] == "detection" for f in after)
    # classes coloured as in the GeoJSON (the class map), even Tumor, earlier [10, 20, 30]
    colours = {cls(f): f["properties"]["classification"]["color"] for f in after if cls(f)}
    for name in ("Tumor", "Stroma", "Other"):
        assert colours[name] == list(class_map.by_label(class_map.label_of(name)).color), name


@pytest.mark.parametrize("version", VERSIONS)
def test_scripts_throw_on_errors(slide, version, tmp_path):
    """A failure exits non-zero with the script's message (never 'println ERROR; return').

    Each version runs the export script on an image without a pixel size, and the import
    script on one of two bad inputs (0.5: no prediction file, 0.7: a truncated one).
    """
    levels = tmp_path / "levels_no_mpp"
    shutil.copytree(slide["levels"], levels)
    info = json.loads((levels / "levels.json").read_text())
    info["mpp_x"] = info["mpp_y"] = float("nan")
    (levels / "levels.json").write_text(json.dumps(info))
    proc = run_script(version, EXPORT, levels, slide["geojson"], tmp_path / "p1")
    assert proc.returncode != 0
    assert "export_tiles.groovy: glassy.tiff has no pixel size in um; set it in Image > Pixel size" in proc.stderr
    assert not (tmp_path / "p1" / "tiles").exists() or not any((tmp_path / "p1" / "tiles").iterdir())

    geojson = tmp_path / "p2" / "predictions" / "glassy" / "glassy.geojson"
    if version == VERSIONS[0]:
        expected = f"import_predictions.groovy: {geojson} not found for image glassy.tiff; run 07_infer_slide"
    else:
        geojson.parent.mkdir(parents=True)
        geojson.write_text('{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {"type": "Pol')
        expected = f"import_predictions.groovy: {geojson} is not a GeoJSON QuPath can read"
    proc = run_script(version, IMPORT, slide["levels"], slide["geojson"], tmp_path / "p2")
    assert proc.returncode != 0
    assert expected in proc.stderr
