"""Evaluation: batch generation and metrics for the DreamBooth and S2I protocols (see DESIGN.md section 6)."""
