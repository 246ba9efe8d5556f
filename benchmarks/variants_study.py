"""The variants-study target for ``make bench``: read 08's ``evaluation/variants_summary.csv``.

The study itself is 08's (it trains nothing here): run 05 with three seeds, then 08 with
``model_dirs`` listing the three model folders. ``WORKDIR`` (default ``runs/demo``)
names the work folder; without a summary the target is reported "not measured".
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIN_MODELS = 3


def target_rows(workdir: str | Path | None = None) -> list[dict]:
    """The ``variants`` target row(s): best mean +- sd over the models and the cheapest setting as good."""
    import pandas as pd

    wd = Path(workdir or os.environ.get("WORKDIR", "runs/demo"))
    if not wd.is_absolute():
        wd = ROOT / wd
    f = wd / "evaluation" / "variants_summary.csv"
    if not f.is_file():
        return [{"target": "variants", "case": f"{f}", "value": "", "threshold": f">= {MIN_MODELS} models",
                 "met": None, "note": "no study summary: run 08 with 3 model_dirs"}]
    s = pd.read_csv(f)
    best = s[s["verdict"] == "best"].iloc[0]
    pick = s[s["within_tolerance"]].sort_values(["seconds", "mean"], ascending=[True, False]).iloc[0]
    n = int(best["n_models"])
    name = lambda r: f"o{int(r['overlap'])} {r['blend']} {r['kernel']}"  # noqa: E731
    return [{"target": "variants", "case": f"models in the study ({f.parent.parent.name})", "value": n,
             "threshold": f">= {MIN_MODELS}", "met": n >= MIN_MODELS,
             "note": f"best {name(best)} {best['mean']:.4f} +- {best['sd']:.4f}; cheapest within 0.5 points "
                     f"{name(pick)} {pick['mean']:.4f} +- {pick['sd']:.4f} ({pick['speedup_vs_best']:.2f}x faster); "
                     f"{int((s['verdict'] == 'worse').sum())} of {len(s) - 1} settings worse beyond the spread"}]
