"""Atomic, no-surprise file output and the manifest CSVs that hand work between steps.

Every output is written to a temporary file in the destination folder and moved into
place with :func:`os.replace` only when complete, so an interrupted run or a full disk
never leaves a half-written file under the final name. Existing outputs are replaced
only when the caller passes ``overwrite=True``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from helpers.errors import DiskFullError, HistoUNetError, OutputExistsError, WriteError


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere the only portable read is a set-and-restore
    os.umask(mask)
    return mask


def check_writable(path: str | Path, overwrite: bool = False, what: str = "") -> Path:
    """The one refuse-to-overwrite rule: an existing output needs ``overwrite=True``.

    ``path`` is a file, or a folder (which counts as existing when it is not empty).
    Steps call it as :func:`helpers.steps.guard_output`.

    Raises:
        OutputExistsError: naming the path and the two ways out.
    """
    path = Path(path)
    exists = path.is_file() or (path.is_dir() and any(path.iterdir()))
    if exists and not overwrite:
        what = f" ({what})" if what else ""
        raise OutputExistsError(
            f"{path} already exists{what}; pass overwrite=True to replace it or choose another workdir"
        )
    return path


#: errno values that mean "this folder cannot take the output", with the fix to print.
_WRITE_FIXES: dict[int, tuple[str, str]] = {
    errno.EROFS: ("read-only file system", "choose a workdir on a writable disk"),
    errno.EACCES: ("no write permission", "make it writable (chmod u+w, or ask its owner) or choose another workdir"),
    errno.EPERM: ("no write permission", "make it writable (chmod u+w, or ask its owner) or choose another workdir"),
    errno.ENOSPC: ("disk full", "free space on that disk or choose a workdir on another disk, then run again"),
    errno.EDQUOT: ("disk quota exceeded", "free space or choose a workdir on another disk, then run again"),
    errno.EFBIG: ("file too large for this file system", "choose a workdir on another disk"),
}


def _write_oserror(exc: BaseException) -> OSError | None:
    """The OSError with a write-failure errno in ``exc``'s chain (libraries wrap it), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _WRITE_FIXES:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def write_error(exc: BaseException, folder: str | Path) -> WriteError | None:
    """The one-line :class:`WriteError` for a failed write into ``folder``, or None if ``exc`` is another problem.

    A full disk gives :class:`DiskFullError` (a :class:`WriteError`).
    """
    os_exc = _write_oserror(exc)
    if os_exc is None:
        return None
    folder = Path(folder)
    while folder.name.startswith(".") and ".part" in folder.name:  # a temporary step folder: name the real one
        folder = folder.parent
    if os_exc.filename and not _inside(Path(os.fsdecode(os_exc.filename)), folder):
        return None  # e.g. an unreadable input file: not a problem of the output folder
    what, fix = _WRITE_FIXES[os_exc.errno]
    cls = DiskFullError if os_exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else WriteError
    return cls(f"{folder}: cannot write here ({what}); {fix}; nothing half-written was left behind")


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except (ValueError, OSError):
        return False
    return True


@contextlib.contextmanager
def write_guard(folder: str | Path) -> Iterator[None]:
    """Turn a read-only folder, a missing write permission or a full disk into one line naming ``folder``.

    The shared guard of every step's output (used by :func:`atomic_path`,
    :func:`atomic_dir`, :func:`make_dir` and so :func:`helpers.steps.mark_done`). Other
    errors pass through unchanged.
    """
    try:
        yield
    except WriteError:
        raise
    except Exception as exc:
        err = write_error(exc, folder)
        if err is None:
            raise
        raise err from None


def make_dir(path: str | Path) -> Path:
    """``mkdir -p`` with the one-line write errors of :func:`write_guard`; returns ``path``."""
    path = Path(path)
    with write_guard(_existing_parent(path)):
        path.mkdir(parents=True, exist_ok=True)
    return path


