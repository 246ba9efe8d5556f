"""The notebooks' widgets in a real browser: JupyterLab + headless Chromium (Playwright).

Each test opens a notebook in JupyterLab (started on 127.0.0.1 from this environment),
runs all cells over a small finished work folder (built once per test session with
:mod:`helpers.pipeline` on ``tests/params``; the notebooks reuse its results), checks the
viewer renders as ipywidgets (not ``VBox(children=...)`` text), changes a control and
checks the picture changes, and that the browser console shows no errors. JupyterLab runs
as ``make lab`` runs it: the project's kernelspec (written by
:func:`helpers.runner.install_kernelspec`, here into a temporary prefix) and the project-local
``jupyter/`` config; each test fails if a "Select Kernel" dialog or the Jupyter-news pop-up
appears, or if TensorFlow's start-up lines reach a cell. 07 also checks that the zoom keeps
its aspect ratio. Screenshots go to ``runs/browser/``; workspaces and settings to a temporary
folder (``~/.jupyter`` is not written).

Outside CI the tests skip with one line when Chromium or Playwright is missing; with
``CI=true`` they fail instead.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "runs" / "browser"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TF_NOISE = ("oneDNN", "cuda drivers", "cuInit", "absl::InitializeLog")
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
    from helpers.runner import install_kernelspec

    root = tmp_path_factory.mktemp("lab")
    state = tmp_path_factory.mktemp("lab-state")  # kernelspec, workspaces, user settings
    install_kernelspec(state)
    for name in VIEWERS:
        src = ROOT / "notebooks" / f"{name}.ipynb"
        params = notebook_parameters(src, finished_workdir, ROOT / "tests" / "params", overwrite=False)
        params["class_map"] = str(ROOT / "data" / "classes.yaml")
        nb = nbformat.read(src, 4)
        at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
        injected = "\n".join(f"{k} = {v!r}" for k, v in params.items())
        # a native library's start-up line (written to fd 2, as TensorFlow's C++ log is): must not reach the cell
        native = "import os\n_ = os.write(2, b'I0000 oneDNN native start-up line (browser test)\\n')"
        nb.cells.insert(at + 1, nbformat.v4.new_code_cell(f"# injected by the browser test\n{injected}\n{native}"))
        nbformat.write(nb, root / src.name)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = secrets.token_hex(16)
    # the kernel's variables come from the kernelspec alone (as under make lab)
    drop = ("PAPERMILL_EXECUTION", "HISTO_HEADLESS", "MPLBACKEND", "TF_CPP_MIN_LOG_LEVEL", "SM_FRAMEWORK",
            "PYTEST_CURRENT_TEST")  # ipykernel captures native output only without PYTEST_CURRENT_TEST
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PYTHONPATH=str(ROOT), JUPYTER_TOKEN=token, JUPYTER_PATH=str(state / "share" / "jupyter"),
               JUPYTER_CONFIG_PATH=str(ROOT / "jupyter"))
    log = open(root / "lab.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
                             f"--ServerApp.root_dir={root}", "--ServerApp.open_browser=False",
                             "--allow-root", "--LabApp.extension_manager=readonly", "--ServerApp.terminals_enabled=False",
                             f"--LabApp.workspaces_dir={state / 'workspaces'}",
                             f"--LabApp.user_settings_dir={state / 'settings'}"],
                            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
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


#: Records every dialog title and notification JupyterLab shows (window.__histoPopups), even brief ones.
WATCH_POPUPS = """
window.__histoPopups = [];
new MutationObserver(() => {
  for (const el of document.querySelectorAll('.jp-Dialog, .jp-Notification-Toast, .Toastify__toast')) {
    if (!el.dataset.histoSeen) { el.dataset.histoSeen = '1'; window.__histoPopups.push(el); }
  }
}).observe(document, {childList: true, subtree: true});
"""


def _popups(page) -> list[str]:
    """The text of every dialog and notification shown since the page loaded (open or closed since)."""
    return page.evaluate("() => (window.__histoPopups || []).map(e => e.textContent.trim().slice(0, 120) || e.className)")


def _run_all(page, url: str, token: str, name: str) -> None:
    # a workspace of its own (reset): only this notebook open, whatever earlier tests opened
    page.goto(f"{url}/lab/workspaces/{name[:2]}/tree/{name}.ipynb?reset&token={token}", wait_until="domcontentloaded")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
    # the notebook names the project's kernel: it starts by itself, no "Select Kernel" dialog
    page.wait_for_selector(".jp-StatusBar-TextItem:has-text('Histo-UNet (.venv) | Idle')", timeout=60_000)
    assert not page.locator(".jp-Dialog").count(), f"{name}: a dialog is open: {_popups(page)}"
    page.click(".lm-MenuBar-itemLabel:text-is('Run')")
    page.click(".lm-Menu-itemLabel:text-is('Run All Cells')")


def _check(browser, lab, name: str, control, picture: str, check=None) -> None:
    url, token, _ = lab
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.add_init_script(WATCH_POPUPS)
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
        noise = [n for n in TF_NOISE if n in text]
        assert not noise, f"{name}: TensorFlow start-up lines in the cell output: {noise}"
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
        if check is not None:
            check(page)
        popups = _popups(page)
        assert not popups, f"{name}: JupyterLab showed dialogs/notifications: {popups}"
        sessions = json.load(urllib.request.urlopen(f"{url}/api/sessions?token={token}", timeout=10))
        kernels = {s["kernel"]["name"] for s in sessions if s["path"].endswith(f"{name}.ipynb")}
        assert kernels == {"histo-unet"}, f"{name}: kernel {kernels}, not the project's"
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


def _zoom_keeps_aspect(page) -> None:
    """07: the zoom picture is drawn with the zoom region's width:height (within 2 %), not stretched."""
    import re

    label = page.locator(".jupyter-widgets.widget-html:has-text('model px')").last.inner_text()
    x0, x1, y0, y1 = map(int, re.search(r"x=(\d+)\.\.(\d+), y=(\d+)\.\.(\d+)", label).groups())
    zoom = page.locator(".jupyter-widgets img.widget-image").nth(1)
    zoom.scroll_into_view_if_needed()
    zoom.screenshot(path=str(SHOTS / "07_infer_slide_zoom.png"))
    box = zoom.bounding_box()
    region, drawn = (x1 - x0) / (y1 - y0), box["width"] / box["height"]
    print(f"07 zoom: region {x1 - x0}x{y1 - y0} px, drawn {box['width']:.0f}x{box['height']:.0f} px")
    assert abs(drawn / region - 1) < 0.02, f"zoom drawn {box['width']:.0f}x{box['height']:.0f} for a {region:.3f} region"


def test_prediction_viewer_in_browser(browser, lab):
    _check(browser, lab, "07_infer_slide", _first_toggle, ".jupyter-widgets img.widget-image", _zoom_keeps_aspect)
