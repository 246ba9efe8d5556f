"""Run every benchmark (``benchmarks/bench_*.py``) and collect its figures in one table.

Usage (what ``make bench`` runs)::

    python -m benchmarks.run_all [--only inference memory] [--out benchmarks/results/benchmarks.md]

Each benchmark module exposes ``main() -> dict`` returning its figures (it also prints
them and the machine it ran on); a ``targets`` entry lists the issue-17 targets it
measured (``target, case, value, threshold, met, load, note``). A benchmark that fails
is reported in the table and the others still run. The figures are printed and written
to ``benchmarks/results/benchmarks.md``; the targets (P1, P3, P7 and the variants study,
each met / not met / not measured) are printed last and written to
``benchmarks/results/bench.csv`` (both git-ignored).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import platform
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "benchmarks.md"
#: Benchmarks with their own make target, too long for ``make bench`` (``--only real`` still runs it).
SEPARATE = {"bench_real"}
CSV = HERE / "results" / "bench.csv"
TARGET_NAMES = ("P1", "P3", "P7", "variants")
CSV_COLUMNS = ("target", "case", "value", "threshold", "met", "load", "note", "benchmark")


def machine() -> dict[str, object]:
    """Cores, CPU model and platform of this machine (printed by every benchmark)."""
    import os

    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    mem_gb = None
    try:
        import psutil

        mem_gb = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return {"cores": usable, "cpu": model or "unknown", "memory_gb": mem_gb,
            "python": platform.python_version(), "platform": platform.platform(terse=True)}


def print_machine() -> dict[str, object]:
    """Print and return :func:`machine`."""
    m = machine()
    print(f"machine: {m['cores']} cores, {m['cpu']}, {m['memory_gb']} GB RAM, Python {m['python']}, {m['platform']}")
    return m


def discover() -> list[str]:
    """Names of the benchmark modules (``bench_<name>``), sorted."""
    return sorted(p.stem for p in HERE.glob("bench_*.py") if p.stem not in SEPARATE)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value).replace("|", "/").replace("\n", " ")


def to_markdown(results: dict[str, dict], mach: dict[str, object]) -> str:
    """One table: benchmark | figure | value (failed benchmarks show the error)."""
    lines = ["# Histo-UNet benchmarks", "",
             f"Machine: {mach['cores']} cores, {mach['cpu']}, {mach['memory_gb']} GB RAM, "
             f"Python {mach['python']}, {mach['platform']}  ", f"Run: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", "",
             "| benchmark | figure | value |", "|---|---|---|"]
    for name, res in results.items():
        res = {k: v for k, v in res.items() if k != "targets"}
        if "error" in res and res.get("status") == "failed":
            lines.append(f"| {name} | **FAILED** | {_fmt(res['error'])} |")
            continue
        for key, value in res.items():
            if key in ("machine", "status"):
                continue
            lines.append(f"| {name} | {key} | {_fmt(value)} |")
    return "\n".join(lines) + "\n"


def collect_targets(results: dict[str, dict]) -> list[dict]:
    """Every benchmark's ``targets`` rows, plus a "not measured" row for each target nobody measured."""
    rows = []
    for name, res in results.items():
        for t in res.get("targets", []) or []:
            rows.append({**{c: "" for c in CSV_COLUMNS}, **t, "benchmark": name})
    from benchmarks.variants_study import target_rows

    rows += [{**{c: "" for c in CSV_COLUMNS}, **t, "benchmark": "variants_study"} for t in target_rows()]
    seen = {r["target"] for r in rows}
    for t in TARGET_NAMES:
        if t not in seen:
            rows.append({**{c: "" for c in CSV_COLUMNS}, "target": t, "met": None, "note": "not measured in this run"})
    order = {t: i for i, t in enumerate(TARGET_NAMES)}
    return sorted(rows, key=lambda r: order.get(r["target"], 99))


def verdict(row: dict) -> str:
    """``met``, ``not met``, ``info`` (a figure without a threshold) or ``not measured``."""
    if row.get("met") is True:
        return "met"
    if row.get("met") is False:
        return "not met"
    return "info" if row.get("threshold") == "info" else "not measured"


def write_targets(rows: list[dict], out: Path = CSV) -> Path:
    """Print the targets table and write it as CSV (atomically)."""
    import csv

    print("\n| target | case | value | threshold | verdict | load | note |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['target']} | {r['case']} | {_fmt(r['value'])} | {r['threshold']} | {verdict(r).upper() if verdict(r) == 'not met' else verdict(r)} | "
              f"{r['load']} | {r['note']} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".csv.part")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "met": verdict(r)})
    tmp.replace(out)
    print(f"written: {out}")
    return out


def run(names: list[str] | None = None, out: Path = RESULTS, csv_out: Path = CSV) -> dict[str, dict]:
    """Run the benchmarks, keep going past failures, print and write the markdown table."""
    mach = print_machine()
    names = names or discover()
    results: dict[str, dict] = {}
    for name in names:
        mod_name = name if name.startswith("bench_") else f"bench_{name}"
        print(f"\n==> {mod_name}", flush=True)
        t0 = time.perf_counter()
        try:
            mod = importlib.import_module(f"benchmarks.{mod_name}")
            res = mod.main()
            if not isinstance(res, dict):
                res = {"result": res}
            res = {**res, "seconds_total": round(time.perf_counter() - t0, 1)}
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - one failing benchmark must not stop the others
            traceback.print_exc()
            res = {"status": "failed", "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
        results[mod_name.removeprefix("bench_")] = res
    md = to_markdown(results, mach)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".md.part")
    tmp.write_text(md)
    tmp.replace(out)
    print("\n" + md)
    print(f"written: {out}")
    write_targets(collect_targets(results), csv_out)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None, help="benchmark names, e.g. inference memory")
    ap.add_argument("--out", default=str(RESULTS), help="markdown file to write")
    ap.add_argument("--csv", default=str(CSV), help="targets CSV to write")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results = run(args.only, Path(args.out), Path(args.csv))
    failed = [k for k, v in results.items() if v.get("status") == "failed"]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
