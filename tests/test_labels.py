"""Semi-ground truth refinement (helpers.labels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from shapely import affinity
from shapely.geometry import Point

from helpers.errors import OutputExistsError, ParameterError
from helpers.io import read_image, write_manifest
from helpers.labels import disagreement_with_truth, label_stats, refine_label, refine_tiles
from helpers.qupath import make_feature, write_feature_collection
from helpers.tiles import export_tiles
from helpers.tissue import glass_mask
from helpers.views.labels import label_viewer, plot_before_after, plot_label_stats

PINK, PURPLE, GLASS = (205, 140, 185), (120, 60, 140), (240, 240, 240)


def _tile(size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """Image: glass left third, stroma (pink) right with a glass lumen; raw labels all Stroma on the right 3/4."""
    rng = np.random.default_rng(1)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = PINK
    img[:, : size // 3] = GLASS
    yy, xx = np.mgrid[0:size, 0:size]
    lumen = (xx - 64) ** 2 + (yy - 48) ** 2 < 12 ** 2
    img[lumen] = GLASS
    img = np.clip(img.astype(int) + rng.integers(-4, 5, img.shape), 0, 255).astype(np.uint8)
    lab = np.zeros((size, size), np.uint8)
    lab[:, size // 4:] = 3
    return img, lab, lumen


def test_glass_mask():
    img, _, lumen = _tile()
    g = glass_mask(img)
    assert g[:, :30].mean() > 0.98 and g[lumen].mean() > 0.95
    tissue = np.ones_like(g)
    tissue[:, :32] = False
    tissue[lumen] = False
    assert g[tissue & ~np.pad(lumen, 0)].mean() < 0.05
    assert glass_mask(img, saturation_threshold="otsu")[:, :30].mean() > 0.98
    assert not glass_mask(np.full((32, 32, 3), PURPLE, np.uint8)).any()


def test_each_rule_and_switching_off(class_map):
    img, lab, lumen = _tile()
    off = dict(min_region=0, border_band=0, glass_in_annotations=False, free_glass=False)
    assert np.array_equal(refine_label(img, lab, class_map, **off), lab)  # every rule off: unchanged
    # glass inside the annotation -> Background (1)
    g = refine_label(img, lab, class_map, **{**off, "glass_in_annotations": True})
    assert (g[lumen] == 1).mean() > 0.95 and (g[:, 24:32] == 1).mean() > 0.9
    assert (g[:, 50:] == 3).sum() > 0 and (g[:, :24] == 0).all()  # unannotated glass untouched by this rule
    # clearly empty glass anywhere -> Background, but not within the margin of tissue
    f = refine_label(img, lab, class_map, **{**off, "free_glass": True, "free_glass_margin": 4})
    assert (f[:, :20] == 1).all() and (f[lumen] == 3).all()
    # band along annotation borders -> unlabelled
    b = refine_label(img, lab, class_map, **{**off, "border_band": 3})
    assert (b[:, 24:27] == 0).all() and (b[:, 30:] == 3).all() and (b[:, :24] == 0).all()
    # specks removed, small holes filled
    speck = lab.copy()
    speck[5:7, 5:7] = 2  # 4-pixel Tumor speck in unlabelled
    speck[60:62, 80:82] = 0  # 4-pixel hole in Stroma
    m = refine_label(img, speck, class_map, **{**off, "min_region": 16})
    assert (m[5:7, 5:7] == 0).all() and (m[60:62, 80:82] == 3).all()
    with pytest.raises(ParameterError):
        refine_label(img[:10], lab, class_map)


def make_demo_like(wd: Path, width: int = 1536, height: int = 1024, mpp: float = 0.5) -> None:
    """Synthetic slide with a dense truth and *imprecise* annotations (too large, covering glass)."""
    import tifffile

    from helpers.rasters import write_pyramid_tiff

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    tissue = ((xx - 760) / 560.0) ** 2 + ((yy - 500) / 380.0) ** 2 < 1
    lumen = (xx - 1000) ** 2 + (yy - 600) ** 2 < 70 ** 2
    tumour = (xx - 650) ** 2 + (yy - 450) ** 2 < 150 ** 2
    truth = np.ones((height, width), np.uint8)
    truth[tissue] = 3
    truth[tumour] = 2
    truth[lumen] = 1
    img = np.full((height, width, 3), 240, np.uint8)
    img[truth == 3] = PINK
    img[truth == 2] = PURPLE
    img = np.clip(img.astype(int) + rng.integers(-5, 6, img.shape), 0, 255).astype(np.uint8)
    (wd / "slides").mkdir(parents=True)
    tifffile.imwrite(wd / "slides" / "demo.tiff", img, tile=(256, 256), photometric="rgb", compression="zlib",
                     resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    write_pyramid_tiff(wd / "truth" / "demo.tiff", truth, kind="labels", channels=1, mpp=mpp)
    feats = [make_feature(affinity.scale(Point(760, 500).buffer(1), 585, 405), "Stroma", (150, 200, 150)),
             make_feature(Point(660, 445).buffer(165), "Tumor", (200, 0, 0))]
    write_feature_collection(feats, wd / "annotations" / "demo.geojson", overwrite=True)


def test_refine_tiles_reduces_wrong_labels(tmp_path, class_map):
    wd = tmp_path / "wd"
    make_demo_like(wd)
    tiles = export_tiles(wd, class_map, mpp=1.0, tile_size=128, stride=128)
    refined = refine_tiles(wd, class_map)
    assert list(refined.columns) == list(tiles.columns) + ["label_raw"]
    assert (refined["label_raw"] == tiles["label"]).all()
    assert refined["label"].str.startswith("labels/tiles/").all() and refined["label"].str.endswith("-labelled.png").all()
    for r in refined.head(5).itertuples():
        lab = read_image(wd / r.label)
        assert lab.shape == (128, 128) and int((lab == 2).sum()) == r.px_Tumor and int((lab == 0).sum()) == r.px_unlabelled
    stats = pd.read_csv(wd / "labels" / "stats.csv")
    assert list(stats["class"]) == ["unlabelled", *class_map.names]
    assert stats.set_index("class").loc["Background", "pixels_after"] > stats.set_index("class").loc["Background", "pixels_before"] == 0
    before = disagreement_with_truth(wd, tiles)
    after = disagreement_with_truth(wd, refined)
    assert before["tiles"] == after["tiles"] == len(tiles)
    assert before["wrong_fraction"] > 0.03  # the annotations are sloppy
    assert after["wrong_fraction"] < before["wrong_fraction"] / 2, (before, after)
    assert after["labelled_pixels"] > 0.5 * before["labelled_pixels"]
    # pictures and the viewer (headless)
    assert len(plot_label_stats(stats, class_map).axes) == 2
    assert len(plot_before_after(wd, refined, class_map, n=2).axes) >= 8
    viewer = label_viewer(wd, refined, class_map)
    assert viewer.children and callable(viewer.redraw)
    with pytest.raises(OutputExistsError, match="min_region"):
        refine_tiles(wd, class_map, min_region=3)
    # rules switched off: labels identical to the input
    same = refine_tiles(wd, class_map, overwrite=True, min_region=0, border_band=0, glass_in_annotations=False, free_glass=False)
    for r in same.head(3).itertuples():
        assert np.array_equal(read_image(wd / r.label), read_image(wd / r.label_raw))


def test_input_step_prefers_stain_and_uses_raw_images(tmp_path, class_map):
    wd = tmp_path / "wd"
    make_demo_like(wd)
    tiles = export_tiles(wd, class_map, mpp=2.0, tile_size=64, stride=64, max_tiles_per_slide=4)
    stain = tiles.copy()
    stain["image_raw"] = stain["image"]
    stain["image"] = "stain/does-not-exist.png"  # refinement must read the raw image, not this
    write_manifest(stain, wd / "stain" / "manifest.csv")
    out = refine_tiles(wd, class_map)
    assert "image_raw" in out.columns and (out["image"] == "stain/does-not-exist.png").all()
    out2 = refine_tiles(wd, class_map, input_step="tiles", overwrite=True)
    assert "image_raw" not in out2.columns
    with pytest.raises(ParameterError):
        refine_tiles(wd, class_map, input_step="nope", overwrite=True)
    s = label_stats(tiles, out, class_map)
    assert int(s["pixels_before"].sum()) == int(s["pixels_after"].sum()) == len(tiles) * 64 * 64


def test_demo_refinement_lowers_disagreement_with_truth(tmp_path, class_map):
    """Done-when of step 03 on H1's demo slide (dense truth in truth/demo.tiff)."""
    from helpers.demo import make_demo

    wd = tmp_path / "wd"
    make_demo(wd, width=1024, height=1024, progress=False)
    tiles = export_tiles(wd, class_map, mpp=1.0, tile_size=128, stride=64, min_labelled_fraction=0.01)
    refined = refine_tiles(wd, class_map)
    before = disagreement_with_truth(wd, refined, label_col="label_raw")
    after = disagreement_with_truth(wd, refined, label_col="label")
    assert before["tiles"] == after["tiles"] == len(tiles) > 0
    assert after["wrong_fraction"] < before["wrong_fraction"], (before, after)
    assert after["wrong_pixels"] < before["wrong_pixels"]


def test_viewer_starts_on_labelled_tissue_not_glass(tmp_path, class_map):
    """03's browser opens on the tile with the most labelled tissue; labelled glass does not count."""
    glass, tissue = class_map.background.name, [c.name for c in class_map.classes if c.name != class_map.background.name]
    rows = [{f"px_{glass}": 60000, **{f"px_{n}": 0 for n in tissue}},  # all glass (free-glass rule)
            {f"px_{glass}": 1000, **{f"px_{n}": 500 for n in tissue}},
            {f"px_{glass}": 0, **{f"px_{n}": (900 if i == 0 else 0) for i, n in enumerate(tissue)}}]
    manifest = pd.DataFrame([{"slide": "s", "x": 0, "y": 0, "image": "i.png", "label": "l.png", **r} for r in rows])
    viewer = label_viewer(tmp_path, manifest, class_map)
    assert viewer.children[0].children[0].value == 1  # 500 px of each tissue class beats 900 px of one and all the glass
