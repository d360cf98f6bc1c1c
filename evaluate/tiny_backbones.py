"""Tiny, randomly initialised stand-ins for the evaluation backbones, written to local folders.

Each folder has the format the real backbone is given in, so it loads through the same `--dino`, `--clip`,
`--lpips_net`, `--segmenter` and `--inception` paths a user passes:

    dino/       transformers ViTModel + ViTImageProcessor (like facebook/dino-vits16)
    clip/       open_clip hub layout: open_clip_config.json + open_clip_model.safetensors
    lpips/      lpips_config.json + lpips.safetensors (an LPIPS model with a SqueezeNet trunk: the smallest
                trunk the lpips package has; VGG's 14.7M parameters would not be "tiny")
    upernet/    transformers UperNetForSemanticSegmentation (ConvNeXt backbone, 150 classes) + processor
    inception/  fid_features.json + fid_features.safetensors (a two-layer conv net standing in for InceptionV3)

Numbers computed with them mean nothing; they prove the plumbing. `python -m evaluate.tiny_backbones DIR`
writes them and prints the paths.
"""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ether_diffusion import checks
from ether_diffusion.errors import ArgumentParser, run_cli
from ether_diffusion.files import check_output_folder
from evaluate.metrics.fid import ConvFeatures, save_conv_features
from evaluate.metrics.perceptual import save_lpips

IMAGE_SIZE = 32  # input size of the ViT / CLIP stand-ins


def write_tiny_dino(folder) -> Path:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=IMAGE_SIZE, patch_size=8)
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(folder)
    return Path(folder)


def write_tiny_clip(folder) -> Path:
    import open_clip

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_cfg = {
        "embed_dim": 16,
        "quick_gelu": True,
        "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        # The real CLIP vocabulary size, so open_clip's default tokenizer (its packaged BPE) fits.
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    preprocess_cfg = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=1))
    save_file(open_clip.CLIP(**model_cfg).state_dict(), str(folder / "open_clip_model.safetensors"))
    return folder


def write_tiny_lpips(folder) -> Path:
    import lpips

    model = lpips.LPIPS(net="squeeze", pretrained=False, pnet_rand=True, verbose=False)
    with torch.no_grad():  # real LPIPS heads are non-negative (clamped in training), so distances are >= 0
        for lin in model.lins:
            lin.model[-1].weight.abs_()
    return save_lpips(model, folder, net="squeeze")


def write_tiny_upernet(folder) -> Path:
    from transformers import ConvNextConfig, SegformerImageProcessor, UperNetConfig, UperNetForSemanticSegmentation

    backbone = ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                              out_features=["stage1", "stage2", "stage3", "stage4"])
    config = UperNetConfig(backbone_config=backbone, hidden_size=16, num_labels=150, use_auxiliary_head=False)
    UperNetForSemanticSegmentation(config).save_pretrained(folder)
    # The real openmmlab/upernet-* checkpoints ship a SegformerImageProcessor too.
    SegformerImageProcessor(size={"height": 64, "width": 64}, do_reduce_labels=False).save_pretrained(folder)
    return Path(folder)


def write_tiny_inception(folder) -> Path:
    return save_conv_features(ConvFeatures(channels=(8, 16), input_size=32), folder)


def write_tiny_backbones(root, seed: int = 0) -> dict[str, Path]:
    """Write every stand-in under `root`; returns {"dino", "clip", "lpips", "upernet", "inception"} -> folder."""
    root = Path(root)
    writers = {"dino": write_tiny_dino, "clip": write_tiny_clip, "lpips": write_tiny_lpips,
               "upernet": write_tiny_upernet, "inception": write_tiny_inception}
    paths = {}
    for name, write in writers.items():
        torch.manual_seed(seed)
        paths[name] = write(root / name)
    return paths


def main(argv=None):
    parser = ArgumentParser(prog="python -m evaluate.tiny_backbones",
                            description="Write tiny random stand-ins for the evaluation backbones (plumbing tests only).")
    parser.add_argument("output_dir", help="folder to write dino/, clip/, lpips/, upernet/ and inception/ into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    check_output_folder(args.output_dir, "output_dir")
    checks.seed(args, "seed")
    for name, path in write_tiny_backbones(args.output_dir, seed=args.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    run_cli(main)
