"""Figures and interactive viewers of each step, kept out of the compute modules.

One module per step (``helpers.views.predict`` for 07, ...); the shared plotting
primitives stay in :mod:`helpers.viz`.
"""
