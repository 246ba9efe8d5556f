"""Batch inference (helpers.batch) and the one papermill runner (helpers.runner)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slide_fixtures import class_map_, setup  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parent.parent


def test_batch_skips_done_and_continues_past_failures(setup, tmp_path, shared_data, capsys):
    import shutil

    from helpers.batch import main

    d, _, _ = setup
    wd = tmp_path / "wd"
    shutil.copytree(d / "model", wd / "model")
    slides = tmp_path / "incoming"
    slides.mkdir()
    shutil.copy(d / "slide.tiff", slides / "good.tiff")
    shutil.copy(shared_data / "slides" / "broken.svs", slides / "bad.svs")
    params = tmp_path / "p.yaml"
    params.write_text("overlap: 1\nbatch_size: 4\nmin_area_um2: 100.0\n")
    rc = main(["--slides", str(slides), "--workdir", str(wd), "--params", str(params)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "FAILED bad" in err and "broken" not in err.split("FAILED bad")[0]
    summary = json.loads((wd / "predictions" / "good" / "summary.json").read_text())
    assert summary["features"] > 0
    assert (wd / "notebooks" / "batch" / "07_infer_slide_good.ipynb").is_file()
    (slides / "bad.svs").unlink()
    rc = main(["--slides", str(slides), "--workdir", str(wd), "--params", str(params)])
    assert rc == 0
    assert "0 done, 1 skipped, 0 failed" in capsys.readouterr().out


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

