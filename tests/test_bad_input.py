"""Issue 18's bad-input matrix: each bad input or hostile disk gives one line naming the file or
folder and the fix, and leaves earlier results unchanged. Helpers are called directly (fast);
only the headless-runner test runs a notebook (plain ``papermill``, as the README says).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import io as hio
from helpers.errors import (AnnotationError, ClassMapError, DiskFullError, HistoUNetError, OutputExistsError,
                            ParameterError, SlideError, WriteError)

# The inference entry points, in ONE place: issue 15 moves them to helpers.predict / helpers.export.
import helpers.predict as predict_module  # for _band_done
from helpers.predict import predict_slide
from slide_fixtures import COLOURS, make_colour_model, synthetic_image, write_slide  # tiny slide + per-pixel model

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data" / "slides"
IN_CI = os.environ.get("CI") == "true"


def need_shared(name: str) -> Path:
    path = SHARED / name
    if not path.is_file():
        if IN_CI:
            pytest.fail(f"{path} missing in CI")
        pytest.skip(f"{path} not found (../shared/data beside the checkout)")
    return path


def one_line(exc: BaseException, names: str | Path, *fix_words: str) -> str:
    """The error is one line, names the file/folder/parameter and says a fix."""
    msg = str(exc)
    assert "\n" not in msg, msg
    assert str(names) in msg, f"{names!r} not in {msg!r}"
    assert any(w in msg for w in fix_words), f"none of {fix_words} in {msg!r}"
    assert "Traceback" not in msg
    return msg


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) with its content hash."""
    return {p.relative_to(folder).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def feature(coords, name: str | None = "Tumor") -> dict:
    props = {"objectType": "annotation"}
    if name:
        props["classification"] = {"name": name, "color": [200, 0, 0]}
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [coords]}, "properties": props}


