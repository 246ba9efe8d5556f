"""make bench's targets table: every target printed met / not met / not measured, and written to a CSV."""

from __future__ import annotations

import csv


def test_targets_csv_has_every_target(tmp_path, monkeypatch, capsys):
    from benchmarks import run_all

    monkeypatch.setenv("WORKDIR", str(tmp_path / "no_such_workdir"))
    results = {
        "inference": {"targets": [
            {"target": "P7", "case": "onnxruntime vs fastest", "value": 0.6, "threshold": ">= 0.90", "met": False,
             "load": "17->18"},
            {"target": "P1", "case": "4096^2 overlap 16", "value": 0.9, "threshold": ">= 0.85", "met": True,
             "load": "1->1"},
            {"target": "P7", "case": "speed-up", "value": 1.8, "threshold": "info", "met": None}]},
        "memory": {"status": "failed", "error": "boom"},
    }
    rows = run_all.collect_targets(results)
    out = run_all.write_targets(rows, tmp_path / "bench.csv")
    got = list(csv.DictReader(out.open()))
    verdicts = {(r["target"], r["case"]): r["met"] for r in got}
    assert [r["target"] for r in got] == ["P1", "P3", "P7", "P7", "variants"]  # P3 measured by nobody
    assert verdicts[("P1", "4096^2 overlap 16")] == "met"
    assert verdicts[("P7", "onnxruntime vs fastest")] == "not met"
    assert verdicts[("P7", "speed-up")] == "info"
    assert verdicts[("P3", "")] == "not measured"
    assert [r["met"] for r in got if r["target"] == "variants"] == ["not measured"]
    printed = capsys.readouterr().out
    assert "| P7 | onnxruntime vs fastest | 0.6 | >= 0.90 | NOT MET |" in printed


def test_variants_target_reads_the_study_summary(tmp_path):
    import pandas as pd

    from benchmarks.variants_study import target_rows

    ev = tmp_path / "evaluation"
    ev.mkdir()
    pd.DataFrame([
        {"overlap": 16, "blend": "gaussian", "kernel": "gaussian:4", "n_models": 3, "mean": 0.88, "sd": 0.014,
         "seconds": 10.0, "verdict": "best", "within_tolerance": True, "speedup_vs_best": 1.0},
        {"overlap": 4, "blend": "mean", "kernel": "gaussian:4", "n_models": 3, "mean": 0.877, "sd": 0.01,
         "seconds": 3.0, "verdict": "within noise", "within_tolerance": True, "speedup_vs_best": 3.33},
    ]).to_csv(ev / "variants_summary.csv", index=False)
    (row,) = target_rows(tmp_path)
    assert row["met"] is True and row["value"] == 3
    assert "cheapest within 0.5 points o4 mean gaussian:4" in row["note"]
