#!/usr/bin/env python
"""Semantic map -> image with a ControlNet-style signal encoder and ETHER / ETHER+ (or LoRA, OFT, Naive, HRA)
adapters: the entry point of `accelerate launch train_controlnet_s2i.py ...`. The trainer is
`ether_diffusion/trainers/s2i.py` (also `python -m ether_diffusion.trainers.s2i`); `--help` lists its arguments."""
from ether_diffusion.errors import run_cli
from ether_diffusion.trainers.s2i import main

if __name__ == "__main__":
    run_cli(main)
