"""Errors that carry a one-line, actionable message for the user.

Every error raised for bad *input* (a file, a parameter) is a :class:`HistoUNetError`
whose message names the offending file or parameter and says how to fix it. Notebooks
(see :func:`helpers.nb.setup_notebook`) and the command-line entry points print these
as one line instead of a traceback.
"""

from __future__ import annotations


class HistoUNetError(Exception):
    """Base class: a problem with the user's input, explained in one line."""


class SlideError(HistoUNetError):
    """A slide cannot be opened or read (corrupt, unsupported, not tiled)."""


class MissingMppError(SlideError):
    """A slide has no microns-per-pixel and no override was given."""


class AnnotationError(HistoUNetError):
    """A GeoJSON annotation file is unusable."""


class ClassMapError(HistoUNetError):
    """The class map is malformed or does not match the data or the model."""


class OutputExistsError(HistoUNetError):
    """An output already exists and overwriting was not requested."""


class ParameterError(HistoUNetError):
    """A parameter value is out of range or inconsistent with the data."""


class ModelError(HistoUNetError):
    """A model folder or weights file is missing or unusable."""


class RasterError(HistoUNetError):
    """A raster TIFF is missing, corrupt, or not readable as asked."""


class WriteError(HistoUNetError):
    """An output folder cannot be written: read-only, no permission, or a full disk."""


class DiskFullError(WriteError):
    """The disk filled up while writing an output (nothing was left under the final name)."""


class ClusterError(HistoUNetError):
    """A Dask cluster cannot run the cohort: no scheduler, no workers, or a folder the workers cannot see."""


class PretrainedWeightsError(HistoUNetError):
    """Pre-trained encoder weights cannot be had or do not fit the encoder."""
