"""Notebook plumbing: logging, one-line errors, headless detection, summaries."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from helpers.errors import HistoUNetError


def setup_notebook(level: int = logging.INFO) -> None:
    """Configure logging and show :class:`HistoUNetError` as one line, not a traceback.

    Call once in the imports cell. Safe outside IPython (does nothing extra there).
    """
    os.environ.setdefault("SM_FRAMEWORK", "tf.keras")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout, force=True)
    for noisy in ("tensorflow", "absl", "h5py", "matplotlib", "PIL", "papermill", "rasterio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from IPython import get_ipython
    except ImportError:
        return
    ip = get_ipython()
    if ip is None:
        return

    def _one_line(shell, etype, evalue, tb, tb_offset=None):  # noqa: ANN001 - IPython's signature
        # Shown as the cell's error output (instead of a traceback), so the notebook,
        # papermill and the chain runner all see the one-line message.
        stb = [f"{etype.__name__}: {evalue}"]
        shell._showtraceback(etype, evalue, stb)
        return stb

    ip.set_custom_exc((HistoUNetError,), _one_line)


def interactive() -> bool:
    """True when a person runs the notebook in a front end that shows widgets.

    False under every runner: ``helpers.pipeline``/``helpers.batch`` (they set
    ``HISTO_HEADLESS``), papermill (``PAPERMILL_EXECUTION`` when run through its Python
    API), and any client that executes cells without a front end: plain ``papermill``
    from the shell, ``jupyter nbconvert --execute`` and other nbclient users send their
    execute requests with ``allow_stdin=False`` (no one to answer ``input()``), which
    JupyterLab, Notebook, VS Code and consoles do not. Plain Python and a terminal
    IPython (no widget display) are not interactive either.
    """
    if os.environ.get("PAPERMILL_EXECUTION") or os.environ.get("HISTO_HEADLESS"):
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    if ip is None or type(ip).__name__ != "ZMQInteractiveShell" or "papermill" in sys.modules:
        return False
    return _front_end_attached(ip)


def _front_end_attached(ip: Any) -> bool:
    """Whether the cell being run came from a front end (it accepts stdin) rather than a runner."""
    kernel = getattr(ip, "kernel", None)
    try:
        parent = kernel.get_parent("shell") if kernel is not None else getattr(ip, "parent_header", None)
    except TypeError:  # older ipykernel: get_parent() takes no channel
        parent = kernel.get_parent()
    except Exception:  # noqa: BLE001 - no parent message: not run from a front end
        return False
    if not isinstance(parent, dict) or not parent:
        return False
    content = parent.get("content") or {}
    return bool(content.get("allow_stdin", False))


def show_figure(out: Any, fig: Any, text: str = "") -> None:
    """Put a matplotlib figure (and an optional text line) into an ``ipywidgets.Output``.

    Sets the widget's outputs directly instead of capturing with ``with out:``: captured
    output makes nbclient (papermill, nbconvert) answer on the kernel's shell socket while
    it waits for the cell's reply, which can leave it waiting forever (issue 18). A front
    end shows both the same.
    """
    import base64
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    outputs = [{"output_type": "display_data", "metadata": {},
                "data": {"image/png": base64.b64encode(buf.getvalue()).decode("ascii"), "text/plain": repr(fig)}}]
    if text:
        outputs.append({"output_type": "stream", "name": "stdout", "text": text + "\n"})
    out.outputs = tuple(outputs)


def check_outputs(paths: list[str | Path] | dict[str, str | Path]) -> None:
    """Summary-cell check: every promised output exists and is non-empty.

    Raises:
        HistoUNetError: listing the missing outputs.
    """
    items = paths.items() if isinstance(paths, dict) else ((str(p), p) for p in paths)
    missing = []
    for label, p in items:
        p = Path(p)
        ok = p.is_dir() and any(p.iterdir()) if p.is_dir() else p.is_file() and p.stat().st_size > 0
        print(f"{'ok  ' if ok else 'MISSING'} {label}: {p}")
        if not ok:
            missing.append(str(p))
    if missing:
        raise HistoUNetError(f"outputs missing: {', '.join(missing)}; see the errors above")


def renamed_parameter(value: Any, old_value: Any, old: str, new: str) -> Any:
    """A parameter's value, honouring its old name for one release (with a warning).

    Use in the cell after ``parameters``: the cell declares both names, the old one
    ``= None``; ``x = renamed_parameter(x, old_x, "old_x", "x")``.
    """
    if old_value is None:
        return value
    logging.getLogger("histo-unet").warning("parameter %s= is deprecated and will be removed in the next release; "
                                            "use %s= instead", old, new)
    return old_value


#: Shown above every viewer: widgets live only while the kernel runs (their state is not saved).
RERUN_HINT = "re-run this cell to use the viewer"


def show_viewer(widget: Any, what: str = "viewer") -> None:
    """Display an ipywidgets viewer with a line that still makes sense when the notebook is reopened.

    A saved notebook keeps no widget state: reopened without a kernel, a viewer is an empty
    box or the text ``VBox(children=...)``. The hint line (HTML, saved with the output)
    and the widget's plain-text form both say what to do.
    """
    from IPython.display import HTML, display

    text = f"{what}: {RERUN_HINT} (widgets are live only while the notebook's kernel runs)"
    display(HTML(f'<div class="histo-viewer-hint" style="color:#666;font-size:90%">{text}</div>'))
    bundle = widget._repr_mimebundle_()
    if isinstance(bundle, tuple):
        bundle = bundle[0]
    if bundle:
        bundle = {**bundle, "text/plain": text}
        display(bundle, raw=True)
    else:  # no front end (terminal IPython): the text only
        print(text)
