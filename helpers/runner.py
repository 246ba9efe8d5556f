"""The one papermill runner: execute a notebook with parameters, fail in one line.

Used by :mod:`helpers.pipeline` (the numbered notebooks in order) and :mod:`helpers.batch`
(notebook 07 once per slide). Executed copies go where the caller says; the source
notebook is never written.
"""

from __future__ import annotations

import logging
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


def quiet_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for headless kernels: no TensorFlow start-up chatter, real errors kept.

    TensorFlow's C++ log is limited to errors (``TF_CPP_MIN_LOG_LEVEL=2``); on a machine
    without an NVIDIA device (no ``/dev/nvidia*``) its failed CUDA probe (``E0000 ...
    failed call to cuInit``) is the only error it logs, so the level goes to 3 there.
    Python exceptions are not affected.
    """
    import glob

    env = dict(os.environ if env is None else env)
    env.setdefault("SM_FRAMEWORK", "tf.keras")
    env.setdefault("MPLBACKEND", "Agg")
    env.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not glob.glob("/dev/nvidia[0-9]*") and env["TF_CPP_MIN_LOG_LEVEL"] == "2":
        env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env["HISTO_HEADLESS"] = "1"
    return env


def _kernel_manager_class(log_path: Path) -> type:
    """A kernel manager for headless runs: local IPC transport (no "running over TCP without
    encryption" warning) and the kernel process's own log (start-up and shutdown messages of
    the kernel app, not cell output) written to ``log_path`` instead of the terminal."""
    import tempfile

    from jupyter_client.manager import AsyncKernelManager

    class QuietKernelManager(AsyncKernelManager):
        def __init__(self, **kw):  # noqa: ANN003 - traitlets keywords
            super().__init__(**kw)
            self.transport = "ipc"
            self.ip = str(Path(tempfile.mkdtemp(prefix="histo-kernel-")) / "kernel")

        async def _async_start_kernel(self, **kw):  # noqa: ANN003 - Popen keywords
            kw["env"] = quiet_environment(kw.get("env"))
            kw["stderr"] = open(log_path, "ab")  # noqa: SIM115 - owned by the kernel process
            return await super()._async_start_kernel(**kw)

        start_kernel = _async_start_kernel

    return QuietKernelManager


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
    log_path = output.resolve().with_suffix(".kernel.log")
    log_path.unlink(missing_ok=True)
    logging.getLogger("papermill").setLevel(logging.WARNING)
    logging.getLogger("traitlets").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    try:
        pm.execute_notebook(str(notebook), str(output), parameters=parameters, cwd=str(notebook.parent),
                            kernel_name="python3", progress_bar=False, log_output=False, execution_timeout=timeout,
                            kernel_manager_class=_kernel_manager_class(log_path))
    except pm.PapermillExecutionError as exc:
        first = str(exc.evalue).splitlines()[0] if exc.evalue else ""
        reason = f"{exc.ename}: {first}".strip()
        raise HistoUNetError(f"{notebook.name} failed ({reason}); see {output}") from None
    except Exception as exc:  # the kernel died or did not start: its log says why
        raise HistoUNetError(f"{notebook.name}: the kernel failed ({type(exc).__name__}: {exc}); "
                             f"see {log_path}") from None
    if log_path.is_file() and not log_path.read_text(errors="replace").strip():
        log_path.unlink()
    return time.perf_counter() - t0
