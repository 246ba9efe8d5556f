"""Tile export, Python route (helpers.tiles), and reading QuPath tile folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from shapely.geometry import Point, box

from helpers.annotations import class_areas, read_annotations
from helpers.errors import AnnotationError, MissingMppError, OutputExistsError, ParameterError, SlideError
from helpers.io import read_image
from helpers.qupath import make_feature, write_feature_collection
from helpers.tiles import export_tiles, parse_tile_name, read_tile_folder, tile_grid, tile_name


def make_synthetic(wd: Path, width: int = 1536, height: int = 1024, mpp: float = 0.5) -> Path:
    """A tiled TIFF slide (pink tissue ellipse, purple tumour disc, glass around) + GeoJSON."""
    import tifffile

    (wd / "slides").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.full((height, width, 3), 240, np.uint8)
    img[((xx - 760) / 560.0) ** 2 + ((yy - 500) / 380.0) ** 2 < 1] = (205, 140, 185)
    img[(xx - 650) ** 2 + (yy - 450) ** 2 < 150 ** 2] = (120, 60, 140)
    img = np.clip(img.astype(int) + rng.integers(-5, 6, img.shape), 0, 255).astype(np.uint8)
    tifffile.imwrite(wd / "slides" / "synth.tiff", img, tile=(256, 256), photometric="rgb", compression="zlib",
                     resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    from shapely import affinity

    feats = [make_feature(affinity.scale(Point(760, 500).buffer(1), 580, 400), "Stroma", (150, 200, 150)),
             make_feature(Point(650, 450).buffer(165), "Tumor", (200, 0, 0))]
    write_feature_collection(feats, wd / "annotations" / "synth.geojson", overwrite=True)
    return wd / "slides" / "synth.tiff"


def test_tile_names_follow_qupath():
    assert tile_name("s", 0, 512, 512, 512, 2.0) == "s [d=2,x=0,y=512,w=512,h=512]"
    assert tile_name("s", 3, 4, 5, 6, 1.0) == "s [x=3,y=4,w=5,h=6]"
    assert tile_name("a b", 1, 2, 384, 384, 1.5) == "a b [d=1.5,x=1,y=2,w=384,h=384]"
    assert tile_name("s", 0, 0, 1, 1, 2.0040080160320644) == "s [d=2.00401,x=0,y=0,w=1,h=1]"
    for name in ["s [d=2,x=0,y=512,w=512,h=512]", "slide 1 [x=3,y=4,w=5,h=6]", "s [d=1.5,x=1,y=2,w=384,h=384]"]:
        p = parse_tile_name(name)
        assert tile_name(p["slide"], p["x"], p["y"], p["w"], p["h"], p["downsample"]) == name
    assert parse_tile_name("slide 1 [x=3,y=4,w=5,h=6]")["downsample"] == 1.0
    with pytest.raises(ParameterError):
        parse_tile_name("no brackets")


def test_tile_grid_like_tileexporter():
    # 1000 x 700 px at downsample 1.5, tile 256 (384 level-0 px), overlap 56 (stride 200):
    # origins 0, 200, 400, 600 output px -> 0, 300, 600, 900 level-0; 900 + 384 > 1000 is dropped.
    grid = tile_grid(1000, 700, 1.5, 256, 200)
    assert [g[0] for g in grid if g[1] == 0] == [0, 300, 600]
    assert {g[1] for g in grid} == {0, 300}
    assert all(g[2] == 384 and g[3] == 384 for g in grid)
    assert all(x + w <= 1000 and y + h <= 700 for x, y, w, h in grid)
    # Java Math.round half-up: 3 * 1.25 = 3.75 -> 4; 2 * 1.25 = 2.5 -> 3
    g = tile_grid(100, 100, 1.25, 2, 2)
    assert g[1][0] == 3


def test_export_tiles_python_route(tmp_path, class_map):
    wd = tmp_path / "wd"
    slide_path = make_synthetic(wd)
    m = export_tiles(wd, class_map, mpp=1.0, tile_size=128, stride=128, min_labelled_fraction=0.05)
    cols = ["tile_id", "slide", "image", "label", "x", "y", "w", "h", "downsample", "mpp", "px_unlabelled",
            "px_Background", "px_Tumor", "px_Stroma", "px_Other"]
    assert list(m.columns) == cols
    on_disk = pd.read_csv(wd / "tiles" / "manifest.csv")
    assert list(on_disk.columns) == cols and len(on_disk) == len(m) > 4
    assert (m["downsample"] == 2.0).all() and (m["w"] == 256).all() and (m["mpp"] == 1.0).all()
    for r in m.itertuples():
        assert r.tile_id == f"synth [d=2,x={r.x},y={r.y},w=256,h=256]"
        assert r.image == f"tiles/{r.tile_id}.png" and r.label == f"tiles/{r.tile_id}-labelled.png"
        img, lab = read_image(wd / r.image), read_image(wd / r.label)
        assert img.shape == (128, 128, 3) and lab.shape == (128, 128) and lab.dtype == np.uint8
        assert (lab > 0).mean() >= 0.05
        assert r.px_unlabelled + r.px_Tumor + r.px_Stroma + r.px_Background + r.px_Other == 128 * 128
    # rasterized area per class == shapely area at the tile's scale, within 1%
    anns = read_annotations(wd / "annotations" / "synth.geojson", class_map, slide_size=(1536, 1024))
    for name in ("Tumor", "Stroma"):
        expected = sum(class_areas(anns, class_map, box(r.x, r.y, r.x + r.w, r.y + r.h))[name] for r in m.itertuples()) / 4
        assert m[f"px_{name}"].sum() == pytest.approx(expected, rel=0.01), name
    # image tiles are the slide's pixels
    from helpers.slides import open_slide

    r = m.iloc[len(m) // 2]
    with open_slide(slide_path) as s:
        ref = s.read(int(r.x), int(r.y), 128, 128, 2.0)
    assert np.abs(read_image(wd / r.image).astype(int) - ref.astype(int)).max() <= 1
    # glass-only tiles are never exported; a tile of all glass would be skipped
    assert (m["px_Tumor"] > 0).any()
    # the same parameters reuse the folder; other ones are refused
    assert export_tiles(wd, class_map, mpp=1.0, tile_size=128, stride=128).equals(pd.read_csv(wd / "tiles" / "manifest.csv"))
    with pytest.raises(OutputExistsError, match="stride"):
        export_tiles(wd, class_map, mpp=1.0, tile_size=128)
    # rebuilt from file names alone (QuPath route), the manifest is the same
    qp = tmp_path / "qupath_tiles"
    shutil.copytree(wd / "tiles", qp)
    (qp / "manifest.csv").unlink()
    rebuilt = read_tile_folder(qp, class_map, slide_mpp=0.5).sort_values("tile_id").reset_index(drop=True)
    mine = m.sort_values("tile_id").reset_index(drop=True)
    assert list(rebuilt.columns) == cols
    pd.testing.assert_frame_equal(rebuilt.drop(columns=["image", "label"]), mine.drop(columns=["image", "label"]), check_dtype=False)
    assert rebuilt["image"].str.startswith("qupath_tiles/").all()
    from helpers.tiles import import_tile_folder

    wd2 = tmp_path / "wd2"
    imported = import_tile_folder(qp, wd2, class_map, slide_mpp=0.5)
    assert (wd2 / "tiles" / "manifest.csv").is_file()
    assert all((wd2 / p).is_file() for p in imported["label"])


def test_export_options(tmp_path, class_map):
    wd = tmp_path / "wd"
    make_synthetic(wd)
    m = export_tiles(wd, class_map, mpp=2.0, tile_size=64, stride=32, min_labelled_fraction=0.9, max_tiles_per_slide=5)
    assert len(m) == 5 and (m["downsample"] == 4.0).all()
    assert ((m["px_unlabelled"] / 64 ** 2) <= 0.1).all()
    with pytest.raises(ParameterError) as exc:
        export_tiles(wd, class_map, mpp=1.0, tile_size=1024, overwrite=True)
    assert "synth.tiff" in str(exc.value) and "smaller tile_size" in str(exc.value)
    with pytest.raises(ParameterError):
        export_tiles(wd, class_map, min_labelled_fraction=2, overwrite=True)


def _annotate(tmp_path, slide: Path, geom) -> Path:
    ann = tmp_path / "ann"
    write_feature_collection([make_feature(geom, "Tumor", (200, 0, 0))], ann / f"{slide.stem}.geojson", overwrite=True)
    return ann


def test_bad_slides(tmp_path, class_map, shared_data):
    slides = shared_data / "slides"
    for name, needle in [("broken.svs", "corrupt"), ("kidney-48-5-untiled.tif", "untiled")]:
        ann = _annotate(tmp_path, slides / name, box(0, 0, 300, 300))
        with pytest.raises(SlideError) as exc:
            export_tiles(tmp_path / "wd", class_map, slides=slides / name, annotations=ann)
        assert name in str(exc.value) and needle in str(exc.value) and "\n" not in str(exc.value)


def test_slide_without_mpp(tmp_path, class_map, shared_data):
    tcga = shared_data / "slides" / "tcga-cr-7395-01a-01-ts1.svs"
    ann = _annotate(tmp_path, tcga, box(1000, 1000, 2200, 2000))
    with pytest.raises(MissingMppError) as exc:
        export_tiles(tmp_path / "wd", class_map, slides=tcga, annotations=ann)
    assert tcga.name in str(exc.value) and "mpp" in str(exc.value)
    m = export_tiles(tmp_path / "wd", class_map, slides=tcga, annotations=ann, slide_mpp=0.25, mpp=2.0,
                     tile_size=64, stride=64, min_labelled_fraction=0.5)
    assert len(m) > 0 and (m["downsample"] == 8.0).all() and (m["slide"] == tcga.stem).all()


def test_missing_or_unusable_annotations(tmp_path, class_map):
    wd = tmp_path / "wd"
    make_synthetic(wd)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AnnotationError) as exc:
        export_tiles(wd, class_map, annotations=empty)
    assert "no <slide>.geojson" in str(exc.value) and "synth" in str(exc.value)
    outside = _annotate(tmp_path, wd / "slides" / "synth.tiff", box(9000, 9000, 9500, 9500))
    with pytest.raises(AnnotationError, match="outside the slide"):
        export_tiles(wd, class_map, annotations=outside)
    tiny = _annotate(tmp_path, wd / "slides" / "synth.tiff", box(700, 500, 702, 502))
    with pytest.raises(AnnotationError, match="min_labelled_fraction"):
        export_tiles(wd, class_map, annotations=tiny)
    assert not (wd / "tiles").exists()  # nothing half-written


def test_qupath_palette_label_tiles(tmp_path, class_map):
    """QuPath writes indexed (palette) label PNGs: the label values, not the colours, are read."""
    from PIL import Image

    from helpers.tiles import import_tile_folder, read_label_tile

    qp = tmp_path / "export"
    qp.mkdir()
    lab = np.zeros((32, 32), np.uint8)
    lab[:, 8:16], lab[:, 16:24], lab[:, 24:] = 1, 2, 3
    stem = "slide A [d=4,x=128,y=256,w=128,h=128]"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(qp / f"{stem}.png")
    im = Image.fromarray(lab, mode="P")
    im.putpalette([0, 0, 0, 180, 180, 180, 200, 0, 0, 150, 200, 150] + [0] * 252 * 3)
    im.save(qp / f"{stem}-labelled.png")
    assert np.array_equal(read_label_tile(qp / f"{stem}-labelled.png"), lab)
    m = read_tile_folder(qp, class_map, slide_mpp={"slide A": 0.25})
    r = m.iloc[0]
    assert (r.slide, r.x, r.y, r.w, r.h, r.downsample, r.mpp) == ("slide A", 128, 256, 128, 128, 4.0, 1.0)
    assert (r.px_unlabelled, r.px_Background, r.px_Tumor, r.px_Stroma, r.px_Other) == (256, 256, 256, 256, 0)
    wd = tmp_path / "wd"
    imported = import_tile_folder(qp, wd, class_map)
    assert np.isnan(imported["mpp"].iloc[0])
    assert np.array_equal(read_image(wd / imported["label"].iloc[0]), lab)  # plain greyscale now
    (qp / f"{stem}-labelled.png").unlink()
    with pytest.raises(Exception, match="lack a label tile"):
        read_tile_folder(qp, class_map)


def test_demo_slide_tiles_agree_with_geojson(tmp_path, class_map):
    """On H1's demo slide: rasterized pixels per class == shapely area at the tile's scale (1%).

    Label pixels are sampled at their top-left corner (QuPath's rule), so the pixels of a
    tile measure the annotations shifted by half a pixel (less CORNER_OFFSET) within it.
    """
    from shapely import affinity

    from helpers.annotations import CORNER_OFFSET, Annotation
    from helpers.demo import make_demo

    wd = tmp_path / "wd"
    make_demo(wd, width=1024, height=1024, progress=False)
    m = export_tiles(wd, class_map, mpp=1.0, tile_size=128, stride=64, min_labelled_fraction=0.01)
    anns = read_annotations(wd / "annotations" / "demo.geojson", class_map, slide_size=(1024, 1024))
    assert {a.class_name for a in anns} == set(class_map.names)
    shift = 0.5 * m["downsample"].iloc[0] - CORNER_OFFSET
    anns = [Annotation(affinity.translate(a.geometry, shift, shift), a.class_name, a.label) for a in anns]
    checked = 0
    for name in class_map.names:
        expected = sum(class_areas(anns, class_map, box(r.x, r.y, r.x + r.w, r.y + r.h))[name] for r in m.itertuples()) / 4
        if expected > 500:
            assert m[f"px_{name}"].sum() == pytest.approx(expected, rel=0.01), name
            checked += 1
    assert checked >= 3


def test_overview_without_the_slide(tmp_path, class_map):
    from helpers.views.tiles import plot_tile_overview

    m = pd.DataFrame([{"tile_id": "s [x=0,y=0,w=64,h=64]", "slide": "s", "x": 0, "y": 0, "w": 64, "h": 64},
                      {"tile_id": "s [x=64,y=0,w=64,h=64]", "slide": "s", "x": 64, "y": 0, "w": 64, "h": 64}])
    fig = plot_tile_overview(tmp_path, m, class_map)
    assert len(fig.axes[0].patches) == 2
