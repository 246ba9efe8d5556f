"""Class map and work-folder layout shared by every step.

The work folder (``workdir``) is the only hand-over between notebooks. Each step
writes one sub-folder with a ``manifest.csv`` (see ``docs/workfolder.md``)::

    workdir/
      slides/ annotations/ truth/      00 demo data (or the user's own)
      tiles/       01 image/label tile pairs + manifest.csv
      stain/       02 normalizer.json, normalized tiles + manifest.csv
      labels/      03 refined label tiles + manifest.csv
      augment/     04 augment.yaml + preview
      model/       05 best.keras, last.keras, history.csv, training_params.yaml, frames/
      gif/         06 training.gif
      predictions/ 07 one folder per slide
      evaluation/  08 tables and plots
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from helpers.errors import ClassMapError

#: Sub-folder of the work folder written by each step.
STEP_DIRS: dict[str, str] = {
    "slides": "slides",
    "annotations": "annotations",
    "truth": "truth",
    "tiles": "tiles",
    "stain": "stain",
    "labels": "labels",
    "augment": "augment",
    "model": "model",
    "gif": "gif",
    "predictions": "predictions",
    "evaluation": "evaluation",
}

#: Default class map shipped with the project (relative to the repository root).
DEFAULT_CLASS_MAP = Path(__file__).resolve().parent.parent / "data" / "classes.yaml"


def step_dir(workdir: str | Path, step: str, create: bool = False) -> Path:
    """Return the sub-folder of ``workdir`` that ``step`` writes.

    Args:
        workdir: The work folder shared by all notebooks.
        step: A key of :data:`STEP_DIRS` (e.g. ``"tiles"``).
        create: Create the folder (and parents) if missing.
    """
    if step not in STEP_DIRS:
        raise KeyError(f"unknown step {step!r}; known: {', '.join(STEP_DIRS)}")
    path = Path(workdir) / STEP_DIRS[step]
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class TissueClass:
    """One class of the map: its label value, QuPath name and RGB colour."""

    label: int
    name: str
    color: tuple[int, int, int]


@dataclass(frozen=True)
class ClassMap:
    """The classes a model predicts; label 0 (``ignore_label``) means unlabelled.

    Model output channel ``i`` corresponds to label ``i + 1``.
    """

    classes: tuple[TissueClass, ...]
    ignore_label: int = 0
    source: str = "<memory>"

    @property
    def n_classes(self) -> int:
        """Number of model output channels (unlabelled excluded)."""
        return len(self.classes)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def labels(self) -> list[int]:
        return [c.label for c in self.classes]

    def label_of(self, name: str) -> int:
        """Label value of a class name (case-sensitive, as in QuPath)."""
        for c in self.classes:
            if c.name == name:
                return c.label
        raise ClassMapError(
            f"{self.source}: unknown class {name!r}; known classes: {', '.join(self.names)}"
        )

    def by_label(self, label: int) -> TissueClass:
        for c in self.classes:
            if c.label == label:
                return c
        raise ClassMapError(f"{self.source}: no class with label {label}")

    def palette(self) -> np.ndarray:
        """A (256, 3) uint8 lookup table label -> RGB; unlabelled and unknown are black."""
        lut = np.zeros((256, 3), np.uint8)
        for c in self.classes:
            lut[c.label] = c.color
        return lut

    def to_dict(self) -> dict[str, Any]:
        return {
            "ignore_label": self.ignore_label,
            "classes": [
                {"label": c.label, "name": c.name, "color": list(c.color)} for c in self.classes
            ],
        }

    def save(self, path: str | Path) -> None:
        """Write the class map as YAML (atomically)."""
        from helpers.io import write_yaml

        write_yaml(self.to_dict(), path, overwrite=True)


def load_class_map(path: str | Path = DEFAULT_CLASS_MAP) -> ClassMap:
    """Read and validate a class map YAML file.

    Raises:
        ClassMapError: with the file name and what to fix.
    """
    path = Path(path)
    if not path.is_file():
        raise ClassMapError(f"{path}: class map not found; pass class_map= the path of a classes.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ClassMapError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); fix the syntax") from None
    if not isinstance(data, dict) or not isinstance(data.get("classes"), list) or not data["classes"]:
        raise ClassMapError(f"{path}: expected a mapping with a non-empty 'classes' list")
    ignore = int(data.get("ignore_label", 0))
    if ignore != 0:
        raise ClassMapError(f"{path}: ignore_label must be 0 (unlabelled); got {ignore}")
    classes = []
    for i, entry in enumerate(data["classes"]):
        try:
            label, name, color = int(entry["label"]), str(entry["name"]), tuple(int(v) for v in entry["color"])
        except (KeyError, TypeError, ValueError):
            raise ClassMapError(f"{path}: class #{i + 1} needs label (int), name (str) and color [r, g, b]") from None
        if len(color) != 3 or not all(0 <= v <= 255 for v in color):
            raise ClassMapError(f"{path}: class {name!r} color must be three values 0-255")
        classes.append(TissueClass(label, name, color))  # type: ignore[arg-type]
    labels = [c.label for c in classes]
    if sorted(labels) != list(range(1, len(classes) + 1)):
        raise ClassMapError(f"{path}: labels must be 1..{len(classes)} without gaps (0 is unlabelled); got {labels}")
    names = [c.name for c in classes]
    if len(set(names)) != len(names):
        raise ClassMapError(f"{path}: class names must be unique; got {names}")
    classes.sort(key=lambda c: c.label)
    return ClassMap(tuple(classes), ignore, str(path))
