"""The notebooks' widgets in a real browser: JupyterLab + headless Chromium (Playwright).

Each test opens a notebook in JupyterLab (started on 127.0.0.1 from this environment),
runs all cells over a small finished work folder (built once per test session with
:mod:`helpers.pipeline` on ``tests/params``; the notebooks reuse its results), checks the
viewer renders as ipywidgets (not ``VBox(children=...)`` text), changes a control and
checks the picture changes, and that the browser console shows no errors. Screenshots
go to ``runs/browser/``.

Outside CI the tests skip with one line when Chromium or Playwright is missing; with
``CI=true`` they fail instead.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "runs" / "browser"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWERS = {  # notebook -> (control to change, what to click)
    "03_refine_labels": "tile slider",
    "04_augment_tiles": "first strength slider",
    "07_infer_slide": "first class toggle",
}


def _need_browser() -> None:
    reason = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reason = "playwright is not installed (pip install -e '.[dev]')"
    if reason is None and not Path(CHROMIUM).is_file():
        reason = "Chromium not found (apt-get install chromium)"
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests cannot run in CI: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def finished_workdir(chain_workdir) -> Path:
    """The chain test's finished work folder (every notebook on tests/params); only read here."""
    _need_browser()
    return chain_workdir[0]


@pytest.fixture(scope="session")
def lab(finished_workdir: Path, tmp_path_factory):
    """JupyterLab on 127.0.0.1 with a token, serving copies of the notebooks parameterised for the work folder."""
    import nbformat
    from helpers.pipeline import notebook_parameters

    root = tmp_path_factory.mktemp("lab")
    for name in VIEWERS:
        src = ROOT / "notebooks" / f"{name}.ipynb"
        params = notebook_parameters(src, finished_workdir, ROOT / "tests" / "params", overwrite=False)
        params["class_map"] = str(ROOT / "data" / "classes.yaml")
        nb = nbformat.read(src, 4)
        at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
        injected = "\n".join(f"{k} = {v!r}" for k, v in params.items())
        nb.cells.insert(at + 1, nbformat.v4.new_code_cell(f"# injected by the browser test\n{injected}"))
        nbformat.write(nb, root / src.name)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k not in ("PAPERMILL_EXECUTION", "HISTO_HEADLESS", "MPLBACKEND")}
    env.update(PYTHONPATH=str(ROOT), JUPYTER_TOKEN=token, SM_FRAMEWORK="tf.keras", TF_CPP_MIN_LOG_LEVEL="3")
    log = open(root / "lab.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
                             f"--ServerApp.root_dir={root}", "--ServerApp.open_browser=False",
                             "--allow-root", "--LabApp.news_url=", "--LabApp.extension_manager=readonly",
                             "--ServerApp.terminals_enabled=False"],
                            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        import urllib.request

        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"JupyterLab did not start; see {root / 'lab.log'}")
        yield url, token, root
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="session")
def browser(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def _image_key(page, selector: str) -> str:
    """The src of the viewer's picture (a data: or blob: URL that changes when it is redrawn)."""
    return page.eval_on_selector(selector, "el => el.getAttribute('src') || ''")


def _run_all(page, url: str, token: str, name: str) -> None:
    # a workspace of its own (reset): only this notebook open, whatever earlier tests opened
    page.goto(f"{url}/lab/workspaces/{name[:2]}/tree/{name}.ipynb?reset&token={token}", wait_until="domcontentloaded")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
    try:  # JupyterLab asks to confirm the notebook's kernel (Histo-UNet (.venv), preselected)
        page.click(".jp-Dialog button.jp-mod-accept", timeout=10_000)
    except Exception:  # noqa: BLE001 - no dialog: the kernel started by itself
        pass
    page.wait_for_selector(".jp-StatusBar-TextItem:has-text('| Idle')", timeout=60_000)
    page.click(".lm-MenuBar-itemLabel:text-is('Run')")
    page.click(".lm-Menu-itemLabel:text-is('Run All Cells')")


def _check(browser, lab, name: str, control, picture: str) -> None:
    url, token, _ = lab
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    t0 = time.perf_counter()
    try:
        _run_all(page, url, token, name)
        page.wait_for_selector(".jp-OutputArea .jupyter-widgets .widget-slider", timeout=120_000)
        page.wait_for_function(f"() => !!document.querySelector(\"{picture}\")", timeout=60_000)
        page.wait_for_selector(".jp-StatusBar-TextItem:has-text('| Idle')", timeout=120_000)
        text = page.inner_text(".jp-Notebook")
        assert "VBox(children" not in text and "HBox(children" not in text, "a widget rendered as text"
        assert "re-run this cell to use the viewer" in text  # the hint kept for a reopened notebook
        assert "Error" not in "".join(page.locator(".jp-OutputArea-output[data-mime-type*='error']").all_inner_texts())
        page.locator(".jupyter-widgets.widget-slider").first.scroll_into_view_if_needed()
        before = _image_key(page, picture)
        assert before, f"{name}: the viewer shows no picture"
        shot1 = SHOTS / f"{name}_before.png"
        page.locator(".jp-OutputArea-output:has(.jupyter-widgets)").last.screenshot(path=str(shot1))
        control(page)
        page.wait_for_function(f"(b) => (document.querySelector(\"{picture}\")?.getAttribute('src') || '') !== b",
                               arg=before, timeout=30_000)
        shot2 = SHOTS / f"{name}_after.png"
        page.locator(".jp-OutputArea-output:has(.jupyter-widgets)").last.screenshot(path=str(shot2))
        print(f"\n{name}: {VIEWERS[name]} changed the picture; screenshots {shot1} {shot2}; "
              f"{time.perf_counter() - t0:.1f} s")
    except Exception:
        page.screenshot(path=str(SHOTS / f"{name}_failure.png"), full_page=True)
        tail = page.inner_text(".jp-Notebook")[-1500:] if page.locator(".jp-Notebook").count() else ""
        print(f"\n{name}: failed; screenshot {SHOTS / f'{name}_failure.png'}; console errors {errors[:3]}\n{tail}")
        raise
    finally:
        page.close()
    assert not errors, f"{name}: browser console errors: {errors[:3]}"


def _slider_right(index: int = 0):
    def move(page) -> None:
        handle = page.locator(".jupyter-widgets.widget-slider .noUi-handle").nth(index)
        handle.focus()
        handle.press("ArrowRight")
        handle.press("ArrowRight")

    return move


def _first_toggle(page) -> None:
    box = page.locator(".jupyter-widgets.widget-checkbox input[type=checkbox]")
    for i in range(box.count()):
        if box.nth(i).is_checked():
            box.nth(i).click()
            return
    box.first.click()


def test_label_viewer_in_browser(browser, lab):
    _check(browser, lab, "03_refine_labels", _slider_right(0), ".jupyter-widgets .widget-output img")


def test_augmentation_preview_in_browser(browser, lab):
    _check(browser, lab, "04_augment_tiles", _slider_right(0), ".jupyter-widgets .widget-output img")


def test_prediction_viewer_in_browser(browser, lab):
    _check(browser, lab, "07_infer_slide", _first_toggle, ".jupyter-widgets img.widget-image")
