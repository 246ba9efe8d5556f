"""Histo-UNet helpers: one module per pipeline step, shared by the notebooks.

Importing this package (or any of its modules) does no work: no TensorFlow import,
no file access, no logging configuration.
"""

__version__ = "0.1.0"
