"""FID with torchmetrics' `FrechetInceptionDistance`, fed by a feature extractor loaded from a local path.

`--inception` takes
- `inception-v3-compat` (the default): torch-fidelity's InceptionV3, the network behind the standard FID
  numbers, with its weights file `weights-inception-2015-12-05-6726825d.pth` read from
  `$TORCH_HOME/hub/checkpoints/` (downloaded there when missing and online);
- a path to that weights file (`.pth` or a `.safetensors` copy of it);
- a folder written by `save_conv_features` (`fid_features.json` + `fid_features.safetensors`): a small conv
  net, the offline test stand-in. Its "FID" proves the plumbing and means nothing.
Weights are read with safetensors or `torch.load(weights_only=True)`. (torch-fidelity itself unpickles its
file with weights_only=False; it is handed an in-memory copy of the tensors already checked here.)
"""
import io
import json
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ether_diffusion.errors import UserError, first_line


DEFAULT_INCEPTION = "inception-v3-compat"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
CONFIG_FILE, WEIGHTS_FILE = "fid_features.json", "fid_features.safetensors"


class ConvFeatures(nn.Module):
    """uint8 images (N, 3, H, W) -> (N, C) pooled features of a few strided convs. Test stand-in only."""

    def __init__(self, channels=(8, 16), input_size: int = 32):
        super().__init__()
        self.input_size = input_size
        layers, width = [], 3
        for out in channels:
            layers += [nn.Conv2d(width, out, 3, stride=2, padding=1), nn.ReLU()]
            width = out
        self.layers = nn.Sequential(*layers)
        self.num_features = width  # torchmetrics reads this instead of probing with a dummy image

    def forward(self, images):
        x = (images.float() - 128) / 128
        x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False, antialias=True)
        return self.layers(x).mean(dim=(2, 3))


def save_conv_features(model: ConvFeatures, folder) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    channels = [m.out_channels for m in model.layers if isinstance(m, nn.Conv2d)]
    (folder / CONFIG_FILE).write_text(json.dumps({"type": "conv", "channels": channels, "input_size": model.input_size}) + "\n")
    save_file(model.state_dict(), str(folder / WEIGHTS_FILE))
    return folder


def _read_state_dict(path: Path) -> dict:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or non-tensor file; the message names it
        raise UserError(f"--inception {path}: cannot read weights ({first_line(e)})") from None


def _default_inception_file() -> Path:
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(INCEPTION_URL)
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(INCEPTION_URL, str(path))
        except Exception as e:
            raise UserError(f"--inception {DEFAULT_INCEPTION}: {path} is missing and cannot be downloaded ({first_line(e)}); "
                            f"copy torch-fidelity's InceptionV3 weights there or pass --inception FILE") from None
    return path


def load_fid_features(spec: str = DEFAULT_INCEPTION) -> nn.Module:
    """The feature extractor named by `spec` (see the module docstring), in eval mode."""
    path = _default_inception_file() if spec == DEFAULT_INCEPTION else Path(spec)
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
            raise UserError(f"--inception {path}: a folder must hold {CONFIG_FILE} and {WEIGHTS_FILE}")
        config = json.loads((path / CONFIG_FILE).read_text())
        if config.get("type") != "conv":
            raise UserError(f"{path / CONFIG_FILE}: unknown feature extractor type {config.get('type')!r}")
        model = ConvFeatures(tuple(config["channels"]), config["input_size"])
        model.load_state_dict(_read_state_dict(path / WEIGHTS_FILE))
        return model.eval()
    if not path.is_file():
        raise UserError(f"--inception {spec}: no such file or folder")
    from torchmetrics.image.fid import NoTrainInceptionV3

    buffer = io.BytesIO()
    torch.save(_read_state_dict(path), buffer)
    buffer.seek(0)
    try:
        model = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=buffer)
    except RuntimeError as e:  # load_state_dict: wrong keys or shapes
        raise UserError(f"--inception {path}: not torch-fidelity's InceptionV3 weights ({first_line(e)})") from None
    model.num_features = 2048
    return model


def make_fid(spec: str = DEFAULT_INCEPTION, device="cpu"):
    """A torchmetrics FrechetInceptionDistance over `spec`'s features; update it with uint8 (N, 3, H, W).
    It is filled and computed by one process, so it must not try to gather states from the others."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=load_fid_features(spec), sync_on_compute=False).to(device)
