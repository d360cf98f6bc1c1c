"""The ControlNet-style signal encoder for semantic-map -> image (S2I), and the pipeline that uses it.

The encoder is diffusers' `ControlNetConditioningEmbedding` (ControlNet's hint encoder: 3x3 convs with SiLU,
one stride-2 conv per stage, the last conv zero-initialised). It maps the conditioning image at pixel
resolution to the UNet's `conv_in` width at latent resolution, and its output is *added* to `conv_in`'s
output. Because the last conv starts at zero, the controlled UNet equals the base UNet at step 0.

Rather than subclassing the UNet, `attach_control_encoder` swaps `unet.conv_in` for `ControlledConvIn`,
which computes `conv_in(x) + encoder(control)`. The stock `UNet2DConditionModel.forward` and the stock
`StableDiffusionPipeline` therefore run unchanged; the control image is set before each UNet call:

    attach_control_encoder(unet, make_control_encoder(unet, vae_scale_factor=8))
    with use_control(unet, conditioning_pixel_values):     # (B, 3, H, W) in [0, 1]
        noise_pred = unet(noisy_latents, timesteps, text_embeddings).sample

A latent batch that is a multiple of the control batch gets the control tiled: classifier-free guidance
runs the UNet on `cat([uncond, cond])`, and both halves must see the same map.
"""
import contextlib
import json
import math
import os
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .adapter_file import ADAPTER_FILE
from .errors import UserError
from .pipelines import load_pipeline

ENCODER_WEIGHTS = "control_encoder.safetensors"
ENCODER_CONFIG = "control_encoder.json"
ADE20K_CONDITIONING = "ade20k-palette"  # ADE20K label maps in the palette's colours (the default task)
IMAGE_CONDITIONING = "image"  # any conditioning picture: ControlNet-style data (`control_data`)
# ControlNet's channels; its three stride-2 stages match SD's VAE factor 8.
CONTROLNET_CHANNELS = (16, 32, 96, 256)


def vae_scale_factor(vae) -> int:
    """Pixels per latent: 2 ** (number of VAE blocks - 1), as StableDiffusionPipeline computes it."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def encoder_channels_for(scale_factor: int) -> tuple[int, ...]:
    """ControlNet's channels cut to log2(scale_factor) stride-2 stages: (16, 32, 96, 256) for SD's factor 8,
    (16, 32, 96) for the tiny SD's factor 4."""
    stages = round(math.log2(scale_factor)) if scale_factor > 0 else -1
    if 2**stages != scale_factor or not 1 <= stages <= len(CONTROLNET_CHANNELS) - 1:
        raise UserError(f"VAE scale factor {scale_factor} is not 2, 4 or 8; pass the encoder's block_out_channels "
                        f"(one entry more than its stride-2 stages)")
    return CONTROLNET_CHANNELS[: stages + 1]


def _base_conv_in(unet) -> nn.Conv2d:
    conv_in = unet.conv_in
    return conv_in.conv_in if isinstance(conv_in, ControlledConvIn) else conv_in


def make_control_encoder(unet, scale_factor: int, block_out_channels=None, conditioning_channels: int = 3):
    """A fresh hint encoder for `unet`: output width = `conv_in`'s, one stride-2 stage per factor of 2 in
    `scale_factor` (the VAE's), so its output lands exactly on the latent grid."""
    # diffusers imports in seconds; this module is also read by code that never builds an encoder.
    from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding

    block_out_channels = tuple(block_out_channels or encoder_channels_for(scale_factor))
    if 2 ** (len(block_out_channels) - 1) != scale_factor:
        raise UserError(f"encoder channels {block_out_channels} downsample by {2 ** (len(block_out_channels) - 1)}, "
                        f"the VAE by {scale_factor}")
    return ControlNetConditioningEmbedding(
        conditioning_embedding_channels=_base_conv_in(unet).out_channels,
        conditioning_channels=conditioning_channels,
        block_out_channels=block_out_channels,
    )


def encoder_config(encoder) -> dict:
    """What it takes to rebuild `encoder` (read off its layers, so it cannot drift from the weights)."""
    stride2 = [conv.out_channels for conv in encoder.blocks[1::2]]
    return {
        "conditioning_embedding_channels": encoder.conv_out.out_channels,
        "conditioning_channels": encoder.conv_in.in_channels,
        "block_out_channels": [encoder.conv_in.out_channels] + stride2,
        "vae_scale_factor": 2 ** len(stride2),
    }