def square(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


GOOD_FEATURES = [feature(square(20, 20, 340, 270), "Stroma"), feature(square(60, 60, 200, 200), "Tumor")]


def make_workdir(root: Path, features=GOOD_FEATURES) -> Path:
    img, _ = synthetic_image(400, 300)
    (root / "slides").mkdir(parents=True)
    (root / "annotations").mkdir()
    write_slide(root / "slides" / "s1.tif", img)
    (root / "annotations" / "s1.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return root


TILE_ARGS = dict(mpp=0.5, tile_size=64, stride=64, min_labelled_fraction=0.01, max_glass_fraction=1.0)


@pytest.fixture(scope="module")
def done_wd(tmp_path_factory, class_map) -> Path:
    """A work folder whose step 01 finished (the 'earlier result')."""
    from helpers.tiles import export_tiles

    wd = make_workdir(tmp_path_factory.mktemp("done") / "wd")
    export_tiles(wd, class_map, **TILE_ARGS)
    return wd


@pytest.fixture
def wd(done_wd, tmp_path) -> Path:
    """A private copy of the finished work folder."""
    return Path(shutil.copytree(done_wd, tmp_path / "wd", symlinks=True))


def assert_refused(wd: Path, call, exc_type, names, *fix_words) -> str:
    """``call()`` raises ``exc_type`` with one line and changes nothing in ``wd``."""
    before = snapshot(wd)
    with pytest.raises(exc_type) as ei:
        call()
    msg = one_line(ei.value, names, *fix_words)
    assert snapshot(wd) == before, "earlier results changed or debris left behind"
    return msg


# ---------------------------------------------------------------- slides (01 and 07 open them the same way)

@pytest.mark.parametrize("case", ["corrupt", "zero-byte", "renamed", "untiled"])
def test_bad_slide_files(case, wd, class_map):
    from helpers.tiles import export_tiles

    slide = wd / "slides" / "s1.tif"
    if case == "corrupt":
        shutil.copy(need_shared("broken.svs"), wd / "slides" / "s1.svs")
        slide.unlink()
        slide = wd / "slides" / "s1.svs"
    elif case == "zero-byte":
        slide.write_bytes(b"")
    elif case == "renamed":  # a PNG named like a slide
        slide.unlink()
        slide = wd / "slides" / "s1.svs"
        slide.write_bytes((wd / "tiles" / "overview.png").read_bytes() if (wd / "tiles" / "overview.png").exists()
                          else next((wd / "tiles").glob("*.png")).read_bytes())
    else:
        slide.unlink()
        slide = wd / "slides" / "s1.tif"
        shutil.copy(need_shared("kidney-48-5-untiled.tif"), slide)
    msg = assert_refused(wd, lambda: export_tiles(wd, class_map, overwrite=True, **TILE_ARGS), SlideError, slide,
                         "re-export", "re-copy", "convert", "damaged")
    if case == "untiled":
        assert "tiled pyramidal TIFF" in msg


def test_slide_without_pixel_size_names_slide_mpp_in_01(tmp_path, class_map):
    from helpers.tiles import export_tiles

    wd = make_workdir(tmp_path / "wd")
    slide = wd / "slides" / "s1.tif"
    img, _ = synthetic_image(400, 300)
    write_slide(slide, img, mpp=None)
    msg = assert_refused(wd, lambda: export_tiles(wd, class_map, **TILE_ARGS), SlideError, slide, "slide_mpp=")
    assert "pass mpp=" not in msg
    export_tiles(wd, class_map, slide_mpp=0.5, **TILE_ARGS)  # following the advice works


def test_real_slide_without_pixel_size_names_slide_mpp_in_07(tmp_path, class_map):
    tcga = need_shared("tcga-cr-7395-01a-01-ts1.svs")
    model = make_colour_model(tmp_path / "model", class_map)
    msg = assert_refused(tmp_path, lambda: predict_slide(tcga, model, tmp_path / "pred", class_map=class_map),
                         SlideError, tcga, "slide_mpp=")
    assert not (tmp_path / "pred").exists()


@pytest.mark.parametrize("value", [0.0, -0.5])
def test_slide_mpp_zero_or_negative_refused_in_07(value, tmp_path, class_map):
    img, _ = synthetic_image(200, 150)
    slide = write_slide(tmp_path / "s.tif", img)
    model = make_colour_model(tmp_path / "model", class_map)
    assert_refused(tmp_path, lambda: predict_slide(slide, model, tmp_path / "pred", mpp=value, class_map=class_map),
                   ParameterError, "slide_mpp", "must be > 0")


@pytest.mark.parametrize("args, name", [
    (dict(slide_mpp=-0.5), "slide_mpp"),
    (dict(mpp=0.0), "mpp"),
    (dict(mpp=-1.0), "mpp"),
    (dict(stride=0), "stride"),
    (dict(stride=-64), "stride"),
    (dict(tile_size=0), "tile_size"),
    (dict(tile_size=-256), "tile_size"),
    (dict(tile_size=1024), "tile_size"),  # larger than the slide
])
def test_bad_tile_parameters_refused(args, name, wd, class_map):
    from helpers.tiles import export_tiles

    kw = {**TILE_ARGS, **args}
    assert_refused(wd, lambda: export_tiles(wd, class_map, overwrite=True, **kw), ParameterError, name,
                   "must be", "use a smaller")


# ---------------------------------------------------------------- annotations

BAD_GEOJSON = {
    "not-json": ("this is not json {", AnnotationError, ("GeoJSON", "export")),
    "truncated": (json.dumps({"type": "FeatureCollection", "features": GOOD_FEATURES})[:120], AnnotationError,
                  ("GeoJSON", "export")),
    "empty": (json.dumps({"type": "FeatureCollection", "features": []}), AnnotationError, ("annotat",)),
    "unknown-class": (json.dumps({"type": "FeatureCollection", "features": [feature(square(20, 20, 300, 250), "Necrosis")]}),
                      ClassMapError, ("class",)),
    "outside-slide": (json.dumps({"type": "FeatureCollection", "features": [feature(square(5000, 5000, 6000, 6000))]}),
                      AnnotationError, ("outside", "slide")),
    "unclassified-error": (json.dumps({"type": "FeatureCollection", "features": [feature(square(20, 20, 300, 250), None)]}),
                           AnnotationError, ("classif", "unclassified")),
}


@pytest.mark.parametrize("case", sorted(BAD_GEOJSON))
def test_bad_geojson(case, wd, class_map):
    from helpers.tiles import export_tiles

    text, exc_type, words = BAD_GEOJSON[case]
    geo = wd / "annotations" / "s1.geojson"
    geo.write_text(text)
    extra = {"unclassified": "error"} if case == "unclassified-error" else {}
    assert_refused(wd, lambda: export_tiles(wd, class_map, overwrite=True, **TILE_ARGS, **extra), exc_type,
                   geo.name, *words)


def test_self_intersecting_polygon_is_repaired(tmp_path, class_map):
    """A bow-tie polygon (QuPath can draw one) is made valid, not refused."""
    from helpers.tiles import export_tiles

    bowtie = [[20, 20], [300, 250], [300, 20], [20, 250], [20, 20]]
    wd = make_workdir(tmp_path / "wd", [feature(bowtie, "Tumor")])
    manifest = export_tiles(wd, class_map, **TILE_ARGS)
    assert len(manifest) > 0 and manifest["px_Tumor"].sum() > 0


def test_unclassified_skipped_with_a_warning(tmp_path, class_map, caplog):
    from helpers.tiles import export_tiles

    wd = make_workdir(tmp_path / "wd", [*GOOD_FEATURES, feature(square(250, 20, 390, 290), None)])
    manifest = export_tiles(wd, class_map, **TILE_ARGS)
    assert len(manifest) > 0


# ---------------------------------------------------------------- class maps and models

def test_class_map_with_a_gap(tmp_path):
    from helpers.config import load_class_map

    path = tmp_path / "classes.yaml"
    path.write_text("ignore_label: 0\nclasses:\n  - {label: 1, name: Background, role: background, color: [1, 1, 1]}\n"
                    "  - {label: 3, name: Tumor, role: headline, color: [200, 0, 0]}\n")
    with pytest.raises(ClassMapError) as ei:
        load_class_map(path)
    one_line(ei.value, path, "label", "gap")


def test_model_with_another_class_map(tmp_path, class_map):
    from helpers.config import load_class_map

    other = tmp_path / "other.yaml"
    other.write_text("ignore_label: 0\nclasses:\n  - {label: 1, name: Glass, role: background, color: [1, 1, 1]}\n"
                     "  - {label: 2, name: Tumor, role: headline, color: [200, 0, 0]}\n")
    img, _ = synthetic_image(200, 150)
    slide = write_slide(tmp_path / "s.tif", img)
    model = make_colour_model(tmp_path / "model", class_map)
    assert_refused(tmp_path, lambda: predict_slide(slide, model, tmp_path / "pred", class_map=load_class_map(other)),
                   ClassMapError, other, "match", "class_map")


@pytest.mark.parametrize("case", ["missing", "truncated"])
def test_missing_or_truncated_model(case, tmp_path, class_map):
    img, _ = synthetic_image(200, 150)
    slide = write_slide(tmp_path / "s.tif", img)
    model = make_colour_model(tmp_path / "model", class_map)
    keras_file = model / "best.keras"
    if case == "missing":
        keras_file.unlink()
    else:
        keras_file.write_bytes(keras_file.read_bytes()[:300])
    with pytest.raises(HistoUNetError) as ei:
        predict_slide(slide, model, tmp_path / "pred", class_map=class_map)
    msg = one_line(ei.value, "model", "05_train_model", "re-run", "retrain")
    if case == "truncated":
        assert "not found" not in msg.lower(), msg  # issue 18: a truncated file was reported as "File not found"


# ---------------------------------------------------------------- outputs that exist, interruptions

def test_outputs_that_exist_01(wd, class_map):
    from helpers.tiles import export_tiles

    assert_refused(wd, lambda: export_tiles(wd, class_map, **TILE_ARGS), OutputExistsError, wd / "tiles", "overwrite=True")


@pytest.fixture(scope="module")
def pred_setup(tmp_path_factory, class_map):
    root = tmp_path_factory.mktemp("pred")
    img, _ = synthetic_image(400, 300)
    slide = write_slide(root / "s.tif", img)
    model = make_colour_model(root / "model", class_map, mpp=0.5, tile_size=64)
    return root, slide, model


def test_outputs_that_exist_07(pred_setup, tmp_path, class_map):
    _, slide, model = pred_setup
    out = tmp_path / "pred"
    first = predict_slide(slide, model, out, class_map=class_map, overlap=1)
    # the same settings reuse the finished slide (issue 16); other settings are refused
    assert predict_slide(slide, model, out, class_map=class_map, overlap=1).seconds == first.seconds
    assert_refused(tmp_path, lambda: predict_slide(slide, model, out, class_map=class_map, overlap=4),
                   OutputExistsError, out, "overwrite=True")


def test_interrupted_07_resumes(pred_setup, tmp_path, class_map, monkeypatch):
    _, slide, model = pred_setup
    out = tmp_path / "pred"

    def stop(band):
        if band == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(predict_module, "_band_done", stop)
    with pytest.raises(KeyboardInterrupt):
        predict_slide(slide, model, out, class_map=class_map, overlap=1, checkpoint_seconds=0)
    assert not (out / "probabilities.tiff").exists()
    monkeypatch.setattr(predict_module, "_band_done", lambda band: None)
    result = predict_slide(slide, model, out, class_map=class_map, overlap=1, checkpoint_seconds=0)
    assert result.resumed_from_band == 2


# ---------------------------------------------------------------- hostile disks (the shared write guard)

def _fail_with(code):
    def fail(*a, **k):
        raise OSError(code, os.strerror(code))
    return fail


@pytest.mark.parametrize("code, words", [(errno.EROFS, ("read-only", "writable disk")),
                                         (errno.EACCES, ("permission", "chmod")),
                                         (errno.ENOSPC, ("disk full", "free space"))])
def test_step_01_hostile_disk_one_line(code, words, tmp_path, class_map, monkeypatch):
    """The lowest write of 01 (a tile PNG) fails: one line naming the work folder, no debris."""
    import imageio.v3 as iio

    from helpers.tiles import export_tiles

    wd = make_workdir(tmp_path / "wd")
    monkeypatch.setattr(iio, "imwrite", _fail_with(code))
    before = snapshot(wd)
    with pytest.raises(WriteError) as ei:
        export_tiles(wd, class_map, **TILE_ARGS)
    one_line(ei.value, wd, *words)
    assert isinstance(ei.value, DiskFullError) == (code == errno.ENOSPC)
    assert ".part" not in str(ei.value)
    assert snapshot(wd) == before and not (wd / "tiles").exists()


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_step_folder_creation_hostile_disk_one_line(code, tmp_path, monkeypatch):
    """07 makes predictions/ with step_dir(create=True): the 63-line traceback of issue 18."""
    from helpers.steps import step_dir

    monkeypatch.setattr(Path, "mkdir", _fail_with(code))
    with pytest.raises(WriteError) as ei:
        step_dir(tmp_path, "predictions", create=True)
    one_line(ei.value, tmp_path, "writable", "chmod")


def test_mark_done_full_disk_leaves_no_marker(tmp_path, monkeypatch):
    from helpers.steps import mark_done

    (tmp_path / "a.txt").write_text("x")
    monkeypatch.setattr("pandas.DataFrame.to_csv", _fail_with(errno.ENOSPC))
    with pytest.raises(DiskFullError) as ei:
        mark_done(tmp_path)
    one_line(ei.value, tmp_path, "free space")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_unreadable_input_is_not_reported_as_a_write_problem(tmp_path):
    err = PermissionError(errno.EACCES, "Permission denied", "/elsewhere/input.svs")
    assert hio.write_error(err, tmp_path) is None


def _mount_tmpfs(where: Path, opts: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        if IN_CI and os.geteuid() == 0:
            pytest.fail(f"cannot mount a tmpfs as root: {r.stderr.strip()}")
        pytest.skip(f"mounting a tmpfs is not permitted here ({r.stderr.strip() or 'not root'})")


@pytest.fixture
def mounts():
    made: list[Path] = []
    yield made
    for m in reversed(made):
        subprocess.run(["umount", "-l", str(m)], capture_output=True)


def test_read_only_work_folder_real_mount(tmp_path, class_map, mounts):
    from helpers.tiles import export_tiles

    src = make_workdir(tmp_path / "src")
    wd = tmp_path / "ro"
    _mount_tmpfs(wd, "size=4m")
    mounts.append(wd)
    shutil.copytree(src, wd, dirs_exist_ok=True)
    subprocess.run(["mount", "-o", "remount,ro", str(wd)], check=True)
    assert_refused(wd, lambda: export_tiles(wd, class_map, **TILE_ARGS), WriteError, wd, "read-only")


def test_full_disk_real_tmpfs_01(tmp_path, class_map, mounts):
    from helpers.tiles import export_tiles

    src = make_workdir(tmp_path / "src")
    wd = tmp_path / "full"
    _mount_tmpfs(wd, "size=160k")
    mounts.append(wd)
    (wd / "slides").symlink_to(src / "slides")  # inputs elsewhere; the small disk holds outputs only
    (wd / "annotations").symlink_to(src / "annotations")
    with pytest.raises(DiskFullError) as ei:
        export_tiles(wd, class_map, **{**TILE_ARGS, "tile_size": 32, "stride": 16})
    one_line(ei.value, wd, "free space")
    assert sorted(p.name for p in wd.iterdir()) == ["annotations", "slides"]  # nothing half-written


def test_resumable_or_nothing(tmp_path):
    part = tmp_path / ".partial"
    part.mkdir()
    (part / "probabilities.npy").write_bytes(b"x" * 100)
    with pytest.raises(DiskFullError):  # no state yet: nothing kept
        with hio.resumable_or_nothing(part, covers=("acc.npy",)):
            raise DiskFullError("full")
    assert not part.exists()
    part.mkdir()
    (part / "acc.npy").write_bytes(b"a")
    (part / "state.json").write_text("{}")
    with pytest.raises(DiskFullError):  # state newer than what it covers: kept for resume
        with hio.resumable_or_nothing(part, covers=("acc.npy",)):
            raise DiskFullError("full")
    assert (part / "state.json").is_file()
    os.utime(part / "state.json", ns=(1, 1))
    with pytest.raises(DiskFullError):  # state older than acc.npy (failed while checkpointing): not resumable
        with hio.resumable_or_nothing(part, covers=("acc.npy",)):
            raise DiskFullError("full")
    assert not part.exists()


def test_full_disk_real_tmpfs_07_leaves_resumable_state_or_nothing(pred_setup, tmp_path, class_map, mounts):
    _, slide, model = pred_setup
    out_root = tmp_path / "full"
    _mount_tmpfs(out_root, "size=96k")
    mounts.append(out_root)
    out = out_root / "pred"
    with pytest.raises(DiskFullError) as ei:
        predict_slide(slide, model, out, class_map=class_map, overlap=16, checkpoint_seconds=1e9)
    one_line(ei.value, "pred", "free space")
    part = out / ".partial"
    assert not part.exists() or (part / "state.json").is_file()


# ---------------------------------------------------------------- umask, odd paths, cohorts

@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_step_folders_get_umask_permissions(mask, tmp_path):
    old = os.umask(mask)
    try:
        with hio.atomic_dir(tmp_path / "tiles") as tmp:
            hio.write_text("x", tmp / "a.txt")
    finally:
        os.umask(old)
    assert (tmp_path / "tiles").stat().st_mode & 0o777 == 0o777 & ~mask
    assert (tmp_path / "tiles" / "a.txt").stat().st_mode & 0o777 == 0o666 & ~mask


def test_paths_with_spaces_and_non_ascii(tmp_path, class_map):
    from helpers.tiles import export_tiles

    wd = make_workdir(tmp_path / "Prüfung Ärztin 病理 dir")
    (wd / "slides" / "s1.tif").rename(wd / "slides" / "Schnitt ö 1.tif")
    (wd / "annotations" / "s1.geojson").rename(wd / "annotations" / "Schnitt ö 1.geojson")
    manifest = export_tiles(wd, class_map, **TILE_ARGS)
    assert len(manifest) > 0 and all((wd / p).is_file() for p in manifest["image"])


def test_cohort_with_a_broken_slide(wd, class_map):
    """One broken slide among good ones: one line naming it; the earlier tiles stay."""
    from helpers.tiles import export_tiles

    broken = wd / "slides" / "s2.svs"
    shutil.copy(need_shared("broken.svs"), broken)
    shutil.copy(wd / "annotations" / "s1.geojson", wd / "annotations" / "s2.geojson")
    assert_refused(wd, lambda: export_tiles(wd, class_map, overwrite=True, **TILE_ARGS), SlideError, broken,
                   "re-export", "re-copy")


# ---------------------------------------------------------------- headless detection

class _Kernel:
    def __init__(self, parent):
        self.parent = parent

    def get_parent(self, channel=None):
        return self.parent


def _fake_shell(parent):
    return type("ZMQInteractiveShell", (), {"kernel": _Kernel(parent)})()


@pytest.mark.parametrize("parent, env, expected", [
    ({"content": {"allow_stdin": True}, "header": {}}, {}, True),          # JupyterLab, Notebook, VS Code
    ({"content": {"allow_stdin": False}, "header": {}}, {}, False),        # nbclient: papermill, nbconvert
    ({}, {}, False),                                                        # no request (kernel without front end)
    ({"content": {"allow_stdin": True}, "header": {}}, {"HISTO_HEADLESS": "1"}, False),  # helpers.pipeline/batch
])
def test_interactive_detection(parent, env, expected, monkeypatch):
    import IPython

    from helpers import nb

    monkeypatch.delenv("PAPERMILL_EXECUTION", raising=False)
    monkeypatch.delenv("HISTO_HEADLESS", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setitem(sys.modules, "papermill", None)
    del sys.modules["papermill"]
    monkeypatch.setattr(IPython, "get_ipython", lambda: _fake_shell(parent))
    assert nb.interactive() is expected


def test_plain_papermill_runs_01_to_the_end(tmp_path):
    """README's command, no PAPERMILL_EXECUTION/HISTO_HEADLESS: the widget cell must not block (issue 18)."""
    papermill = Path(sys.executable).with_name("papermill")
    if not papermill.exists():
        pytest.skip("papermill not installed next to this python")
    wd = make_workdir(tmp_path / "wd")
    env = {k: v for k, v in os.environ.items() if k not in ("PAPERMILL_EXECUTION", "HISTO_HEADLESS")}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [str(papermill), str(ROOT / "notebooks" / "01_export_tiles.ipynb"), str(tmp_path / "out.ipynb"),
           "--cwd", str(ROOT / "notebooks"), "-p", "workdir", str(wd), "-p", "mpp", "0.5", "-p", "tile_size", "64",
           "-p", "stride", "64", "-p", "min_labelled_fraction", "0.01", "-p", "max_tiles_per_slide", "8"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (wd / "tiles" / "manifest.csv").is_file()
