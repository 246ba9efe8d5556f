"""The one tissue/glass rule (helpers.tissue) and its users in steps 01, 02, 03 and 07."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import tissue
from helpers.errors import ParameterError

GLASS, PINK, PURPLE, PALE_GREY, BLACK = (242, 242, 240), (205, 140, 185), (120, 60, 140), (196, 196, 196), (10, 10, 10)


def _picture(size: int = 96) -> np.ndarray:
    """Quadrants: glass (top left), eosin pink (top right), hematoxylin purple (bottom left), black (bottom right)."""
    img = np.empty((size, size, 3), np.uint8)
    h = size // 2
    img[:h, :h], img[:h, h:], img[h:, :h], img[h:, h:] = GLASS, PINK, PURPLE, BLACK
    return img


class _FakeSlide:
    """Just enough of helpers.slides.Slide for slide_tissue_mask."""

    def __init__(self, image: np.ndarray):
        self.image = image

    def thumbnail(self, max_size: int = 1024) -> tuple[np.ndarray, float]:
        return self.image, 1.0


def test_glass_rule_per_pixel():
    img = _picture()
    g = tissue.glass_pixels(img)
    assert g[:48, :48].all() and not g[:48, 48:].any() and not g[48:, :].any()
    assert tissue.black_pixels(img)[48:, 48:].all() and not tissue.black_pixels(img)[:48].any()
    # grey but not bright enough is not glass (below min_brightness), a stricter threshold makes it glass
    grey = np.full((8, 8, 3), PALE_GREY, np.uint8)
    assert not tissue.glass_pixels(grey).any()
    assert tissue.glass_pixels(grey, min_brightness=0.7).all()
    with pytest.raises(ParameterError, match="otsu"):
        tissue.glass_pixels(img, saturation_threshold="unknown")


def test_tile_and_slide_masks_agree():
    """01/03 (tile masks) and 07 (slide mask) give the same answer away from region borders."""
    img = _picture()
    tile_tissue = tissue.tissue_mask(img)
    slide_tissue, ds = tissue.slide_tissue_mask(_FakeSlide(img))
    assert ds == 1.0
    inner = np.zeros(img.shape[:2], bool)
    for y in (slice(4, 44), slice(52, 92)):
        for x in (slice(4, 44), slice(52, 92)):
            inner[y, x] = True
    assert np.array_equal(tile_tissue[inner], slide_tissue[inner])
    assert tile_tissue[:48, 48:].all() and tile_tissue[48:, :48].all()
    assert not tile_tissue[:44, :44].any() and not tile_tissue[52:, 52:].any()
    assert np.array_equal(tissue.glass_mask(img)[inner], tissue.glass_pixels(img)[inner])


def test_glass_mask_cleaning():
    """Pale specks inside tissue stay tissue; small tissue specks on glass become glass."""
    img = np.full((64, 64, 3), PINK, np.uint8)
    img[10:13, 10:13] = GLASS  # 9-pixel lumen
    img[32:, :] = GLASS
    img[50:53, 50:53] = PURPLE  # 9-pixel speck on glass
    g = tissue.glass_mask(img)
    assert not g[10:13, 10:13].any() and g[50:53, 50:53].all()
    raw = tissue.glass_mask(img, min_area=0)
    assert raw[11, 11] and not raw[51, 51]


def test_stain_tissue_is_common_tissue_plus_exclusions():
    """02 never uses a pixel the common rule calls glass or black."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    img[:16] = GLASS
    est = tissue.stain_tissue_mask(img)
    assert est.any()
    assert not (est & (tissue.glass_pixels(img) | tissue.black_pixels(img))).any()
    assert not est[:16].any()


def test_demo_slide_mask_matches_truth(tmp_path, class_map):
    """On the demo slide, the 07 slide mask and the dense truth agree on what is tissue."""
    from helpers.demo import make_demo
    from helpers.rasters import read_raster
    from helpers.slides import open_slide

    demo = make_demo(tmp_path, width=1024, height=1024, progress=False)
    with open_slide(demo["slide"]) as slide:
        mask, ds = tissue.slide_tissue_mask(slide, max_size=512)
    truth = np.asarray(read_raster(demo["truth"], downsample=ds))[: mask.shape[0], : mask.shape[1]]
    truth_tissue = truth != class_map.background.label
    iou = (mask & truth_tissue).sum() / (mask | truth_tissue).sum()
    assert iou > 0.95, iou


def test_small_tissue_thumbnail_picks_the_tiles_a_full_resolution_mask_picks(tmp_path):
    """07 sizes the tissue thumbnail to the tile grid: on the demo slide it picks the tiles a full mask picks."""
    from helpers.demo import make_demo
    from helpers.predict import grid_positions
    from helpers.slides import open_slide
    from helpers.tissue import MASK_PX_PER_TILE, slide_tissue_mask, tissue_mask_size, tissue_tiles

    demo = make_demo(tmp_path, width=2048, height=2048, progress=False)
    tile, ds = 64, 2.0  # raster 1024² at the model's 1 um/px
    with open_slide(demo["slide"]) as slide:
        W, H = slide.size_at(ds)
        size = tissue_mask_size(W, H, tile)
        assert size < 2048  # the point: no full-size thumbnail for a small slide
        assert size / max(W, H) * tile >= MASK_PX_PER_TILE
        coarse, cds = slide_tissue_mask(slide, max_size=size)
        fine, fds = slide_tissue_mask(slide, max_size=2048)
    xs, ys = grid_positions(W, tile, tile // 4), grid_positions(H, tile, tile // 4)
    grid = len(xs) * len(ys)
    for min_tissue in (0.0, 0.5):
        a = {(y, x) for y, r in zip(ys, tissue_tiles(coarse, ds / cds, xs, ys, tile, min_tissue)) for x in r}
        b = {(y, x) for y, r in zip(ys, tissue_tiles(fine, ds / fds, xs, ys, tile, min_tissue)) for x in r}
        assert 0 < len(b) < grid
        assert len(a ^ b) <= 0.005 * grid, (min_tissue, len(a ^ b), grid)  # 5-6 of 3,721 tiles differ; a 128-px mask: 32
    # large slides keep the 2048-px cap; the floor keeps tiny grids readable
    assert tissue_mask_size(40000, 40000, 256) == 2048
    assert tissue_mask_size(300, 200, 256) == 512
