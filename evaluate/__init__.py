"""Evaluation: batch generation and metrics for the DreamBooth and S2I protocols (`dreambooth.py`, `s2i.py`,
their shared skeleton `harness.py`, the backbones in `metrics/`; see README.md here)."""
