"""Truth probes: `truth_sweep` runs CCS and its baselines by layer on the truth datasets, with
transfer between datasets; `render_truth_report` writes the self-contained truth.html."""

from madlens.truth.report import render_truth_report
from madlens.truth.sweep import METHODS, default_truth_hooks, format_sweep, truth_sweep

__all__ = ["METHODS", "default_truth_hooks", "format_sweep", "render_truth_report", "truth_sweep"]
