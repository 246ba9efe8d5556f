"""Dask plumbing of a cohort run: the cluster, the shared-folder check, per-slide tasks with a progress bar.

:mod:`helpers.batch` decides *what* runs for a slide (notebook 07 or 01 with papermill);
this module decides *where*: a ``LocalCluster`` on this machine (the default), an existing
Dask cluster (``scheduler="tcp://host:8786"``: ``dask scheduler`` + ``dask worker``, or
dask-jobqueue on an HPC queue), or no Dask at all (``workers=0``: one slide after another
in this process, the reference the Dask run must match).

A worker lost mid-slide (killed, out of memory, node gone) is handled by Dask: the
scheduler hands its task to another worker (up to ``distributed.scheduler.allowed-failures``
times, default 3); the task resumes the slide (notebook 07 is resumable).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers.errors import ClusterError

log = logging.getLogger(__name__)

#: Port of a LocalCluster's dashboard (another free port is taken if it is in use).
DASHBOARD = ":8787"


@dataclass
class Cluster:
    """An open Dask client (None when running sequentially) and how tasks should size TensorFlow."""

    client: Any
    workers: int
    tf_threads: int | None
    dashboard: str


def cpu_count() -> int:
    """Cores this process may use (its CPU affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_workers(cores: int | None = None) -> int:
    """Workers of a LocalCluster when not given: half the cores (each worker's TensorFlow gets two threads)."""
    return max(1, (cores or cpu_count()) // 2)


def dashboard_line(client: Any) -> str:
    """``dashboard: <url>``, or why there is none (the dashboard needs bokeh)."""
    import importlib.util

    if importlib.util.find_spec("bokeh") is None:
        return "dashboard: off (it needs bokeh: pip install -e '.[cluster]')"
    link = getattr(client, "dashboard_link", None)
    return f"dashboard: {link}" if link else "dashboard: off"


@contextlib.contextmanager
def open_cluster(workers: int | None = None, scheduler: str | None = None, tf_threads: int | None = None,
                 host: str = "127.0.0.1", dashboard_address: str | None = DASHBOARD) -> Iterator[Cluster]:
    """Connect to ``scheduler``, start a LocalCluster, or (``workers=0``) run without Dask.

    Args:
        workers: LocalCluster worker processes (one thread each, one slide at a time each);
            None: :func:`default_workers`; 0: no Dask (sequential, in this process).
        scheduler: ``tcp://host:8786`` of a running Dask scheduler; its workers are used as they are.
        tf_threads: TensorFlow threads per slide (intra- and inter-op). None: cores // workers on a
            LocalCluster (so workers x threads <= cores), the worker's own setting on a remote cluster.
        host: Interface of the LocalCluster (loopback by default: nothing is exposed).
        dashboard_address: LocalCluster dashboard address; None: no dashboard.

    Raises:
        ClusterError: the scheduler does not answer.
    """
    if scheduler:
        from distributed import Client

        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise ClusterError(f"{scheduler}: no Dask scheduler answers ({type(exc).__name__}); start one with "
                               "`dask scheduler` and workers with `dask worker <address>`") from None
        try:
            n = len(client.scheduler_info().get("workers", {}))
            yield Cluster(client, n, tf_threads, dashboard_line(client))
        finally:
            client.close()
        return
    if workers == 0:
        yield Cluster(None, 0, tf_threads, "dashboard: off (sequential run, no Dask)")
        return
    from distributed import Client, LocalCluster

    n = workers or default_workers()
    threads = tf_threads or max(1, cpu_count() // n)
    cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host=host,
                           dashboard_address=dashboard_address, silence_logs=logging.ERROR)
    client = Client(cluster)
    try:
        yield Cluster(client, n, threads, dashboard_line(client) if dashboard_address else "dashboard: off")
    finally:
        client.close()
        cluster.close()


def _missing(paths: Sequence[str], writable: Sequence[str]) -> list[str]:
    """On a worker: the ``paths`` it cannot see and the ``writable`` folders it cannot write."""
    out = [p for p in paths if not os.path.exists(p)]
    out += [f"{p} (not writable)" for p in writable if os.path.exists(p) and not os.access(p, os.W_OK | os.X_OK)]
    return out


def check_shared(cluster: Cluster, paths: Sequence[str | Path], writable: Sequence[str | Path] = (),
                 wait: float = 300.0) -> None:
    """Every worker must see ``paths`` (work folder, slides, model) and write ``writable`` (the work folder).

    Workers that join later (an adaptive cluster) are not checked here; a slide they cannot
    read fails with the notebook's one-line error naming the file.

    Raises:
        ClusterError: naming the first path a worker cannot see, and how many workers miss it.
    """
    if cluster.client is None:
        return
    paths, writable = [str(p) for p in paths], [str(p) for p in writable]
    try:
        cluster.client.wait_for_workers(1, timeout=wait)  # a queue (dask-jobqueue) may take a while to start one
    except (TimeoutError, OSError):
        raise ClusterError(f"the Dask cluster has no workers after {wait:.0f} s; start some with "
                           "`dask worker <scheduler address>` (or cluster.scale(...) with dask-jobqueue)") from None
    answers = cluster.client.run(_missing, paths, writable)
    bad = {w: m for w, m in answers.items() if m}
    if bad:
        worker, missing = next(iter(sorted(bad.items())))
        raise ClusterError(f"{missing[0]}: not visible on {len(bad)} of {len(answers)} Dask worker(s) (e.g. {worker}); "
                           "the work folder, the slides and the model must be on a filesystem every worker "
                           "mounts at the same path")


def worker_name() -> str:
    """Address of the Dask worker running this code ("local" outside Dask)."""
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return "local"


def _eta(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def run_tasks(cluster: Cluster, fn: Callable[..., dict], jobs: Sequence[dict], desc: str = "slides",
              progress: bool = True) -> list[dict]:
    """Run ``fn(**job)`` for every job, one Dask task each; return their rows in job order.

    ``fn`` returns a row dict with at least ``slide`` and ``status`` and must not raise for a
    bad slide. A task that still fails (its worker died ``allowed-failures`` times, or the
    function was not importable on the worker) becomes a ``failed`` row with the reason.
    The bar shows slides done, slides/hour and the ETA.
    """
    from tqdm.auto import tqdm

    rows: list[dict | None] = [None] * len(jobs)
    bar = tqdm(total=len(jobs), desc=desc, unit="slide", disable=not progress or not jobs)
    t0 = time.perf_counter()

    def _done(i: int, row: dict) -> None:
        rows[i] = row
        bar.update(1)
        elapsed = time.perf_counter() - t0
        per_hour = bar.n / elapsed * 3600 if elapsed > 0 else 0.0
        eta = (len(jobs) - bar.n) / (bar.n / elapsed) if bar.n and elapsed > 0 else 0.0
        failed = sum(r is not None and r["status"] == "failed" for r in rows)
        bar.set_postfix_str(f"{per_hour:.1f} slides/h, ETA {_eta(eta)}, {failed} failed", refresh=True)

    try:
        if cluster.client is None:
            for i, job in enumerate(jobs):
                _done(i, fn(**job))
        else:
            from distributed import as_completed

            futures = {cluster.client.submit(fn, **job, pure=False, key=f"{desc}-{i}-{job['name']}-{os.getpid()}-{t0}"): i
                       for i, job in enumerate(jobs)}
            try:
                for fut in as_completed(list(futures)):
                    i = futures[fut]
                    try:
                        row = fut.result()
                    except Exception as exc:  # noqa: BLE001 - a lost slide must not stop the cohort
                        reason = str(exc).splitlines()[0] if str(exc) else ""
                        if type(exc).__name__ == "KilledWorker":
                            reason = "its Dask worker died on every attempt (out of memory?)"
                        row = {"slide": jobs[i]["name"], "status": "failed", "seconds": 0.0, "worker": "",
                               "message": f"{type(exc).__name__}: {reason}"}
                    _done(i, row)
            except BaseException:
                cluster.client.cancel(list(futures))
                raise
    finally:
        bar.close()
    return [r for r in rows if r is not None]
