import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_sd_path():
    from ether_diffusion.tiny_sd import resolve_model_path

    return resolve_model_path("builtin:tiny-sd")


@pytest.fixture(scope="session")
def _tiny_unet(tiny_sd_path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet").eval()


@pytest.fixture
def tiny_unet(_tiny_unet):
    """A fresh copy of the tiny SD UNet (float32, eval mode) for each test."""
    return copy.deepcopy(_tiny_unet)


@pytest.fixture
def unet_inputs():
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([10, 700]),
        torch.randn(2, 7, 32, generator=g),
    )


@pytest.fixture(scope="session")
def shared_dir():
    """The project's shared/ folder (datasets), which sits beside the repository (../shared)."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "shared"
    assert (path / "datasets").is_dir(), f"shared datasets not found at {path}"
    return path
