"""The one papermill runner: execute a notebook with parameters, fail in one line.

Used by :mod:`helpers.pipeline` (the numbered notebooks in order) and :mod:`helpers.batch`
(notebook 07 once per slide). Executed copies go where the caller says; the source
notebook is never written.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

from helpers.errors import HistoUNetError, ParameterError


def declared_parameters(notebook: str | Path) -> set[str]:
    """Names declared in the notebook's ``parameters`` cell."""
    import papermill as pm

    return set(pm.inspect_notebook(str(notebook)))


def select_parameters(notebook: str | Path, values: dict, source: str | Path | None = None,
                      optional: Iterable[str] = ()) -> dict:
    """The ``values`` the notebook declares; any other name is an error, except ``optional`` ones (dropped).

    Args:
        notebook: The notebook to run.
        values: Parameter names and values.
        source: Where ``values`` came from (a YAML file), named in the error.
        optional: Names passed only when the notebook declares them (e.g. ``workdir``).

    Raises:
        ParameterError: naming the parameters the notebook does not have.
    """
    notebook = Path(notebook)
    declared = declared_parameters(notebook)
    unknown = sorted(set(values) - declared - set(optional))
    if unknown:
        where = f"{source}: " if source else ""
        raise ParameterError(f"{where}{notebook.name} has no parameter(s) {', '.join(unknown)}")
    return {k: v for k, v in values.items() if k in declared}


def run_notebook(notebook: str | Path, output: str | Path, parameters: dict, timeout: int = 3600) -> float:
    """Execute ``notebook`` with ``parameters`` into ``output`` (headless, cwd = the notebook's folder).

    Args:
        notebook: The source notebook (never written).
        output: The executed copy to write.
        parameters: Values for the notebook's ``parameters`` cell.
        timeout: Seconds allowed per cell.

    Returns:
        Seconds taken.

    Raises:
        HistoUNetError: ``<notebook> failed (<error>: <first line>); see <output>``.
    """
    import papermill as pm

    notebook, output = Path(notebook), Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    os.environ["PAPERMILL_EXECUTION"] = "1"
    os.environ.setdefault("SM_FRAMEWORK", "tf.keras")
    os.environ.setdefault("MPLBACKEND", "Agg")
    t0 = time.perf_counter()
    try:
        pm.execute_notebook(str(notebook), str(output), parameters=parameters, cwd=str(notebook.parent),
                            kernel_name="python3", progress_bar=False, log_output=False, execution_timeout=timeout)
    except pm.PapermillExecutionError as exc:
        first = str(exc.evalue).splitlines()[0] if exc.evalue else ""
        reason = f"{exc.ename}: {first}".strip()
        raise HistoUNetError(f"{notebook.name} failed ({reason}); see {output}") from None
    return time.perf_counter() - t0
