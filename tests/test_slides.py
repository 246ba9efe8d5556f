"""helpers.slides on real third-party slides (../shared/data/slides)."""

from __future__ import annotations

import numpy as np
import pytest

from helpers.errors import MissingMppError, SlideError
from helpers.slides import find_slides, open_slide


@pytest.fixture(scope="module")
def slides_dir(shared_data):
    return shared_data / "slides"


def test_aperio_svs_opens_with_its_mpp_and_reads_regions(slides_dir):
    with open_slide(slides_dir / "CMU-1-Small-Region.svs") as slide:
        assert slide.dimensions == (2220, 2967)
        assert slide.mpp == pytest.approx(0.499)
        assert slide.mpp_source == "file"
        assert slide.name == "CMU-1-Small-Region"
        region = slide.read(800, 1200, 300, 250, downsample=2)
        assert region.shape == (250, 300, 3) and region.dtype == np.uint8
        full = slide.read(800, 1200, 600, 500, downsample=1)
        # The downsampled read shows the same tissue as the full-resolution one.
        assert np.abs(full[::2, ::2].astype(float).mean(axis=(0, 1)) - region.mean(axis=(0, 1))).max() < 3
        assert full.std() > 10  # real tissue, not a blank
        assert slide.downsample_for(1.0) == pytest.approx(1.0 / 0.499)
        thumb, ds = slide.thumbnail(512)
        assert max(thumb.shape[:2]) == 512 and ds == pytest.approx(2967 / 512)


def test_reads_outside_the_slide_are_white(slides_dir):
    with open_slide(slides_dir / "CMU-1-Small-Region.svs") as slide:
        outside = slide.read(-400, -400, 100, 100, downsample=2)
        assert (outside == 255).all()
        w, h = slide.dimensions
        corner = slide.read(w - 50, h - 50, 100, 100)
        assert (corner[60:, 60:] == 255).all() and (corner[:40, :40] < 255).any()


@pytest.mark.parametrize("name", ["broken.svs", "kidney-48-5-untiled.tif", "missing.svs"])
def test_unusable_files_give_one_line_errors_naming_the_file(slides_dir, name):
    with pytest.raises(SlideError) as err:
        open_slide(slides_dir / name)
    msg = str(err.value)
    assert name in msg and "\n" not in msg


def test_untiled_tiff_error_says_how_to_convert(slides_dir):
    with pytest.raises(SlideError, match="tiled"):
        open_slide(slides_dir / "kidney-48-5-untiled.tif")


def test_slide_without_mpp_needs_an_override(slides_dir):
    path = slides_dir / "tcga-cr-7395-01a-01-ts1.svs"
    with open_slide(path) as slide:
        assert slide.mpp is None and slide.dimensions == (4443, 3567)
        assert slide.read(0, 0, 64, 64, downsample=4).shape == (64, 64, 3)  # pixels still readable
        with pytest.raises(MissingMppError, match="mpp"):
            slide.require_mpp()
        with pytest.raises(MissingMppError):
            slide.downsample_for(1.0)
    with open_slide(path, mpp=0.25) as slide:
        assert slide.require_mpp() == 0.25 and slide.mpp_source == "override"
        assert slide.downsample_for(1.0) == pytest.approx(4.0)


def test_find_slides_lists_slide_files(slides_dir):
    names = [p.name for p in find_slides(slides_dir)]
    assert "CMU-1-Small-Region.svs" in names and "tcga-cr-7395-01a-01-ts1.svs" in names
    assert names == sorted(names)
