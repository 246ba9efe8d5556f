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
    """True when a person runs the notebook (a kernel with a front end), False under papermill."""
    if os.environ.get("PAPERMILL_EXECUTION") or os.environ.get("HISTO_HEADLESS"):
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell" and "papermill" not in sys.modules


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
