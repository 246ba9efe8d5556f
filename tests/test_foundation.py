"""Tests for the shared foundation: class map, atomic output, chain runner plumbing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers.config import load_class_map
from helpers.steps import step_dir
from helpers.errors import ClassMapError, HistoUNetError, OutputExistsError
from helpers.io import atomic_path, read_image, write_image, write_json, read_json, write_manifest, read_manifest


def test_default_class_map(class_map):
    assert class_map.names == ["Background", "Tumor", "Stroma", "Other"]
    assert class_map.labels == [1, 2, 3, 4]
    assert class_map.n_classes == 4
    assert class_map.label_of("Tumor") == 2
    lut = class_map.palette()
    assert tuple(lut[0]) == (0, 0, 0) and tuple(lut[2]) == (200, 0, 0)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("classes: [", "not valid YAML"),
        ("classes: []", "non-empty"),
        ("classes:\n  - {label: 1, name: A, color: [1,2,3]}\n  - {label: 3, name: B, color: [1,2,3]}", "without gaps"),
        ("classes:\n  - {label: 1, name: A, color: [1,2,3]}\n  - {label: 2, name: A, color: [1,2,3]}", "unique"),
        ("classes:\n  - {label: 1, name: A, color: [1,2,300]}", "0-255"),
        ("classes:\n  - {label: 1, name: A}", "needs label"),
    ],
)
def test_bad_class_maps_name_the_file(tmp_path, text, fragment):
    p = tmp_path / "classes.yaml"
    p.write_text(text)
    with pytest.raises(ClassMapError) as exc:
        load_class_map(p)
    msg = str(exc.value)
    assert str(p) in msg and fragment in msg and "\n" not in msg


def test_unknown_class_lists_known(class_map):
    with pytest.raises(ClassMapError, match="known classes: Background, Tumor"):
        class_map.label_of("Necrosis")


def test_class_map_roundtrip(tmp_path, class_map):
    class_map.save(tmp_path / "c.yaml")
    again = load_class_map(tmp_path / "c.yaml")
    assert again.classes == class_map.classes


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_unless_asked(tmp_path):
    p = write_json({"a": 1}, tmp_path / "x.json")
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        write_json({"a": 2}, p)
    write_json({"a": 3}, p, overwrite=True)
    assert read_json(p) == {"a": 3}


def test_image_and_manifest_roundtrip(tmp_path):
    import pandas as pd

    img = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    write_image(img, tmp_path / "a.png")
    assert np.array_equal(read_image(tmp_path / "a.png"), img)
    df = pd.DataFrame({"tile_id": ["t1"], "x": [4]})
    write_manifest(df, tmp_path / "m.csv")
    assert read_manifest(tmp_path / "m.csv").equals(df)
    with pytest.raises(HistoUNetError, match="run 01_export_tiles first"):
        read_manifest(tmp_path / "none.csv", "01_export_tiles")


def test_step_dir(tmp_path):
    assert step_dir(tmp_path, "tiles", create=True) == tmp_path / "tiles"
    assert (tmp_path / "tiles").is_dir()
    with pytest.raises(KeyError):
        step_dir(tmp_path, "nope")


def test_importing_helpers_does_no_heavy_work():
    import subprocess
    import sys

    code = (
        "import sys, importlib, pkgutil, helpers\n"
        "for m in pkgutil.iter_modules(helpers.__path__):\n"
        "    importlib.import_module('helpers.' + m.name)\n"
        "heavy = [m for m in ('tensorflow', 'segmentation_models', 'openslide', 'staintools') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing helpers pulled in: {out.stdout.strip()}"


def test_notebook_errors_are_one_line_not_tracebacks(tmp_path, shared_data):
    """A HistoUNetError raised in a notebook reaches papermill and the chain runner as one line."""
    import nbformat
    import papermill as pm

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_code_cell("slide: str = ''", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("from helpers.nb import setup_notebook\nsetup_notebook()"),
        nbformat.v4.new_code_cell("from helpers.slides import open_slide\nopen_slide(slide)"),
    ]
    src = tmp_path / "nb.ipynb"
    nbformat.write(nb, src)
    broken = shared_data / "slides" / "broken.svs"
    with pytest.raises(pm.PapermillExecutionError) as exc:
        pm.execute_notebook(str(src), str(tmp_path / "out.ipynb"), parameters={"slide": str(broken)},
                            kernel_name="python3", progress_bar=False, cwd=str(Path(__file__).parent.parent))
    assert exc.value.ename == "SlideError"
    assert str(broken) in exc.value.evalue and "\n" not in exc.value.evalue
    out = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    error = [o for o in out.cells[-1].outputs if o.output_type == "error"][0]
    assert error.traceback == [f"SlideError: {exc.value.evalue}"]


def test_outputs_get_normal_permissions(tmp_path):
    import os
    import stat

    p = write_json({"a": 1}, tmp_path / "perm.json")
    mode = stat.S_IMODE(os.stat(p).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
