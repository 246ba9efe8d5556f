"""Figures and notebook widgets of each step, kept out of the compute modules (``views/<step>.py``)."""
