"""The class map shared by every step (``data/classes.yaml``).

The work-folder layout lives in :mod:`helpers.steps`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from helpers.errors import ClassMapError

#: Roles a class may carry in ``classes.yaml`` (each at most once).
ROLES: tuple[str, ...] = ("background", "headline")

#: Default class map shipped with the project (relative to the repository root).
DEFAULT_CLASS_MAP = Path(__file__).resolve().parent.parent / "data" / "classes.yaml"


@dataclass(frozen=True)
class TissueClass:
    """One class of the map: its label value, QuPath name and RGB colour."""

    label: int
    name: str
    color: tuple[int, int, int]
    role: str | None = None  # "background" (glass) or "headline" (the class results lead with)


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

    def _role(self, role: str) -> TissueClass:
        for c in self.classes:
            if c.role == role:
                return c
        raise ClassMapError(f"{self.source}: no class has role: {role}; add `role: {role}` to one class")

    @property
    def background(self) -> TissueClass:
        """The glass/background class (``role: background`` in the YAML)."""
        return self._role("background")

    @property
    def headline(self) -> TissueClass:
        """The class results lead with, e.g. tumour (``role: headline`` in the YAML)."""
        return self._role("headline")

    def channel_of(self, name: str) -> int:
        """Model output channel of a class name (channel = label - 1)."""
        return self.label_of(name) - 1

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
                {"label": c.label, "name": c.name, "color": list(c.color), **({"role": c.role} if c.role else {})}
                for c in self.classes
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
        role = entry.get("role")
        if role is not None and role not in ROLES:
            raise ClassMapError(f"{path}: class {name!r} has role {role!r}; roles are {', '.join(ROLES)}")
        classes.append(TissueClass(label, name, color, role))  # type: ignore[arg-type]
    labels = [c.label for c in classes]
    if sorted(labels) != list(range(1, len(classes) + 1)):
        raise ClassMapError(f"{path}: labels must be 1..{len(classes)} without gaps (0 is unlabelled); got {labels}")
    names = [c.name for c in classes]
    if len(set(names)) != len(names):
        raise ClassMapError(f"{path}: class names must be unique; got {names}")
    classes = with_default_roles(classes, str(path))
    classes.sort(key=lambda c: c.label)
    return ClassMap(tuple(classes), ignore, str(path))


def with_default_roles(classes: list[TissueClass], source: str = "<memory>") -> list[TissueClass]:
    """``classes`` with each role given at most once; a role nobody holds goes to its conventional name.

    Maps written before roles existed (and model folders trained then) name their glass
    class "Background" and their headline class "Tumor".

    Raises:
        ClassMapError: a role given to several classes.
    """
    classes = list(classes)
    for role in ROLES:
        holders = [c.name for c in classes if c.role == role]
        if len(holders) > 1:
            raise ClassMapError(f"{source}: role {role!r} is given to {holders}; give it to one class")
        if not holders:
            fallback = {"background": "Background", "headline": "Tumor"}[role]
            for i, c in enumerate(classes):
                if c.name == fallback:
                    classes[i] = TissueClass(c.label, c.name, c.color, role)
    return classes
