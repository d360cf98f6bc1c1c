#!/usr/bin/env python
"""DreamBooth with ETHER / ETHER+ (and LoRA, OFT, Naive, HRA) on Stable Diffusion: the entry point of
`accelerate launch train_dreambooth.py ...`. The trainer is `ether_diffusion/trainers/dreambooth.py`
(also `python -m ether_diffusion.trainers.dreambooth`); `--help` lists its arguments."""
from ether_diffusion.errors import run_cli
from ether_diffusion.trainers.dreambooth import main

if __name__ == "__main__":
    run_cli(main)
