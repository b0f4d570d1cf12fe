"""Merge methods: each module holds one method's math; the engine does the rest."""

# Each reached from the package (``ladle.methods.ties.magnitude_thresholds``).
from . import dare, ratatouille, slerp, soup, stock, task_arithmetic, ties

__all__ = ["dare", "ratatouille", "slerp", "soup", "stock", "task_arithmetic", "ties"]
