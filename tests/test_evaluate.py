"""Evaluation (08): helpers.metrics on hand-made masks with known answers, helpers.evaluate (GeoJSON vs raster,
work folder), helpers.variants and the figures of helpers.views.evaluate."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from helpers import evaluate as ev
from helpers import metrics as M
from helpers import variants as V
from helpers.views import evaluate as VE
from helpers.errors import OutputExistsError, ParameterError

# Reference: 0 = unlabelled (bottom-left quarter). Prediction: one miss per class.
REF = np.array([
    [1, 1, 2, 2],
    [1, 1, 2, 2],
    [0, 0, 3, 3],
    [0, 0, 3, 3],
], np.uint8)
PRED = np.array([
    [1, 2, 2, 2],
    [1, 1, 2, 3],
    [2, 2, 3, 3],  # the 2s sit on unlabelled reference pixels: must not count
    [0, 0, 3, 0],  # bottom-right 0: nothing predicted where the reference says 3
], np.uint8)


def test_confusion_matrix_known(class_map):
    cm = M.confusion_matrix(REF, PRED, class_map.n_classes)
    expected = np.zeros((5, 5), int)
    expected[0, 2] = 2
    expected[0, 0] = 2
    expected[1, 1], expected[1, 2] = 3, 1
    expected[2, 2], expected[2, 3] = 3, 1
    expected[3, 3], expected[3, 0] = 3, 1
    np.testing.assert_array_equal(cm, expected)
    assert cm.sum() == REF.size


def test_class_metrics_known_iou_dice(class_map):
    m = M.class_metrics(M.confusion_matrix(REF, PRED, 4), class_map).set_index("class")
    assert m.loc["Background", "iou"] == pytest.approx(3 / 4)
    assert m.loc["Background", "dice"] == pytest.approx(6 / 7)
    assert m.loc["Tumor", "iou"] == pytest.approx(3 / 5)  # FP at (0,1); FN at (1,3)
    assert m.loc["Tumor", "dice"] == pytest.approx(6 / 8)
    assert m.loc["Stroma", "iou"] == pytest.approx(3 / 5)  # FP at (1,3); FN = predicted 0
    assert m.loc["Tumor", "precision"] == pytest.approx(3 / 4)
    assert m.loc["Stroma", "recall"] == pytest.approx(3 / 4)
    assert np.isnan(m.loc["Other", "iou"])  # absent everywhere: undefined, not 0 or 1
    assert m.loc["Tumor", "ref_px"] == 4 and m.loc["Tumor", "pred_px"] == 4


def test_summary_and_perfect_prediction(class_map):
    res = ev.evaluate_labels(PRED, REF, class_map, slide="s")
    assert res.summary["tumor_iou"] == pytest.approx(0.6)
    assert res.summary["mean_iou"] == pytest.approx((0.75 + 0.6 + 0.6) / 3)
    assert res.summary["pixel_accuracy"] == pytest.approx(9 / 12)
    assert res.summary["labelled_px"] == 12
    perfect = ev.evaluate_labels(REF, REF, class_map)
    assert perfect.summary["tumor_iou"] == 1.0 and perfect.summary["pixel_accuracy"] == 1.0


def test_dice_iou_relation_on_random_masks(class_map):
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 5, (64, 64)).astype(np.uint8)
    pred = np.where(rng.random((64, 64)) < 0.7, ref, rng.integers(1, 5, (64, 64))).astype(np.uint8)
    m = ev.evaluate_labels(pred, ref, class_map).metrics
    iou, dice = m["iou"].to_numpy(), m["dice"].to_numpy()
    np.testing.assert_allclose(dice, 2 * iou / (1 + iou))
    # independent count for Tumor
    lab = ref > 0
    tp = np.sum(lab & (ref == 2) & (pred == 2))
    union = np.sum(lab & ((ref == 2) | (pred == 2)))
    assert m.set_index("class").loc["Tumor", "iou"] == pytest.approx(tp / union)


def test_bad_inputs(class_map):
    with pytest.raises(ParameterError):
        M.confusion_matrix(REF, PRED[:3], 4)
    with pytest.raises(ParameterError, match="class map"):
        M.confusion_matrix(REF, np.full_like(REF, 9), 4)
    with pytest.raises(ParameterError, match="rounding"):
        ev.evaluate_labels(np.zeros((10, 10), np.uint8), np.zeros((20, 20), np.uint8), class_map)


def test_tables_overall_pools_pixels_and_files(class_map, tmp_path):
    a = ev.evaluate_labels(PRED, REF, class_map, slide="a")
    b = ev.evaluate_labels(REF, REF, class_map, slide="b")
    metrics, conf = ev.results_tables([a, b], class_map)
    overall = metrics[metrics["slide"] == "overall"].set_index("class")
    # pooled: Tumor TP 3+4, FP 1, FN 1 -> 7/9 (not the mean of 0.6 and 1.0)
    assert overall.loc["Tumor", "iou"] == pytest.approx(7 / 9)
    assert set(conf["slide"]) == {"a", "b", "overall"}
    assert conf[(conf.slide == "a") & (conf.true == "Stroma") & (conf.predicted == "unlabelled")]["pixels"].item() == 1
    paths = ev.save_results([a, b], class_map, tmp_path)
    saved = pd.read_csv(paths["metrics"])
    assert len(saved) == 3 * class_map.n_classes
    summary = json.loads(paths["json"].read_text())
    assert summary["overall"]["dense"]["tumor_iou"] == pytest.approx(7 / 9)
    with pytest.raises(OutputExistsError):
        ev.save_results([a], class_map, tmp_path)
    ev.save_results([a], class_map, tmp_path, overwrite=True)


def test_compare_references_shows_what_sparse_hides(class_map):
    dense_ref = np.repeat(np.array([[1, 1, 2, 2, 3, 3]], np.uint8), 6, axis=0)
    pred = dense_ref.copy()
    pred[:, 3] = 3  # half the tumour predicted as stroma
    sparse_ref = np.zeros_like(dense_ref)
    sparse_ref[:, 2] = 2  # annotator drew only the column the model gets right
    sparse_ref[:, 0] = 1
    sparse_ref[:, 5] = 3
    d = ev.evaluate_labels(pred, dense_ref, class_map, reference_kind="dense")
    s = ev.evaluate_labels(pred, sparse_ref, class_map, reference_kind="sparse")
    cmp = ev.compare_references(d, s).set_index("class")
    assert cmp.loc["Tumor", "iou_sparse"] == 1.0
    assert cmp.loc["Tumor", "iou_dense"] == pytest.approx(0.5)
    assert cmp.loc["Tumor", "iou_gap"] == pytest.approx(0.5)
    assert cmp.loc["Tumor", "sparse_coverage"] == pytest.approx(0.5)


def test_seam_score_finds_tile_borders():
    y, x = np.mgrid[0:32, 0:32]
    lab = ((x // 8) % 2 + 1).astype(np.uint8)  # changes exactly on x = 8, 16, 24
    lab[13:] += 2  # one horizontal change off the border grid
    s = V.seam_score(lab, step=8)
    assert s["border_change_rate"] == pytest.approx(96 / 192)
    assert s["other_change_rate"] == pytest.approx(32 / 1792)
    assert s["seam_score"] == pytest.approx((96 / 192) / (32 / 1792))
    # shifting the grid so the borders miss the changes gives no seam excess
    shifted = V.seam_score(lab, step=8, origin=(4, 4))
    assert shifted["seam_score"] < 1
    with pytest.raises(ParameterError):
        V.seam_score(lab, step=1)


def test_figures(class_map):
    import matplotlib

    res = ev.evaluate_labels(PRED, REF, class_map, slide="s")
    rgb = np.full((40, 40, 3), 230, np.uint8)
    for fig in (VE.plot_metrics(ev.results_tables([res], class_map)[0]), VE.plot_confusion(res.confusion, class_map),
                VE.plot_errors(res, class_map, image=rgb)):
        assert isinstance(fig, matplotlib.figure.Figure)
    err = ev.error_map(REF, PRED)
    assert (err == 2).sum() == 3 and (err == 0).sum() == 4


def _scene(downsample: float) -> tuple[np.ndarray, list[dict]]:
    """A 64x48 slide (level 0) with three classed rectangles, as raster at ``downsample`` and as QuPath GeoJSON."""
    from shapely.geometry import box

    from helpers.qupath import make_feature

    rects = [((0, 0, 64, 48), "Background", 1), ((8, 8, 40, 32), "Stroma", 3), ((16, 16, 32, 24), "Tumor", 2)]
    lab0 = np.zeros((48, 64), np.uint8)
    feats = []
    for (x0, y0, x1, y1), name, label in rects:
        lab0[y0:y1, x0:x1] = label
        feats.append(make_feature(box(x0, y0, x1, y1), name, (1, 2, 3)))
    d = int(downsample)
    return lab0[::d, ::d], feats


@pytest.mark.parametrize("downsample", [1, 2, 4])
def test_geojson_and_raster_agree(class_map, tmp_path, downsample):
    pytest.importorskip("helpers.annotations")
    from helpers.qupath import write_feature_collection

    raster, feats = _scene(downsample)
    gj = write_feature_collection(feats, tmp_path / "s.geojson")
    res = ev.evaluate_labels(gj, raster, class_map, downsample=downsample, slide_size=(64, 48))
    present = res.metrics[res.metrics["ref_px"] > 0]
    np.testing.assert_allclose(present["iou"], 1.0)
    assert res.summary["labelled_px"] == raster.size
    # and the other way round: a GeoJSON reference, with a wrong prediction
    wrong = raster.copy()
    wrong[wrong == 2] = 3
    res2 = ev.evaluate_labels(wrong, gj, class_map, downsample=downsample, slide_size=(64, 48))
    assert res2.reference_kind == "annotations"
    assert res2.summary["tumor_iou"] == 0.0
    assert res2.metrics.set_index("class").loc["Stroma", "iou"] == pytest.approx(
        (raster == 3).sum() / ((raster == 3) | (raster == 2)).sum())


def test_label_tiff_against_geojson(class_map, tmp_path):
    rasters = pytest.importorskip("helpers.rasters")
    pytest.importorskip("helpers.annotations")
    from helpers.qupath import write_feature_collection

    raster, feats = _scene(2)
    tiff = rasters.write_pyramid_tiff(tmp_path / "labels.tiff", raster, kind="labels", downsample=2.0, tile=16)
    gj = write_feature_collection(feats, tmp_path / "s.geojson")
    # downsample and slide size come from the TIFF
    res = ev.evaluate_labels(tiff, gj, class_map, slide="s")
    assert res.downsample == 2.0 and res.reference.shape == raster.shape
    assert res.summary["tumor_iou"] == 1.0 and res.summary["pixel_accuracy"] == 1.0
    # evaluated coarser than the prediction was made
    res4 = ev.evaluate_labels(tiff, gj, class_map, downsample=4.0)
    assert res4.reference.shape == (12, 16) and res4.summary["tumor_iou"] == 1.0


# ----------------------------------------------------------------------------- variants study
def _brightness_model(model_dir, class_map, tile=64, mpp=1.0):
    """A trained-model folder whose 'model' calls dark pixels Tumor and bright ones Background."""
    import keras
    import yaml

    inp = keras.Input((None, None, 3))
    conv = keras.layers.Conv2D(class_map.n_classes, 1, activation="softmax")
    out = conv(inp)
    model = keras.Model(inp, out)
    w = np.zeros((1, 1, 3, class_map.n_classes), np.float32)
    w[..., 0] = 4.0  # Background grows with (normalized) brightness
    w[..., 1] = -4.0  # Tumor with darkness
    b = np.array([0.0, 0.0] + [-50.0] * (class_map.n_classes - 2), np.float32)
    conv.set_weights([w, b])
    model_dir.mkdir(parents=True)
    model.save(model_dir / "best.keras")
    (model_dir / "training_params.yaml").write_text(yaml.safe_dump(
        {"mpp": mpp, "tile_size": tile, "classes": class_map.to_dict()["classes"]}))
    return model_dir


def _two_tone_slide(tmp_path, size=512, slide_mpp=0.5):
    """Glass with a dark purple disc ('tumour'); truth at level 0 (1 = Background, 2 = Tumor)."""
    from helpers.rasters import write_pyramid_tiff

    y, x = np.mgrid[0:size, 0:size]
    disc = (x - size * 0.55) ** 2 + (y - size * 0.45) ** 2 < (size * 0.3) ** 2
    rgb = np.full((size, size, 3), 245, np.uint8)
    rgb[disc] = (90, 40, 120)
    truth = np.where(disc, 2, 1).astype(np.uint8)
    slide = write_pyramid_tiff(tmp_path / "two.tiff", rgb, kind="rgb", mpp=slide_mpp, compression="zlib", tile=128)
    return slide, truth


def test_variant_study_small(class_map, tmp_path):
    slide, truth = _two_tone_slide(tmp_path)
    model_dir = _brightness_model(tmp_path / "model", class_map)
    out = tmp_path / "evaluation"
    table = V.variant_study(slide, model_dir, truth[::2, ::2], out, class_map, overlaps=(1, 4), blends=("mean",),
                             kernels=("none", "median:5"))
    assert len(table) == 4
    assert (out / "variants.csv").is_file() and not (out / "variants").exists()
    assert set(table["stride"]) == {64, 32}
    # the brightness model is right almost everywhere: the alignment of truth and prediction holds
    assert (table["tumor_iou"] > 0.95).all(), table[["overlap", "kernel", "tumor_iou"]]
    assert (table["seconds"] > 0).all() and table["seam_score"].notna().all()
    pick = V.cheapest_within(table)
    assert pick["tumor_iou"] >= table["tumor_iou"].max() - 0.005
    assert "cheapest within 0.5 IoU points" in V.recommend_variant(table)
    with pytest.raises(OutputExistsError):
        V.variant_study(slide, model_dir, truth, out, class_map, overlaps=(1,), blends=("mean",))
    import matplotlib

    assert isinstance(VE.plot_variants(table), matplotlib.figure.Figure)


def test_cheapest_within():
    t = pd.DataFrame({"tumor_iou": [0.80, 0.853, 0.85, 0.849], "seconds": [1, 9, 5, 2]})
    assert V.cheapest_within(t)["seconds"] == 2  # 0.849 is 0.4 points below the best 0.853
    assert V.cheapest_within(t, tolerance=0.002)["seconds"] == 9
    assert V.cheapest_within(t, tolerance=0.5)["seconds"] == 1


def test_repeats_separate_signal_from_noise():
    """Three models: 'a' and 'b' swap places by model (noise), 'c' is worse on every model (signal)."""
    rows = []
    scores = {"m1": {"a": 0.894, "b": 0.869, "c": 0.80}, "m2": {"a": 0.866, "b": 0.881, "c": 0.79},
              "m3": {"a": 0.880, "b": 0.879, "c": 0.81}}
    cost = {"a": 10.0, "b": 10.0, "c": 1.0}
    overlap = {"a": 16, "b": 16, "c": 1}
    for m, per in scores.items():
        for k, iou in per.items():
            rows.append({"model": m, "overlap": overlap[k], "blend": "gaussian" if k == "a" else "mean",
                         "kernel": "gaussian:4", "tumor_iou": iou, "seconds": cost[k]})
    summary = V.summarize_repeats(pd.DataFrame(rows))
    by = {(r.overlap, r.blend): r for r in summary.itertuples()}
    a, b, c = by[(16, "gaussian")], by[(16, "mean")], by[(1, "mean")]
    assert a.verdict == "best" and a.mean == pytest.approx(0.88)
    assert a.sd == pytest.approx(np.std([0.894, 0.866, 0.880], ddof=1))
    assert b.verdict == "within noise"  # b wins on one model: the 0.5-point gap is inside the spread
    assert c.verdict == "worse" and c.n_models == 3
    assert bool(b.within_tolerance) and not bool(c.within_tolerance)
    assert c.speedup_vs_best == pytest.approx(10.0)
    text = V.repeat_recommendation(summary)
    assert "over 3 models" in text and "1 of 2 other settings are worse" in text
    # one model only: nothing can be called worse
    one = V.summarize_repeats(pd.DataFrame([r for r in rows if r["model"] == "m1"]))
    assert set(one["verdict"]) == {"best", "within noise"}


def test_repeats_ignore_a_setting_without_a_value():
    """A setting whose headline IoU is undefined (NaN: class absent) is never the best; all NaN is a clear error."""
    from helpers.errors import ParameterError

    rows = [{"model": m, "overlap": o, "blend": "mean", "kernel": "none", "tumor_iou": v, "seconds": 1.0}
            for m in ("m1", "m2") for o, v in ((1, float("nan")), (4, 0.7), (16, 0.8))]
    summary = V.summarize_repeats(pd.DataFrame(rows))
    assert summary.iloc[0]["overlap"] == 16 and summary.iloc[0]["verdict"] == "best"
    assert len(summary) == 3
    with pytest.raises(ParameterError, match="no setting has a tumor_iou"):
        V.summarize_repeats(pd.DataFrame([{**r, "tumor_iou": float("nan")} for r in rows]))


def test_evaluate_workdir_dense_and_sparse(class_map, tmp_path):
    from shapely.geometry import box

    from helpers.export import export_prediction
    from helpers.predict import predict_slide

    from helpers.errors import HistoUNetError
    from helpers.qupath import make_feature, write_feature_collection
    from helpers.rasters import write_pyramid_tiff

    wd = tmp_path / "wd"
    (wd / "slides").mkdir(parents=True)
    slide, truth = _two_tone_slide(wd / "slides")
    slide.rename(wd / "slides" / "demo.tiff")
    write_pyramid_tiff(wd / "truth" / "demo.tiff", truth, kind="labels")
    # sparse: a tumour box inside the disc and a glass box, 2 level-0 px per evaluation px
    write_feature_collection([make_feature(box(240, 200, 320, 280), "Tumor", (200, 0, 0)),
                              make_feature(box(0, 0, 64, 64), "Background", (180, 180, 180))],
                             wd / "annotations" / "demo.geojson")
    _brightness_model(wd / "model", class_map)
    predict_slide(wd / "slides" / "demo.tiff", wd / "model", wd / "predictions" / "demo", overlap=1, progress=False)
    export_prediction(wd / "predictions" / "demo")
    assert ev.predicted_slides(wd) == ["demo"]
    dense = ev.evaluate_workdir(wd, class_map, "dense")[0]
    sparse = ev.evaluate_workdir(wd, class_map, "sparse")[0]
    assert dense.downsample == 2.0 and dense.reference.shape == (256, 256)
    assert dense.summary["tumor_iou"] > 0.95
    assert sparse.summary["labelled_px"] == (80 * 80 + 64 * 64) // 4
    assert sparse.summary["tumor_iou"] == 1.0  # easy, annotated examples only
    table = ev.iou_table([dense, sparse])
    assert list(table.columns) == ["demo (dense)", "demo (sparse)"]
    (wd / "truth" / "demo.tiff").unlink()
    with pytest.raises(HistoUNetError, match="reference not found"):
        ev.evaluate_workdir(wd, class_map, "dense")
    out = ev.prepare_output(wd)
    ev.save_results([sparse], class_map, out)
    ev.write_manifest(wd)
    with pytest.raises(OutputExistsError):
        ev.prepare_output(wd)
    manifest = pd.read_csv(out / "manifest.csv")
    assert set(manifest["file"]) == {"metrics.csv", "confusion.csv", "metrics.json"}  # steps.mark_done: relative to the folder