class ControlledConvIn(nn.Module):
    """`conv_in(x) + encoder(control)`: the UNet's input conv with the signal encoder's output added.

    `control` is the conditioning image batch (B, C, H * f, W * f) in [0, 1], set before the UNet call
    (`use_control`). A latent batch of k * B gets the embedding tiled k times (classifier-free guidance).
    """

    def __init__(self, conv_in: nn.Conv2d, encoder: nn.Module):
        super().__init__()
        self.conv_in = conv_in
        self.encoder = encoder
        self.control = None

    def forward(self, sample):
        out = self.conv_in(sample)
        if self.control is None:
            raise RuntimeError("the UNet has a control encoder but no control image: call it inside use_control(unet, image)")
        encoder_dtype = self.encoder.conv_in.weight.dtype
        embedding = self.encoder(self.control.to(device=out.device, dtype=encoder_dtype)).to(out.dtype)
        if embedding.shape[-2:] != out.shape[-2:]:
            raise ValueError(f"control image {tuple(self.control.shape[-2:])} encodes to {tuple(embedding.shape[-2:])} "
                             f"but the latents are {tuple(out.shape[-2:])}: give the control at the image's size")
        if out.shape[0] != embedding.shape[0]:
            if out.shape[0] % embedding.shape[0]:
                raise ValueError(f"latent batch {out.shape[0]} is not a multiple of the control batch {embedding.shape[0]}")
            embedding = embedding.repeat(out.shape[0] // embedding.shape[0], 1, 1, 1)
        return out + embedding


def attach_control_encoder(unet, encoder) -> ControlledConvIn:
    """Put `encoder` into `unet` (in place) as `unet.conv_in.encoder`; `unet.to(...)` moves it along and
    a DDP-wrapped UNet syncs its gradients. Attach after `inject_adapters`, which freezes everything else."""
    if isinstance(unet.conv_in, ControlledConvIn):
        raise UserError("the UNet already has a control encoder (detach_control_encoder first)")
    expected = unet.conv_in.out_channels
    if encoder.conv_out.out_channels != expected:
        raise UserError(f"the control encoder outputs {encoder.conv_out.out_channels} channels, the UNet's conv_in {expected}")
    unet.conv_in = ControlledConvIn(unet.conv_in, encoder)
    return unet.conv_in


def detach_control_encoder(unet):
    """Restore the plain `conv_in`; returns the encoder."""
    controlled = unet.conv_in
    if not isinstance(controlled, ControlledConvIn):
        raise ValueError("the UNet has no control encoder")
    unet.conv_in = controlled.conv_in
    return controlled.encoder


def _controlled_conv_in(model) -> ControlledConvIn:
    # Searching the modules also finds it through DDP / torch.compile / accelerate wrappers.
    for module in model.modules():
        if isinstance(module, ControlledConvIn):
            return module
    raise ValueError("the UNet has no control encoder (attach_control_encoder first)")


@contextlib.contextmanager
def use_control(unet, control):
    """Within the block, every UNet call adds the encoding of `control` (B, C, H, W in [0, 1])."""
    controlled = _controlled_conv_in(unet)
    controlled.control = control
    try:
        yield
    finally:
        controlled.control = None


# ------------------------------------------------------------------------------------------- files
def save_control_encoder(encoder, output_dir, conditioning: str = ADE20K_CONDITIONING) -> Path:
    """`control_encoder.safetensors` (float32) + `control_encoder.json` (its channels and VAE factor, and
    what it reads unless ADE20K maps: `IMAGE_CONDITIONING` for ControlNet-style data)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in encoder.state_dict().items()}
    recorded = {} if conditioning == ADE20K_CONDITIONING else {"conditioning": conditioning}  # ADE20K runs' as before
    config_data = {**encoder_config(encoder), **recorded}
    # Each file whole or not at all (temp file + rename): a full disk never leaves a half-written encoder.
    weights, config = output_dir / ENCODER_WEIGHTS, output_dir / ENCODER_CONFIG
    save_file(state, f"{weights}.tmp")
    Path(f"{config}.tmp").write_text(json.dumps(config_data, indent=2) + "\n")
    os.replace(f"{weights}.tmp", weights)
    os.replace(f"{config}.tmp", config)
    return weights


def control_conditioning(output_dir) -> str:
    """What the encoder saved in `output_dir` reads: `ADE20K_CONDITIONING` (palette-coloured maps; also for
    folders written before this was recorded, or unreadable ones, which `load_control_encoder` reports) or
    `IMAGE_CONDITIONING` (any conditioning picture: ControlNet-style data)."""
    try:
        return json.loads(Path(output_dir, ENCODER_CONFIG).read_text()).get("conditioning", ADE20K_CONDITIONING)
    except (OSError, ValueError, AttributeError):
        return ADE20K_CONDITIONING


def load_control_encoder(output_dir):
    """The encoder saved by `save_control_encoder` in `output_dir`; a UserError names a missing or
    mismatched file."""
    from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding  # see make_control_encoder

    output_dir = Path(output_dir)
    weights, config_file = output_dir / ENCODER_WEIGHTS, output_dir / ENCODER_CONFIG
    for path in (weights, config_file):
        if not path.is_file():
            raise UserError(f"{path} does not exist (not an S2I output folder?)")
    try:
        config = json.loads(config_file.read_text())
        encoder = ControlNetConditioningEmbedding(
            conditioning_embedding_channels=int(config["conditioning_embedding_channels"]),
            conditioning_channels=int(config["conditioning_channels"]),
            block_out_channels=tuple(int(c) for c in config["block_out_channels"]),
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{config_file}: not a control encoder config ({type(e).__name__}: {e})") from None
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{weights}: cannot read ({e})") from None
    expected = encoder.state_dict()
    problems = sorted(set(expected) ^ set(state)) or [k for k in expected if expected[k].shape != state[k].shape]
    if problems:
        raise UserError(f"{weights} does not match {config_file} (first mismatched tensor: {problems[0]})")
    encoder.load_state_dict(state)
    return encoder


# ------------------------------------------------------------------------------------------- pipeline
def control_tensor(images, height: int, width: int) -> torch.Tensor:
    """PIL map(s) -> (B, 3, height, width) in [0, 1]; nearest resize keeps palette colours exact."""
    images = [images] if isinstance(images, Image.Image) else list(images)
    return torch.stack([TF.to_tensor(im.convert("RGB").resize((width, height), Image.NEAREST)) for im in images])


class S2IPipeline:
    """Prompt + coloured semantic map -> image: a stock `StableDiffusionPipeline` whose UNet carries the
    control encoder. Classifier-free guidance sees the map in both halves (see `ControlledConvIn`).

    `encoder=None` uses the one already attached to `pipe.unet` (a trainer's validation, say)."""

    def __init__(self, pipe, encoder=None):
        self.pipe = pipe
        if encoder is not None:
            attach_control_encoder(pipe.unet, encoder.to(pipe.device))
        self.encoder = _controlled_conv_in(pipe.unet).encoder
        factor = encoder_config(self.encoder)["vae_scale_factor"]
        if factor != pipe.vae_scale_factor:
            raise UserError(f"the control encoder downsamples by {factor}, the model's VAE by {pipe.vae_scale_factor}")

    @classmethod
    def from_output(cls, model, output_dir, device="cpu", torch_dtype=torch.float32):
        """Base model (hub id, folder or `builtin:` model) + the control encoder and `adapter.safetensors`
        from one training output folder (or checkpoint). A folder without an adapter file is an encoder-only
        run (`train_controlnet_s2i.py --method none`): the UNet stays as it is."""
        encoder = load_control_encoder(output_dir)  # first: its errors are cheaper than loading the model
        adapter = Path(output_dir) / ADAPTER_FILE
        pipe = load_pipeline(model, adapter=adapter if adapter.is_file() else None, device=device,
                             torch_dtype=torch_dtype)
        return cls(pipe, encoder.to(device=device, dtype=torch_dtype))

    @torch.no_grad()
    def __call__(self, prompt, control_image, num_inference_steps=50, guidance_scale=7.5, generator=None,
                 height=None, width=None, negative_prompt=None, num_images_per_prompt=1):
        """`prompt`: str or list; `control_image`: one PIL map for all prompts or one per prompt.
        Returns a list of PIL images, prompt-major (all images of prompt 0 first)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        unet = self.pipe.unet
        height = height or unet.config.sample_size * self.pipe.vae_scale_factor
        width = width or unet.config.sample_size * self.pipe.vae_scale_factor
        control = control_tensor(control_image, height, width)
        if len(control) == 1:
            control = control.repeat(len(prompts), 1, 1, 1)
        if len(control) != len(prompts):
            raise UserError(f"{len(control)} control images for {len(prompts)} prompts")
        # The pipeline orders latents prompt-major (p0, p0, p1, p1, ...); ControlledConvIn tiles for CFG.
        control = control.repeat_interleave(num_images_per_prompt, dim=0).to(self.pipe.device)
        with use_control(unet, control):
            return self.pipe(prompt=prompts, negative_prompt=negative_prompt, height=height, width=width,
                             num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                             generator=generator, num_images_per_prompt=num_images_per_prompt).images
