"""benchmarks/variants_real.py: 08's variants study on bench-real folders, scored on the held-out half only."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from slide_fixtures import class_map_, setup, write_slide  # noqa: F401 - fixtures


@pytest.fixture(scope="module")
def runs(setup, class_map_, tmp_path_factory):
    """A bench-real folder with two 'sources': the fixture slide and model, truth with a wrong left half in one."""
    from benchmarks.bench_real import write_truth

    d, big, truth = setup
    big, truth = big[:, ::-1].copy(), truth[:, ::-1].copy()  # the tissue into the held-out right half
    root = tmp_path_factory.mktemp("bench_real")
    for name, left in (("a", None), ("b", 3)):
        src = root / name
        shutil.copytree(d / "model", src / "model")
        (src / "slides").mkdir(parents=True)
        write_slide(src / "slides" / "s.tiff", big, mpp=0.5)
        t = truth.copy()
        if left is not None:  # nonsense in the training half: must not change any score
            t[:, : t.shape[1] // 2] = left
        write_truth(src / "truth" / "s.tiff", t, 0.5, class_map_)
    return root


def test_held_out_truth_keeps_only_the_right_half(runs, class_map_):
    from benchmarks.variants_real import held_out_truth

    src = runs / "a"
    t = held_out_truth(src / "truth" / "s.tiff", src / "slides" / "s.tiff", src / "model", class_map_)
    assert t.shape == (340, 470)  # model resolution (1 um/px) of the 0.5 um/px slide
    assert not t[:, : 470 // 2].any() and t[:, 470 // 2:].all()


def test_sources_are_the_repeats_and_the_training_half_is_not_scored(runs, tmp_path):
    from benchmarks.variants_real import run

    per_source, summary = run(runs, tmp_path / "variants_real.csv", runtime="keras")
    assert sorted(per_source["source"].unique()) == ["a", "b"]
    assert len(per_source) == 2 * 3 * 2 * 4  # sources x overlaps x blends x kernels
    assert (summary["n_models"] == 2).all()
    for metric in ("tumor_iou", "mean_iou"):  # b's wrong left half changed nothing
        wide = per_source.pivot_table(index=["overlap", "blend", "kernel"], columns="source", values=metric)
        assert np.allclose(wide["a"], wide["b"]), metric
    assert (tmp_path / "variants_real.csv").is_file() and (tmp_path / "variants_real_summary.csv").is_file()