def _existing_parent(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (the folder a user must fix)."""
    for p in (path, *path.parents):
        if p.exists():
            return p
    return path


@contextlib.contextmanager
def resumable_or_nothing(folder: str | Path, state: str = "state.json", covers: tuple[str, ...] = ()) -> Iterator[Path]:
    """Leave a resumable partial ``folder`` or none at all when the block fails.

    On any exception, ``folder`` is kept only if its ``state`` file exists and is at least
    as new as each file in ``covers`` (the state was written after the data it describes);
    otherwise the folder is removed, so a full disk does not leave a large partial file
    that no later run can use.
    """
    folder = Path(folder)
    try:
        yield folder
    except BaseException:
        f = folder / state
        keep = f.is_file() and all(not (folder / c).is_file() or (folder / c).stat().st_mtime_ns <= f.stat().st_mtime_ns
                                   for c in covers)
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_path(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it to ``path`` if the block succeeds.

    The temporary name keeps the suffix so libraries that infer the format from it
    (imageio, tifffile, keras) work. On any exception the temporary file is removed.
    """
    path = check_writable(path, overwrite)
    make_dir(path.parent)
    with write_guard(path.parent):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".part{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with write_guard(path.parent):
            yield tmp_path
            if not tmp_path.exists() or tmp_path.stat().st_size == 0:
                raise HistoUNetError(f"{path}: nothing was written")
            os.chmod(tmp_path, 0o666 & ~current_umask())  # mkstemp makes 0600; outputs are shared files
            os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Like :func:`atomic_path` for a whole folder: built beside, swapped in when done."""
    path = check_writable(path, overwrite)
    make_dir(path.parent)
    with write_guard(path.parent):
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent))
    try:
        with write_guard(path.parent):
            yield tmp
            os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; step folders are shared
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes(data: bytes, path: str | Path, overwrite: bool = False) -> Path:
    with atomic_path(path, overwrite) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(text: str, path: str | Path, overwrite: bool = False) -> Path:
    return write_bytes(text.encode("utf-8"), path, overwrite)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def write_json(obj: Any, path: str | Path, overwrite: bool = False, indent: int | None = 2) -> Path:
    return write_text(json.dumps(obj, indent=indent, default=_jsonable), path, overwrite)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def write_yaml(obj: Any, path: str | Path, overwrite: bool = False) -> Path:
    clean = json.loads(json.dumps(obj, default=_jsonable))
    return write_text(yaml.safe_dump(clean, sort_keys=False), path, overwrite)


def read_yaml(path: str | Path) -> Any:
    return yaml.safe_load(Path(path).read_text())


def write_image(image: np.ndarray, path: str | Path, overwrite: bool = False) -> Path:
    """Write a PNG/JPEG/TIFF image (uint8 RGB or label) atomically with imageio."""
    import imageio.v3 as iio

    with atomic_path(path, overwrite) as tmp:
        iio.imwrite(tmp, np.ascontiguousarray(image), extension=Path(path).suffix)
    return Path(path)


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file to a numpy array (RGB uint8, alpha dropped; labels as 2-D)."""
    import imageio.v3 as iio

    try:
        img = iio.imread(path)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the same user problem
        raise HistoUNetError(f"{path}: cannot read image ({exc}); re-export the file") from None
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[..., :3]
    return img


def write_manifest(df: pd.DataFrame, path: str | Path, overwrite: bool = False) -> Path:
    """Write a step's manifest CSV atomically (written last: it marks the step done)."""
    with atomic_path(path, overwrite) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)


def read_manifest(path: str | Path, step_hint: str = "") -> pd.DataFrame:
    """Read a manifest CSV; a missing one says which notebook writes it."""
    path = Path(path)
    if not path.is_file():
        hint = f"; run {step_hint} first" if step_hint else ""
        raise HistoUNetError(f"{path}: manifest not found{hint}")
    return pd.read_csv(path)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (model and weights files are recorded by it)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
