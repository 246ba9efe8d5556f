"""Re-running a step: the same parameters reuse its results, changed ones are refused in one line (issue 16)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from helpers.errors import HistoUNetError, OutputExistsError
from helpers.steps import DONE, PARAMS, fingerprint_of, mark_done, reuse_or_guard

ROOT = Path(__file__).resolve().parent.parent


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_rule(tmp_path, caplog):
    src = tmp_path / "input.csv"
    src.write_text("a\n1\n")
    out = tmp_path / "step"
    fp = fingerprint_of({"size": 3, "names": ("a", "b")}, [src])
    assert reuse_or_guard(out, fp, in_place=True) is False  # nothing yet: do it (fingerprint recorded now)
    (out / "result.txt").write_text("x")
    mark_done(out)
    assert json.loads((out / PARAMS).read_text()) == fp
    with caplog.at_level("INFO", logger="histo-unet"):
        assert reuse_or_guard(out, fingerprint_of({"size": 3, "names": ["a", "b"]}, [src])) is True
    assert [r.getMessage() for r in caplog.records] == [
        "step/ is up to date with these parameters; reusing it (overwrite=True to redo)"]
    with pytest.raises(OutputExistsError) as e:
        reuse_or_guard(out, fingerprint_of({"size": 4, "names": ["a", "b"]}, [src]))
    msg = str(e.value)
    assert "\n" not in msg and "size" in msg and "overwrite=True" in msg and "another workdir" in msg
    os.utime(src, ns=(0, 0))  # the input changed
    with pytest.raises(OutputExistsError, match="its inputs"):
        reuse_or_guard(out, fingerprint_of({"size": 3, "names": ["a", "b"]}, [src]))
    # overwrite redoes: the stale done marker goes first, so an interrupted redo never looks finished
    assert reuse_or_guard(out, fp, overwrite=True, in_place=True) is False
    assert not (out / DONE).exists()
    # an unfinished, non-empty folder is refused as before
    with pytest.raises(OutputExistsError):
        reuse_or_guard(out, fp)


def test_gif_reuse(tmp_path):
    import imageio.v3 as iio

    from helpers import gif

    frames = tmp_path / "model" / "frames"
    frames.mkdir(parents=True)
    for i in range(3):
        iio.imwrite(frames / f"epoch_{i + 1:03d}.png", np.full((8, 8, 3), 60 * i, np.uint8))
    out = tmp_path / "gif" / "training.gif"
    gif.assemble_gif(frames, out, fps=2)
    mark_done(out.parent)
    before = _mtimes(out.parent)
    gif.assemble_gif(frames, out, fps=2)
    assert _mtimes(out.parent) == before
    with pytest.raises(OutputExistsError, match="fps"):
        gif.assemble_gif(frames, out, fps=4)
    gif.assemble_gif(frames, out, fps=4, overwrite=True)
    assert out.stat().st_mtime_ns != before["training.gif"] or gif.gif_frame_count(out) == 3


def test_augment_reuse(tmp_path):
    from helpers.augment import default_augmentation, save_augmentation

    path = tmp_path / "augment" / "augment.yaml"
    fp = fingerprint_of({"flip": 0.5})
    save_augmentation(default_augmentation(flip=0.5), path, fingerprint=fp)
    mark_done(path.parent)
    before = _mtimes(path.parent)
    save_augmentation(default_augmentation(flip=0.5), path, fingerprint=fp)
    assert _mtimes(path.parent) == before
    with pytest.raises(OutputExistsError, match="flip"):
        save_augmentation(default_augmentation(flip=0.2), path, fingerprint=fingerprint_of({"flip": 0.2}))


@pytest.fixture(scope="module")
def small_workdir(tmp_path_factory) -> Path:
    """00 and 01 on tiny parameters (Python helpers, no notebooks)."""
    from helpers.config import load_class_map
    from helpers.demo import make_demo
    from helpers.tiles import export_tiles

    wd = tmp_path_factory.mktemp("rerun")
    cmap = load_class_map(ROOT / "data" / "classes.yaml")
    make_demo(wd, width=768, height=768, class_map=cmap)
    export_tiles(wd, cmap, mpp=1.0, tile_size=64, stride=64, min_labelled_fraction=0.01, max_tiles_per_slide=12)
    return wd


def test_tiles_labels_stain_reuse(small_workdir):
    from helpers.config import load_class_map
    from helpers.labels import refine_tiles
    from helpers.normalize import normalize_tiles, reference_from
    from helpers.stain import fit_normalizer
    from helpers.tiles import export_tiles

    wd, cmap = small_workdir, load_class_map(ROOT / "data" / "classes.yaml")
    tiles = _mtimes(wd / "tiles")
    m = export_tiles(wd, cmap, mpp=1.0, tile_size=64, stride=64, min_labelled_fraction=0.01, max_tiles_per_slide=12)
    assert len(m) > 0 and _mtimes(wd / "tiles") == tiles
    with pytest.raises(OutputExistsError, match="max_tiles_per_slide"):
        export_tiles(wd, cmap, mpp=1.0, tile_size=64, stride=64, min_labelled_fraction=0.01, max_tiles_per_slide=6)
    # 02
    manifest = wd / "tiles" / DONE
    fp = fingerprint_of({"method": "macenko"}, [manifest])
    norm = fit_normalizer(reference_from(manifest, workdir=wd).image, "macenko")
    normalize_tiles(manifest, wd / "stain", norm, workdir=wd, fingerprint=fp)
    stain = _mtimes(wd / "stain")
    assert len(normalize_tiles(manifest, wd / "stain", norm, workdir=wd, fingerprint=fp)) == len(m)
    assert _mtimes(wd / "stain") == stain
    with pytest.raises(OutputExistsError, match="method"):
        normalize_tiles(manifest, wd / "stain", norm, workdir=wd, fingerprint=fingerprint_of({"method": "x"}, [manifest]))
    # 03
    refine_tiles(wd, cmap, min_region=8)
    labels = _mtimes(wd / "labels")
    refine_tiles(wd, cmap, min_region=8)
    assert _mtimes(wd / "labels") == labels
    with pytest.raises(OutputExistsError, match="min_region"):
        refine_tiles(wd, cmap, min_region=4)


def test_notebook_rerun_over_a_finished_step(small_workdir, tmp_path):
    """Papermill re-runs 03 over a finished labels/: the step reuses it and the cells below run."""
    import nbformat

    from helpers.runner import run_notebook

    nb = ROOT / "notebooks" / "03_refine_labels.ipynb"
    params = {"workdir": str(small_workdir), "class_map": str(ROOT / "data" / "classes.yaml"), "n_examples": 2}
    run_notebook(nb, tmp_path / "first.ipynb", {**params, "overwrite": True})
    labels = _mtimes(small_workdir / "labels" / "tiles")
    run_notebook(nb, tmp_path / "again.ipynb", params)
    assert _mtimes(small_workdir / "labels" / "tiles") == labels
    out = nbformat.read(tmp_path / "again.ipynb", 4)
    text = "".join(o.get("text", "") for c in out.cells if c.cell_type == "code" for o in c.outputs)
    assert "labels/ is up to date with these parameters; reusing it" in text
    assert "labelled pixels:" in text  # the summary cell ran
    with pytest.raises(HistoUNetError) as e:  # changed parameters: the one-line refusal, named by the runner
        run_notebook(nb, tmp_path / "changed.ipynb", {**params, "min_region": 3})
    assert "\n" not in str(e.value) and "OutputExistsError" in str(e.value) and "min_region" in str(e.value)
