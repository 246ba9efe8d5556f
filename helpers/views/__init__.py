"""Figures and widgets of the steps, one module per step, kept out of the compute modules."""
