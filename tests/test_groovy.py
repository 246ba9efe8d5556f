"""groovy/export_tiles.groovy: parses with Groovy 4 and its settings match the class map and the Python route."""

from __future__ import annotations

import inspect
import re
import shutil
from pathlib import Path

import pytest

from groovy_check import ROOT, GroovyUnavailable, ensure_groovy, parse_groovy

SCRIPT = ROOT / "groovy" / "export_tiles.groovy"


@pytest.fixture(scope="module")
def groovy_jar() -> Path:
    try:
        return ensure_groovy()
    except GroovyUnavailable as exc:
        pytest.skip(str(exc))


def _settings(text: str) -> dict:
    block = text.split("USER SETTINGS", 1)[1].split("END USER SETTINGS", 1)[0]
    num = lambda name, b=block: float(re.search(rf"\b{name}\s*=\s*([0-9.]+)", b).group(1))  # noqa: E731
    classes = {m.group(1): int(m.group(2)) for m in re.finditer(r"'([^']+)'\s*:\s*(\d+)", block)}
    rest = text.split("END USER SETTINGS", 1)[1]
    return {"pixel_size": num("requestedPixelSize"), "tile_size": int(num("tileSize")), "overlap": int(num("overlap")),
            "min_labelled_fraction": num("minLabelledFraction"), "max_glass_fraction": num("maxGlassFraction"),
            "glass_class": re.search(r"glassClass\s*=\s*'([^']*)'", block).group(1), "classes": classes,
            "glass_saturation": num("GLASS_MAX_SATURATION", rest), "glass_brightness": num("GLASS_MIN_BRIGHTNESS", rest),
            "glass_min_area": int(num("GLASS_MIN_AREA", rest))}


def test_export_script_parses(groovy_jar):
    assert parse_groovy(SCRIPT) == []


def test_broken_copy_fails_to_parse(groovy_jar, tmp_path):
    broken = tmp_path / "broken.groovy"
    text = SCRIPT.read_text()
    # drop the closing brace of the `try {` block
    assert text.count("} finally {") == 1
    broken.write_text(text.replace("} finally {", "finally {", 1))
    missing_paren = tmp_path / "paren.groovy"
    shutil.copy(SCRIPT, missing_paren)
    assert text.count(".writeTiles(tmpDir.getPath())") == 1
    missing_paren.write_text(text.replace(".writeTiles(tmpDir.getPath())", ".writeTiles(tmpDir.getPath()"))
    errors = parse_groovy(broken, SCRIPT, missing_paren)  # one JVM for the three files
    assert any(str(broken) in e for e in errors) and any(str(missing_paren) in e for e in errors)
    assert not any(str(SCRIPT.resolve()) + ":" in e for e in errors)


def test_settings_match_class_map_and_python_route(class_map):
    import papermill as pm

    from helpers.tiles import export_tiles

    s = _settings(SCRIPT.read_text())
    assert s["classes"] == {c.name: c.label for c in class_map.classes}
    order = re.search(r"DRAW_ORDER\s*=\s*\[([^\]]*)\]", SCRIPT.read_text()).group(1)
    assert sorted(re.findall(r"'([^']+)'", order)) == sorted(class_map.names)
    defaults = {k: p.default for k, p in inspect.signature(export_tiles).parameters.items()}
    assert s["pixel_size"] == defaults["mpp"]
    assert s["tile_size"] == defaults["tile_size"]
    assert s["overlap"] == defaults["tile_size"] - defaults["stride"]
    assert s["min_labelled_fraction"] == defaults["min_labelled_fraction"]
    assert s["max_glass_fraction"] == defaults["max_glass_fraction"]
    assert defaults["background_class"] is None  # None: the class map's background role
    assert s["glass_class"] == class_map.background.name
    from helpers.tissue import glass_mask

    glass = {k: p.default for k, p in inspect.signature(glass_mask).parameters.items()}
    assert (s["glass_saturation"], s["glass_brightness"], s["glass_min_area"]) == \
        (glass["saturation_threshold"], glass["min_brightness"], glass["min_area"])
    nb = pm.inspect_notebook(str(ROOT / "notebooks" / "01_export_tiles.ipynb"))
    assert float(nb["mpp"]["default"]) == s["pixel_size"]
    assert int(nb["tile_size"]["default"]) == s["tile_size"]
    assert int(nb["tile_size"]["default"]) - int(nb["stride"]["default"]) == s["overlap"]
    assert float(nb["min_labelled_fraction"]["default"]) == s["min_labelled_fraction"]
    assert float(nb["max_glass_fraction"]["default"]) == s["max_glass_fraction"]
    text = SCRIPT.read_text()
    for call in ["backgroundLabel(0", "multichannelOutput(false)", "annotatedTilesOnly(true)", "imageExtension('.png')",
                 "labeledImageExtension('.png')", "labeledServer(labelServer)", "PROJECT_BASE_DIR"]:
        assert call in text, call
    assert "QuPath script -p project.qpproj groovy/export_tiles.groovy" in text
    assert "project.qpproj -s" not in text  # -s is --save: it would rewrite every image's data file
