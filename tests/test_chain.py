"""The notebook chain, run in order with papermill on tiny parameters (tests/params/).

This is the test that proves the notebooks hand over through files only: each notebook
runs in a fresh kernel, with nothing but the work folder in common.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from helpers.errors import HistoUNetError
from helpers.pipeline import NOTEBOOKS, chain, run_chain

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ROOT / "tests" / "params"

# What each notebook promises to write (globs relative to the work folder).
PROMISES = {
    "00_make_demo_data": ["slides/*.tiff", "truth/*.tiff", "annotations/*.geojson", "slides/*_thumbnail.png"],
    "01_export_tiles": ["tiles/manifest.csv", "tiles/*-labelled.png"],
    "02_normalize_stain": ["stain/manifest.csv", "stain/normalizer.json"],
    "03_refine_labels": ["labels/manifest.csv", "labels/stats.csv"],
    "04_augment_tiles": ["augment/augment.yaml"],
    "05_train_model": ["model/last.keras", "model/history.csv", "model/training_params.yaml", "model/frames/*.png"],
    "06_make_training_gif": ["gif/training.gif"],
    "07_infer_slide": ["predictions/*/labels.tiff", "predictions/*/*.geojson", "predictions/*/summary.json"],
    "08_evaluate": ["evaluation/*.csv"],
    "09_suggest_regions": ["suggestions/*.geojson", "suggestions/suggestions.csv", "suggestions/gallery.png",
                           "suggestions/manifest.csv"],
}


@pytest.fixture(scope="module")
def chain_run(chain_workdir):
    return chain_workdir


def test_every_notebook_has_tiny_params():
    for nb in chain():
        assert (PARAMS / f"{nb.stem}.yaml").is_file(), f"tests/params/{nb.stem}.yaml missing"


def test_notebooks_are_committed_clean_and_parametrized():
    import nbformat

    for nb_path in chain():
        nb = nbformat.read(nb_path, as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{nb_path.name}: needs exactly one cell tagged 'parameters'"
        assert "workdir" in tagged[0].source and "overwrite" in tagged[0].source
        assert nb.cells[0].cell_type == "markdown", f"{nb_path.name}: first cell must be the title"
        for c in nb.cells:
            if c.cell_type == "code":
                assert not c.outputs, f"{nb_path.name}: committed with outputs"
        assert len(nb.cells) <= 40, f"{nb_path.name}: {len(nb.cells)} cells; keep notebooks short"


def test_chain_runs_and_each_step_writes_what_it_promises(chain_run):
    workdir, timings = chain_run
    ran = [nb.stem for nb in chain()]
    assert ran, "no notebooks found"
    for stem in ran:
        assert f"{stem}.ipynb" in timings
        assert (workdir / "notebooks" / f"{stem}.ipynb").is_file()
        for pattern in PROMISES.get(stem, []):
            found = [p for p in workdir.glob(pattern) if p.stat().st_size > 0]
            assert found, f"{stem} did not write {pattern}"


def test_the_forest_of_03_reaches_07_as_its_teacher(chain_run):
    """tests/params: 03 with densify keeps its classifier (forest + network); 07 averages it in and records it."""
    from helpers.teacher import load_teacher

    workdir, _ = chain_run
    assert load_teacher(workdir / "labels" / "teacher.joblib")["method"] == "forest_mlp"
    infos = [json.loads(p.read_text()) for p in sorted(workdir.glob("predictions/*/prediction.json"))]
    assert infos
    for info in infos:
        teacher = info["extra"]["teacher"]
        assert teacher["pixels"] > 0 and teacher["weight"] == 0.5
        assert Path(teacher["file"]).resolve() == (workdir / "labels" / "teacher.joblib").resolve()


def test_manifests_hand_over_consistent_tiles(chain_run):
    workdir, _ = chain_run
    manifests = [workdir / s / "manifest.csv" for s in ("tiles", "stain", "labels")]
    present = [m for m in manifests if m.is_file()]
    if not present:
        pytest.skip("no tile steps in the chain yet")
    first = pd.read_csv(present[0])
    assert len(first) > 0
    for m in present:
        df = pd.read_csv(m)
        assert set(df["tile_id"]) == set(first["tile_id"]), f"{m} has different tiles"
        for col in ("image", "label"):
            for rel in df[col]:
                assert not Path(rel).is_absolute(), f"{m}: {col} paths must be relative to the workdir"
                assert (workdir / rel).is_file(), f"{m}: {rel} missing"


def test_prediction_geojson_is_a_qupath_feature_collection(chain_run, class_map):
    workdir, _ = chain_run
    files = sorted(workdir.glob("predictions/*/*.geojson"))
    if not (NOTEBOOKS / "07_infer_slide.ipynb").is_file():
        pytest.skip("inference notebook not in the chain yet")
    assert files
    data = json.loads(files[0].read_text())
    assert data["type"] == "FeatureCollection"
    for f in data["features"]:
        assert f["properties"]["objectType"] in ("annotation", "detection")
        assert f["properties"]["classification"]["name"] in class_map.names


def test_suggestions_are_unclassified_reviews_01_would_skip(chain_run, class_map):
    from helpers.annotations import read_annotations

    workdir, _ = chain_run
    if not (NOTEBOOKS / "09_suggest_regions.ipynb").is_file():
        pytest.skip("suggestion notebook not in the chain yet")
    table = pd.read_csv(workdir / "suggestions" / "suggestions.csv")
    assert len(table) >= 1 and list(table["rank"]) == list(range(1, len(table) + 1))
    assert {"slide", "x_um", "y_um", "w_um", "h_um", "score"} <= set(table.columns)
    for path in sorted(workdir.glob("suggestions/*.geojson")):
        feats = json.loads(path.read_text())["features"]
        assert feats and all("classification" not in f["properties"] for f in feats)
        assert all(f["properties"]["name"].startswith("Review ") for f in feats)
        assert read_annotations(path, class_map, unclassified=class_map.names[-1], allow_empty=True) == []


def test_rerun_reuses_with_same_parameters_and_refuses_changed_ones(chain_run, tmp_path):
    workdir, _ = chain_run
    nb = [n for n in chain() if n.stem == "03_refine_labels"]

    def state() -> dict:  # the step's results (its pictures are redrawn by the notebook each time)
        files = [workdir / "labels" / "manifest.csv", *(workdir / "labels" / "tiles").glob("*")]
        return {p: p.stat().st_mtime_ns for p in files}

    before = state()
    run_chain(workdir, PARAMS, only=[nb[0].stem])  # same parameters: the step's results are reused
    assert state() == before
    changed = tmp_path / "params"
    changed.mkdir()
    for f in PARAMS.glob("*.yaml"):
        (changed / f.name).write_text(f.read_text())
    import yaml

    p = yaml.safe_load((PARAMS / f"{nb[0].stem}.yaml").read_text()) or {}
    p["min_region"] = int(p.get("min_region", 16)) + 7
    (changed / f"{nb[0].stem}.yaml").write_text(yaml.safe_dump(p))
    with pytest.raises(HistoUNetError, match="overwrite"):
        run_chain(workdir, changed, only=[nb[0].stem])
    assert state() == before
