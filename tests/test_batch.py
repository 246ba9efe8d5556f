"""A cohort on Dask (helpers.batch, helpers.cohort) and the one papermill runner (helpers.runner).

One LocalCluster (2 worker processes on loopback) serves the whole module; the slides are
tiny synthetic ones and the model is the per-pixel colour model of tests/slide_fixtures.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from slide_fixtures import class_map_, make_colour_model, synthetic_image, write_slide  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parent.parent
PARAMS = {"overlap": 1, "batch_size": 4, "min_area_um2": 100.0}


@pytest.fixture(scope="module")
def cluster():
    from helpers.cohort import open_cluster

    with open_cluster(workers=2, tf_threads=1, dashboard_address=":0") as c:
        yield c


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, class_map_, shared_data):
    """Work folder with the colour model, 3 slides (one broken), and the sequential in-process reference."""
    from helpers.export import export_prediction
    from helpers.predict import predict_slide

    d = tmp_path_factory.mktemp("cohort")
    make_colour_model(d / "wd" / "model", class_map_, mpp=1.0, tile_size=64)
    slides = d / "incoming"
    slides.mkdir()
    for i in range(2):
        write_slide(slides / f"s{i}.tiff", synthetic_image(320, 240, seed=i)[0], mpp=0.5)
    shutil.copy(shared_data / "slides" / "broken.svs", slides / "broken.svs")
    for i in range(2):  # the sequential run: what notebook 07 does, in this process, one slide after another
        out = d / "reference" / f"s{i}"
        predict_slide(slides / f"s{i}.tiff", d / "wd" / "model", out, overlap=1, blend="mean", batch_size=4,
                      class_map=class_map_, progress=False, runtime="auto")  # 07's defaults: blend, runtime
        export_prediction(out, class_map=class_map_, smoothing="gaussian", smoothing_size=4.0, min_area_um2=100.0,
                          object_type="annotation", overwrite=True)
    return d


def _same_outputs(got: Path, ref: Path) -> None:
    for name in ("probabilities.tiff", "labels.tiff"):
        assert (got / name).read_bytes() == (ref / name).read_bytes(), f"{got / name} differs from the sequential run"
    strip = [{k: v for k, v in f.items() if k != "id"}  # QuPath object ids are random UUIDs
             for f in json.loads((got / f"{got.name}.geojson").read_text())["features"]]
    want = [{k: v for k, v in f.items() if k != "id"} for f in json.loads((ref / f"{ref.name}.geojson").read_text())["features"]]
    assert strip == want


@pytest.fixture(scope="module")
def first_run(cohort, cluster, tmp_path_factory):
    """``helpers.batch`` CLI on the existing cluster (``--scheduler``): 3 slides, one broken."""
    from helpers.batch import main

    params = tmp_path_factory.mktemp("p") / "p.yaml"
    params.write_text("".join(f"{k}: {v}\n" for k, v in PARAMS.items()))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["--slides", str(cohort / "incoming"), "--workdir", str(cohort / "wd"), "--params", str(params),
                   "--scheduler", cluster.client.scheduler.address])
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.slow
def test_cohort_two_done_one_failed_bit_identical(cohort, first_run):
    rc, out, err = first_run
    assert rc == 1
    assert "2 done, 0 skipped, 1 failed" in out
    assert "dashboard: " in out and "3 slide(s) on 2 Dask worker(s)" in out
    failed = [line for line in err.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and failed[0].startswith("FAILED broken: 07_infer_slide.ipynb failed (SlideError:")
    assert "slides/h" in err and "ETA" in err and "3/3" in err  # the progress bar
    table = pd.read_csv(cohort / "wd" / "predictions" / "cohort.csv")
    assert list(table["slide"]) == ["broken", "s0", "s1"]
    assert list(table["status"]) == ["failed", "done", "done"]
    assert table["worker"].str.startswith("tcp://127.0.0.1:").all()
    assert (table["seconds"] > 0).all()
    assert "OpenSlide cannot open" in table.loc[0, "message"]
    for i in (1, 2):
        s = json.loads((cohort / "wd" / "predictions" / table.loc[i, "slide"] / "summary.json").read_text())
        assert table.loc[i, "tumour_fraction"] == pytest.approx(s["tumour_fraction"]) and s["tumour_fraction"] > 0
        for name, area in s["areas_mm2"].items():
            assert table.loc[i, f"area_mm2_{name}"] == pytest.approx(area)
        assert Path(table.loc[i, "notebook"]).is_file()  # every slide keeps its executed notebook as its report
    for i in range(2):
        _same_outputs(cohort / "wd" / "predictions" / f"s{i}", cohort / "reference" / f"s{i}")


@pytest.mark.slow
def test_cohort_skips_done_slides_and_resumes_an_interrupted_one(cohort, cluster, first_run):
    from helpers.batch import run_cohort

    again = cohort / "again"
    again.mkdir()
    for i in range(2):
        shutil.copy(cohort / "incoming" / f"s{i}.tiff", again / f"s{i}.tiff")
    s1 = cohort / "wd" / "predictions" / "s1"
    for name in ("manifest.csv", "summary.json", "labels.tiff"):  # stopped after its prediction, before export
        (s1 / name).unlink()
    runs = run_cohort(again, cohort / "wd", params=PARAMS, cluster=cluster, progress=False)
    assert [(r.slide, r.status) for r in runs] == [("s0", "skipped"), ("s1", "done")]
    assert runs[1].message.startswith("restarted")
    _same_outputs(s1, cohort / "reference" / "s1")
    table = pd.read_csv(cohort / "wd" / "predictions" / "cohort.csv")
    assert list(table["status"]) == ["skipped", "done"] and table.loc[0, "tumour_fraction"] > 0


@pytest.mark.slow
def test_a_worker_killed_mid_slide_is_replaced_and_the_slide_finishes(cohort, cluster):
    from helpers.batch import run_cohort

    lost = cohort / "lost"
    lost.mkdir()
    shutil.copy(cohort / "incoming" / "s0.tiff", lost / "s0.tiff")
    wd = cohort / "wd_lost"
    shutil.copytree(cohort / "wd" / "model", wd / "model")
    flag = cohort / "killed.txt"
    runs = run_cohort(lost, wd, params=PARAMS, cluster=cluster, progress=False, fault=str(flag))
    killed = flag.read_text().strip()
    assert killed.startswith("tcp://")  # the first attempt ran and killed its own worker mid-slide
    assert [(r.slide, r.status) for r in runs] == [("s0", "done")], runs[0].message
    assert runs[0].worker != killed
    _same_outputs(wd / "predictions" / "s0", cohort / "reference" / "s0")
    assert killed not in cluster.client.scheduler_info()["workers"]


def _first_worker(cluster) -> str:
    return sorted(cluster.client.scheduler_info()["workers"])[0]


def _hide_from_this_worker(path: str | None) -> None:
    """On a worker: pretend ``path`` is not mounted there (None: undo); the check calls ``helpers.cohort._missing``."""
    import helpers.cohort as c

    real = c.__dict__.setdefault("_real_missing", c._missing)
    c._missing = real if path is None else (lambda paths, writable: [p for p in paths if p == path] + real(paths, writable))


@pytest.mark.slow
def test_every_worker_must_see_the_folders(cohort, cluster, tmp_path):
    from helpers.batch import run_cohort
    from helpers.cohort import check_shared
    from helpers.errors import ClusterError, ParameterError

    missing = tmp_path / "not_mounted"
    with pytest.raises(ClusterError, match=rf"^{missing}: not visible on 2 of 2 Dask worker\(s\)"):
        check_shared(cluster, [cohort / "wd", missing])
    wd = tmp_path / "wd"
    with pytest.raises(ParameterError, match=rf"^{wd / 'elsewhere'}: not found; run notebook 05_train_model first"):
        run_cohort(cohort / "incoming", wd, params={"model_dir": str(wd / "elsewhere")}, cluster=cluster, progress=False)
    assert not (wd / "predictions").exists()  # checked before any slide ran
    cluster.client.run(_hide_from_this_worker, str(cohort / "wd" / "model"), workers=[_first_worker(cluster)])
    try:
        with pytest.raises(ClusterError, match=rf"^{cohort / 'wd' / 'model'}: not visible on 1 of 2 Dask worker"):
            run_cohort(cohort / "incoming", cohort / "wd", params=PARAMS, cluster=cluster, progress=False)
    finally:
        cluster.client.run(_hide_from_this_worker, None)
    check_shared(cluster, [cohort / "wd"], writable=[cohort / "wd"])  # a visible folder passes


@pytest.mark.slow
def test_tile_export_over_a_cohort_equals_one_run_of_01(tmp_path, cluster, class_map_):
    from shapely.geometry import box

    from helpers.batch import run_cohort
    from helpers.qupath import make_feature
    from helpers.qupath import write_feature_collection as write_fc
    from helpers.tiles import export_tiles

    wd = tmp_path / "wd"
    head = next(c for c in class_map_.classes if c.role == "headline")
    other = next(c for c in class_map_.classes if c.role not in ("headline", "background"))
    for i in range(2):
        write_slide(wd / "slides" / f"t{i}.tiff", synthetic_image(320, 240, seed=i)[0], mpp=0.5)
        write_fc([make_feature(box(0, 0, 320, 240), other.name, (0, 200, 0)),
                  make_feature(box(40 + 20 * i, 40, 200, 200), head.name, (200, 0, 0))],
                 wd / "annotations" / f"t{i}.geojson", overwrite=True)
    params = {"mpp": 1.0, "tile_size": 64, "stride": 32, "min_labelled_fraction": 0.05}
    runs = run_cohort(wd / "slides", wd, step="01", params=params, cluster=cluster, progress=False)
    assert [(r.slide, r.status) for r in runs] == [("t0", "done"), ("t1", "done")], [r.message for r in runs]
    ref = tmp_path / "ref"
    want = export_tiles(ref, class_map_, slides=wd / "slides", annotations=wd / "annotations", **params)
    got = pd.read_csv(wd / "tiles" / "manifest.csv")
    pd.testing.assert_frame_equal(got, pd.read_csv(ref / "tiles" / "manifest.csv"))
    assert len(got) == len(want) > 0 and set(got["slide"]) == {"t0", "t1"}
    for rel in list(got["image"]) + list(got["label"]):
        assert (wd / rel).read_bytes() == (ref / rel).read_bytes()
    table = pd.read_csv(wd / "tiles_by_slide" / "cohort.csv")
    assert list(table["tiles"]) == [int((got["slide"] == s).sum()) for s in ("t0", "t1")]
    before = (wd / "tiles" / "manifest.csv").stat().st_mtime_ns
    runs = run_cohort(wd / "slides", wd, step="01", params=params, cluster=cluster, progress=False)
    assert [r.status for r in runs] == ["skipped", "skipped"]
    assert (wd / "tiles" / "manifest.csv").stat().st_mtime_ns == before  # up to date: not gathered again


def test_local_cluster_sizes_workers_and_threads_to_the_cores(monkeypatch):
    from helpers import cohort

    assert cohort.default_workers(2) == 1 and cohort.default_workers(16) == 8 and cohort.default_workers(1) == 1
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert cohort.dashboard_line(object()) == "dashboard: off (it needs bokeh: pip install -e '.[cluster]')"


def test_runner_checks_parameters_against_the_notebook(tmp_path):
    """pipeline and batch share one check: a parameter the notebook does not declare is a one-line error."""
    from helpers.errors import ParameterError
    from helpers.pipeline import notebook_parameters
    from helpers.runner import select_parameters

    nb = ROOT / "notebooks" / "07_infer_slide.ipynb"
    assert select_parameters(nb, {"overlap": 4, "workdir": "w"}) == {"overlap": 4, "workdir": "w"}
    with pytest.raises(ParameterError, match=r"07_infer_slide.ipynb has no parameter\(s\) bogus$"):
        select_parameters(nb, {"overlap": 4, "bogus": 1})
    assert select_parameters(nb, {"nope": 1}, optional=("nope",)) == {}
    (tmp_path / "07_infer_slide.yaml").write_text("overlap: 4\nbogus: 1\n")
    with pytest.raises(ParameterError, match="07_infer_slide.yaml: 07_infer_slide.ipynb has no parameter"):
        notebook_parameters(nb, tmp_path / "wd", tmp_path, overwrite=False)
    (tmp_path / "07_infer_slide.yaml").write_text("overlap: 4\n")
    got = notebook_parameters(nb, tmp_path / "wd", tmp_path, overwrite=True)
    assert got == {"workdir": str((tmp_path / "wd").resolve()), "overwrite": True, "overlap": 4}
