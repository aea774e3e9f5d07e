"""`madlens lab`: re-runs of research findings on a model you control (see docs/lab.md)."""
