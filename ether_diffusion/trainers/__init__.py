"""The two trainers, importable: `dreambooth` (subjects) and `s2i` (semantic maps). The scripts at the
repository root (`train_dreambooth.py`, `train_controlnet_s2i.py`) are their command-line entry points."""
