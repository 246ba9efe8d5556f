"""Parse-check QuPath Groovy scripts with a real Groovy 4 parser (QuPath is not needed).

QuPath 0.5+ runs Groovy 4. The npm package ``npm-groovy-lint`` bundles Groovy 4 jars
(and runs on Java 17); :func:`ensure_groovy` installs a pinned version on demand into
``<repo>/.tools/`` (git-ignored) with ``npm install --prefix``; afterwards it works
offline. :func:`parse_groovy` compiles a script only up to Groovy's CONVERSION phase:
syntax errors are found, while QuPath classes (not on the class path) are not resolved.

Usage from the command line::

    python tests/groovy_check.py groovy/export_tiles.groovy [more.groovy ...]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS_DIR = ROOT / ".tools"
#: Pinned npm-groovy-lint release (bundles Groovy 4.0.26).
NPM_GROOVY_LINT_VERSION = "15.2.0"

# Groovy runner: compile each file to CONVERSION (syntax) and print one line per error.
_RUNNER = r"""
import org.codehaus.groovy.control.*
int bad = 0
for (p in args) {
    def unit = new CompilationUnit(new CompilerConfiguration())
    unit.addSource(new File(p))
    try {
        unit.compile(Phases.CONVERSION)
    } catch (MultipleCompilationErrorsException e) {
        bad++
        e.errorCollector.errors.each { err ->
            def msg = err.metaClass.hasProperty(err, 'cause') && err.cause != null ? err.cause.message : err.toString()
            println('GROOVY-ERROR ' + p + ': ' + msg.readLines().join(' ').trim())
        }
    }
}
System.exit(bad ? 1 : 0)
"""


class GroovyUnavailable(RuntimeError):
    """Java or npm is missing, or the install failed."""


def _find_jar(tools_dir: Path) -> Path | None:
    jars = sorted((tools_dir / "node_modules" / "npm-groovy-lint" / "lib" / "java" / "groovy" / "lib").glob("groovy-4*.jar"))
    return next((j for j in jars if j.name.count("-") == 1), None)


def ensure_groovy(tools_dir: Path = TOOLS_DIR) -> Path:
    """Path of the bundled ``groovy-4.x.jar``, installing npm-groovy-lint first if needed.

    Raises:
        GroovyUnavailable: no ``java`` or ``npm`` on PATH, or the install failed.
    """
    if shutil.which("java") is None:
        raise GroovyUnavailable("java not found on PATH; install a Java 17 runtime to parse Groovy scripts")
    jar = _find_jar(tools_dir)
    if jar is not None:
        return jar
    npm = shutil.which("npm")
    if npm is None:
        raise GroovyUnavailable("npm not found on PATH; install Node.js/npm (needed once to fetch npm-groovy-lint)")
    tools_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([npm, "install", "--prefix", str(tools_dir), "--no-audit", "--no-fund", "--ignore-scripts",
                           f"npm-groovy-lint@{NPM_GROOVY_LINT_VERSION}"], capture_output=True, text=True, timeout=600)
    jar = _find_jar(tools_dir)
    if proc.returncode != 0 or jar is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise GroovyUnavailable(f"npm install npm-groovy-lint@{NPM_GROOVY_LINT_VERSION} into {tools_dir} failed: {tail[0]}")
    return jar


def parse_groovy(*paths: str | Path, tools_dir: Path = TOOLS_DIR) -> list[str]:
    """Syntax errors of Groovy scripts (empty list = all parse), with Groovy 4.

    Args:
        *paths: Groovy files to check.
        tools_dir: Where npm-groovy-lint is (or gets) installed.

    Returns:
        One message per error, ``"<file>: <message> @ line L, column C."``.
    """
    jar = ensure_groovy(tools_dir)
    files = [str(Path(p).resolve()) for p in paths]
    for f in files:
        if not Path(f).is_file():
            raise FileNotFoundError(f)
    proc = subprocess.run(["java", "-cp", str(jar), "groovy.ui.GroovyMain", "-e", _RUNNER, *files],
                          capture_output=True, text=True, timeout=300)
    errors = [line.removeprefix("GROOVY-ERROR ").strip() for line in proc.stdout.splitlines() if line.startswith("GROOVY-ERROR ")]
    if proc.returncode != 0 and not errors:
        errors = [f"groovy runner failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()[:500]}"]
    return errors


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(__doc__)
        return 2
    errors = parse_groovy(*args)
    for e in errors:
        print(e)
    print("ok" if not errors else f"{len(errors)} error(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
