"""LPIPS distances (the `lpips` package), real-vs-generated and within one prompt's images.

`--lpips_net` takes either
- a trunk name, `vgg` (the default and the paper's), `alex` or `squeeze`: the linear heads are the
  calibrated weights shipped inside the lpips package; the trunk's ImageNet weights come from torchvision,
  which reads them from `$TORCH_HOME/hub/checkpoints/` (default `~/.cache/torch/hub/checkpoints/`, file
  `vgg16-397923af.pth` for VGG) and downloads them there when missing. Offline, copy that file there first;
- or a local folder written by `save_lpips` (`lpips_config.json` + `lpips.safetensors`, the whole model:
  trunk and heads), which loads without any download.
Images are resized to `resolution` x `resolution` and scaled to [-1, 1] before comparison, as the OFT
evaluation code does (512 there).
"""
import json
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from safetensors.torch import load_model, save_model

from ether_diffusion.errors import UserError, first_line


DEFAULT_LPIPS = "vgg"
LPIPS_TRUNKS = ("vgg", "alex", "squeeze")
CONFIG_FILE, WEIGHTS_FILE = "lpips_config.json", "lpips.safetensors"


def save_lpips(model, folder, net: str) -> Path:
    """Write an LPIPS model as a folder that `load_lpips` reads offline (heads and trunk together)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps({"net": net}) + "\n")
    save_model(model, str(folder / WEIGHTS_FILE))  # save_model handles the heads' shared tensors (lin0 = lins.0)
    return folder


def load_lpips(spec: str = DEFAULT_LPIPS, device="cpu"):
    import lpips  # an [eval] extra: only needed when LPIPS is scored

    folder = Path(spec)
    if spec in LPIPS_TRUNKS:
        try:
            model = lpips.LPIPS(net=spec, pretrained=True, pnet_rand=False, verbose=False)
        except OSError as e:  # urllib errors are OSErrors: no cached trunk weights and no network
            raise UserError(f"--lpips_net {spec}: cannot get torchvision's ImageNet weights for the {spec} trunk ({first_line(e)}); "
                            f"offline, put them in $TORCH_HOME/hub/checkpoints or pass a folder written by "
                            f"evaluate.metrics.perceptual.save_lpips") from None
    elif (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file():
        net = json.loads((folder / CONFIG_FILE).read_text()).get("net")
        if net not in LPIPS_TRUNKS:
            raise UserError(f"{folder / CONFIG_FILE}: 'net' must be one of {LPIPS_TRUNKS}, got {net!r}")
        # pnet_rand=True builds the trunk without downloading anything; the file then fills it in.
        model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
        missing, unexpected = load_model(model, str(folder / WEIGHTS_FILE), strict=False)
        if missing or unexpected:
            raise UserError(f"{folder / WEIGHTS_FILE}: does not match an LPIPS-{net} model "
                            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    else:
        raise UserError(f"--lpips_net {spec!r}: expected one of {LPIPS_TRUNKS} or a folder with {CONFIG_FILE} "
                        f"and {WEIGHTS_FILE}")
    return model.to(device).eval()


class LpipsDistance:
    """LPIPS between aligned pairs of PIL images."""

    def __init__(self, spec: str = DEFAULT_LPIPS, device="cpu", resolution: int = 512, batch_size: int = 16):
        self.model = load_lpips(spec, device)
        self.device, self.resolution, self.batch_size, self.name = device, resolution, batch_size, spec

    def prepare(self, images) -> torch.Tensor:
        """PIL images -> (N, 3, R, R) in [-1, 1] on the CPU (prepare once, compare many times)."""
        if not images:
            return torch.empty(0, 3, self.resolution, self.resolution)
        return torch.stack([TF.to_tensor(TF.resize(image, [self.resolution, self.resolution])) * 2 - 1 for image in images])

    @torch.no_grad()
    def pairs(self, a: torch.Tensor, b: torch.Tensor, index_pairs) -> torch.Tensor:
        """Distances (P,) between a[i] and b[j] for each (i, j) in `index_pairs`."""
        index_pairs = list(index_pairs)
        distances = []
        for start in range(0, len(index_pairs), self.batch_size):
            chunk = index_pairs[start:start + self.batch_size]
            x = a[[i for i, _ in chunk]].to(self.device)
            y = b[[j for _, j in chunk]].to(self.device)
            distances.append(self.model(x, y).flatten().float().cpu())
        return torch.cat(distances) if distances else torch.empty(0)

    def __call__(self, images_a, images_b) -> torch.Tensor:
        """Distances (N,) between PIL images images_a[i] and images_b[i]."""
        if len(images_a) != len(images_b):
            raise ValueError(f"LPIPS needs aligned pairs, got {len(images_a)} and {len(images_b)} images")
        return self.pairs(self.prepare(images_a), self.prepare(images_b), [(i, i) for i in range(len(images_a))])
