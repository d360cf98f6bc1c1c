"""A tiny Stable Diffusion, built offline from configs, saved as a normal diffusers folder.

Every test and the demo run the same `from_pretrained` code as with the real SD-1.5: only the sizes differ.
The UNet keeps SD's module names (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`, ...), the
tokenizer is the real CLIP BPE vocabulary shipped inside open_clip, so token ids match SD-1.5's.
`builtin:tiny-sd` is accepted wherever a model path is (see `builtin.py`).
"""
import gzip
import json
import os
from pathlib import Path

import torch

TINY_VERSION = 2  # bump when the tiny model changes, so stale caches are rebuilt

# SD-1.x scheduler settings (the ones in runwayml's scheduler_config.json).
SD_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
)


def sd15_unet_config() -> dict:
    """The SD-1.5 UNet: diffusers' defaults are SD-1.x's except the text width (768) and sample size."""
    return dict(sample_size=64, cross_attention_dim=768)


def build_sd15_unet(device="meta"):
    """The real SD-1.5 UNet architecture, on `meta` by default (counts parameters without 3.4 GB)."""
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel(**sd15_unet_config())


def _bytes_to_unicode():
    # GPT-2/CLIP's reversible byte -> printable-character table (the same table open_clip and HF use).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """vocab.json + merges.txt of CLIP's tokenizer (49408 tokens) from open_clip's packaged BPE file."""
    import open_clip

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_file, merges_file


def clip_tokenizer(folder: Path, model_max_length: int = 77):
    """SD-1.5's tokenizer, its vocab.json + merges.txt written into `folder` (`write_clip_tokenizer_files`)."""
    from transformers import CLIPTokenizer

    vocab, merges = write_clip_tokenizer_files(Path(folder))
    tokenizer = CLIPTokenizer(str(vocab), str(merges), pad_token="<|endoftext|>")
    tokenizer.model_max_length = model_max_length
    return tokenizer


def without_tokenizer_json(folder: Path):
    """A tokenizer folder that `clip_tokenizer` and `save_pretrained` wrote, left to be read from vocab.json +
    merges.txt: transformers loads those in 0.06 s and the 3.6 MB tokenizer.json in 0.35 s, and a built-in
    pipeline is loaded again and again."""
    Path(folder, "tokenizer.json").unlink(missing_ok=True)


def build_tiny_sd(path, seed: int = 0):
    """Write a tiny, randomly initialised SD pipeline folder at `path` (32 px images, 8x8 latents)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        )
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(path / "tokenizer"), unet=unet,
        scheduler=PNDMScheduler(**SD_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    without_tokenizer_json(path / "tokenizer")
    return path


def cache_root() -> Path:
    """Where built-in models are built: `$ETHER_DIFFUSION_CACHE` or ~/.cache/ether_diffusion (also when the
    variable is set but empty, as `ETHER_DIFFUSION_CACHE= cmd` does: not the working directory)."""
    return Path(os.environ.get("ETHER_DIFFUSION_CACHE") or Path.home() / ".cache" / "ether_diffusion")

