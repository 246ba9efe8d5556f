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


#: The project's Jupyter kernel (``make install`` writes it into the venv; notebooks name it).
KERNEL_NAME = "histo-unet"
KERNEL_DISPLAY_NAME = "Histo-UNet (.venv)"
#: Kernel option: native libraries' writes to the process's stdout/stderr (TensorFlow's C++
#: start-up log: oneDNN, CUDA probing) go to the kernel's own log, not into cell output.
#: Python output, warnings, logging and exceptions still reach the cell.
NATIVE_OUTPUT_TO_LOG = "--IPKernelApp.capture_fd_output=False"


def tf_log_level() -> str:
    """``TF_CPP_MIN_LOG_LEVEL`` for this machine: 2 (errors only), or 3 without an NVIDIA device.

    Without ``/dev/nvidia*`` TensorFlow's only logged "error" is its failed CUDA probe
    (``E0000 ... failed call to cuInit``), so the level goes to 3 there.
    """
    import glob

    return "2" if glob.glob("/dev/nvidia[0-9]*") else "3"


def kernel_environment() -> dict[str, str]:
    """Variables every project kernel gets (headless runs and the installed kernelspec)."""
    return {"SM_FRAMEWORK": "tf.keras", "NO_ALBUMENTATIONS_UPDATE": "1", "TF_CPP_MIN_LOG_LEVEL": tf_log_level(),
            "PYDEVD_DISABLE_FILE_VALIDATION": "1"}


def quiet_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for headless kernels: no TensorFlow start-up chatter, real errors kept.

    TensorFlow's C++ log is limited to errors (``TF_CPP_MIN_LOG_LEVEL=2``), or to fatal
    ones on a machine without an NVIDIA device (see :func:`tf_log_level`). An explicit
    level other than 2 in ``env`` is kept. Python exceptions are not affected.
    """
    env = dict(os.environ if env is None else env)
    for key, value in kernel_environment().items():
        env.setdefault(key, value)
    if env["TF_CPP_MIN_LOG_LEVEL"] == "2":
        env["TF_CPP_MIN_LOG_LEVEL"] = tf_log_level()
    env.setdefault("MPLBACKEND", "Agg")
    env["HISTO_HEADLESS"] = "1"
    return env


def install_kernelspec(prefix: str | Path | None = None) -> Path:
    """Write (or rewrite: idempotent) the project's kernelspec ``histo-unet`` under ``prefix``.

    The kernel runs this Python with :func:`kernel_environment` and
    :data:`NATIVE_OUTPUT_TO_LOG` (TensorFlow's C++ start-up lines go to the JupyterLab
    terminal, not into the notebook).

    Args:
        prefix: Install prefix (``<prefix>/share/jupyter/kernels/histo-unet``); default
            ``sys.prefix`` (the venv).

    Returns:
        The kernelspec folder.
    """
    import json
    import sys

    from ipykernel.kernelspec import install

    where = Path(install(kernel_name=KERNEL_NAME, display_name=KERNEL_DISPLAY_NAME,
                         prefix=str(prefix or sys.prefix), env=kernel_environment()))
    spec_file = where / "kernel.json"
    spec = json.loads(spec_file.read_text())
    if NATIVE_OUTPUT_TO_LOG not in spec["argv"]:
        spec["argv"].append(NATIVE_OUTPUT_TO_LOG)
    spec_file.write_text(json.dumps(spec, indent=1) + "\n")
    return where


def _kernel_manager_class(log_path: Path) -> type:
    """A kernel manager for headless runs: local IPC transport (no "running over TCP without
    encryption" warning) and the kernel process's own log (start-up and shutdown messages of
    the kernel app, native libraries' output such as TensorFlow's C++ start-up lines; not
    Python's cell output) written to ``log_path`` instead of the terminal."""
    import tempfile

    from jupyter_client.manager import AsyncKernelManager

    class QuietKernelManager(AsyncKernelManager):
        def __init__(self, **kw):  # noqa: ANN003 - traitlets keywords
            super().__init__(**kw)
            self.transport = "ipc"
            self.ip = str(Path(tempfile.mkdtemp(prefix="histo-kernel-")) / "kernel")

        async def _async_start_kernel(self, **kw):  # noqa: ANN003 - Popen keywords
            kw["env"] = quiet_environment(kw.get("env"))
            kw["extra_arguments"] = [*kw.get("extra_arguments", []), NATIVE_OUTPUT_TO_LOG]
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


if __name__ == "__main__":  # make install: python -m helpers.runner install-kernel
    import sys

    if sys.argv[1:] != ["install-kernel"]:
        sys.exit("usage: python -m helpers.runner install-kernel")
    print(f"kernel {KERNEL_NAME!r} installed in {install_kernelspec()}")
