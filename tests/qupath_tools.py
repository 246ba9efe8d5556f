"""Run QuPath's own code from tests: ``../shared/tools/qupath-check`` (see its README.md).

* :func:`check_geojson` reads GeoJSON files with QuPath's reader (``qupath-check --json``);
* :func:`run_script` runs a Groovy script headless on QuPath's classes (``qupath-script``)
  with a slide decoded by :func:`dump_levels`;
* :func:`script_with_settings` copies a script with some USER SETTINGS changed.

The tools sit beside the checkout (``ROOT.parent / "shared"``) and need Java (>= 17 for
QuPath 0.5, >= 21 for 0.7). When they cannot run, :func:`require` skips the test with a
one-line reason on a user's fresh clone, and fails it when ``CI=true``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT.parent / "shared" / "tools" / "qupath-check"
VERSIONS = ("0.5", "0.7")
#: Java each QuPath version needs (the launchers find one; see the tools' README).
JAVA_NEEDED = {"0.5": 17, "0.7": 21}


@lru_cache(maxsize=None)
def unavailable(version: str) -> str | None:
    """Why QuPath ``version``'s tools cannot run here (None when they can)."""
    launcher = TOOLS / "qupath-check"
    if not launcher.is_file():
        return f"{TOOLS} not found (QuPath's code for tests sits beside the checkout in ../shared)"
    # --help makes the launcher find a Java >= JAVA_NEEDED[version] and start QuPath's reader
    proc = subprocess.run([str(launcher), "--qupath", version, "--help"], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return f"QuPath {version} tools cannot run (needs Java >= {JAVA_NEEDED[version]}): {last[0]}"
    return None


def require(version: str) -> None:
    """Skip (fresh clone) or fail (``CI=true``) the calling test when QuPath ``version`` cannot run."""
    reason = unavailable(version)
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


def check_geojson(version: str, *files: Path, strict: bool = True) -> tuple[int, dict[str, dict]]:
    """Read ``files`` with QuPath ``version``'s own GeoJSON reader (one JVM for all files).

    Returns:
        ``(exit code, {file name: report})``; each report is the tool's JSON (objects,
        types, classifications and colours, polygon_parts, holes, total_area_px, failures, ...).
    """
    require(version)
    cmd = [str(TOOLS / "qupath-check"), "--qupath", version, "--json", *(["--strict"] if strict else []),
           *[str(f) for f in files]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    reports = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            reports[Path(r["file"]).name] = r
    if len(reports) != len(files):
        raise AssertionError(f"qupath-check {version} gave {len(reports)} reports for {len(files)} files "
                             f"(exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    return proc.returncode, reports


def dump_levels(slide: Path, out: Path) -> Path:
    """Decode a slide's pyramid with OpenSlide into ``out`` for :func:`run_script` (the tools' dump_levels.py)."""
    require(VERSIONS[0])
    proc = subprocess.run([sys.executable, str(TOOLS / "dump_levels.py"), str(slide), str(out)],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"dump_levels.py {slide} failed: {proc.stderr.strip()[-500:]}")
    return out


def run_script(version: str, script: Path, levels: Path, geojson: Path, project: Path,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a Groovy ``script`` as ``QuPath script`` does, on QuPath ``version``'s classes.

    The image is the slide decoded in ``levels`` with the objects of ``geojson``;
    ``PROJECT_BASE_DIR`` is ``project``. Returns the finished process (stdout, stderr, returncode).
    """
    require(version)
    cmd = [str(TOOLS / "qupath-script"), "--qupath", version, "--levels", str(levels), "--geojson", str(geojson),
           "--script", str(script), "--project", str(project)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def script_with_settings(script: Path, out: Path, epilogue: str = "", **settings: str) -> Path:
    """Copy ``script`` to ``out`` with USER SETTINGS changed (``name='Groovy literal'``) and ``epilogue`` appended.

    Raises:
        AssertionError: a setting is not declared exactly once in the USER SETTINGS block.
    """
    text = script.read_text()
    head, rest = text.split("// ===================== USER SETTINGS", 1)
    block, tail = rest.split("END USER SETTINGS", 1)
    for name, value in settings.items():
        pattern = re.compile(rf"^(\s*(?:def|\w+)\s+{re.escape(name)}\s*=\s*)(.*?)((?:\s+//.*)?)$", re.M)
        block, n = pattern.subn(lambda m: f"{m.group(1)}{value}{m.group(3)}", block)
        assert n == 1, f"setting {name} found {n} times in {script}"
    out.write_text(head + "// ===================== USER SETTINGS" + block + "END USER SETTINGS" + tail + epilogue)
    return out
