"""The project's kernels are quiet but keep real errors (issue 16): the papermill runner and the kernelspec."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers.errors import HistoUNetError
from helpers.runner import KERNEL_NAME, NATIVE_OUTPUT_TO_LOG, install_kernelspec, run_notebook

ROOT = Path(__file__).resolve().parent.parent
NATIVE = "I0000 port.cc:153] oneDNN custom operations are on (a native start-up line)"


def _notebook(path, failing: bool):
    import nbformat

    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                                            "language_info": {"name": "python"}})
    params = nbformat.v4.new_code_cell("n = 1")
    params.metadata["tags"] = ["parameters"]
    cells = [params,
             nbformat.v4.new_code_cell("import os, sys, warnings\n"
                                       f"_ = os.write(2, {NATIVE + chr(10)!r}.encode())\n"
                                       "print('python stdout', n)\n"
                                       "print('python stderr', file=sys.stderr)\n"
                                       "warnings.warn('a python warning')\n"
                                       "import time; time.sleep(1)  # the kernel forwards captured fd output every 0.1 s"),
             nbformat.v4.new_code_cell("print('next cell')")]
    if failing:
        cells.append(nbformat.v4.new_code_cell("raise ValueError('the real error: tile 7 is empty')"))
    nb.cells = cells
    nbformat.write(nb, path)
    return path


def _outputs(path) -> str:
    import nbformat

    nb = nbformat.read(path, 4)
    parts = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            parts.append(o.get("text", "") + o.get("evalue", "") + "".join(o.get("traceback", [])))
    return "".join(parts)


def test_native_lines_go_to_the_kernel_log_python_output_stays(tmp_path, monkeypatch):
    # ipykernel captures native output only when PYTEST_CURRENT_TEST is unset (set again for teardown)
    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)
    out = tmp_path / "out" / "quiet.ipynb"
    run_notebook(_notebook(tmp_path / "quiet.ipynb", failing=False), out, {"n": 2})
    text = _outputs(out)
    assert "python stdout 2" in text and "python stderr" in text and "a python warning" in text
    assert NATIVE not in text  # TensorFlow-style C++ start-up lines stay out of the notebook
    log = out.with_suffix(".kernel.log")
    assert NATIVE in log.read_text()  # ...and are kept in the kernel's log


def test_a_failing_step_still_shows_its_error(tmp_path, monkeypatch):
    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)  # as in the test above
    out = tmp_path / "failed.ipynb"
    with pytest.raises(HistoUNetError) as e:
        run_notebook(_notebook(tmp_path / "step.ipynb", failing=True), out, {})
    msg = str(e.value)
    assert "\n" not in msg and "ValueError: the real error: tile 7 is empty" in msg and str(out) in msg
    text = _outputs(out)
    assert "the real error: tile 7 is empty" in text and "python stderr" in text  # in the executed copy too
    assert NATIVE not in text


def test_kernelspec_is_quiet_and_reinstall_is_idempotent(tmp_path):
    first = install_kernelspec(tmp_path)
    spec = json.loads((install_kernelspec(tmp_path) / "kernel.json").read_text())  # again over an existing one
    assert first.name == KERNEL_NAME and first == tmp_path / "share" / "jupyter" / "kernels" / KERNEL_NAME
    assert spec["display_name"] == "Histo-UNet (.venv)"
    assert spec["argv"].count(NATIVE_OUTPUT_TO_LOG) == 1 and "{connection_file}" in spec["argv"]
    assert spec["env"]["TF_CPP_MIN_LOG_LEVEL"] in ("2", "3") and spec["env"]["SM_FRAMEWORK"] == "tf.keras"


def test_notebooks_name_the_installed_kernel():
    import nbformat

    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        meta = nbformat.read(path, 4).metadata
        assert meta.kernelspec.name == KERNEL_NAME, path.name
        assert meta.kernelspec.display_name == "Histo-UNet (.venv)", path.name
        assert meta.kernelspec.language == meta.language_info.name == "python", path.name
