import json

import numpy as np
import pytest
import torch
from PIL import Image

from ether_diffusion import AdapterConfig, inject_adapters, save_adapter
from ether_diffusion.ade20k import colorize
from ether_diffusion.control import (ENCODER_CONFIG, ENCODER_WEIGHTS, ControlledConvIn, S2IPipeline,
                                     attach_control_encoder, detach_control_encoder, load_control_encoder,
                                     make_control_encoder, save_control_encoder, use_control)
from ether_diffusion.grids import control_grid
from ether_diffusion.pipelines import load_pipeline
from ether_diffusion.tiny_sd import build_sd15_unet
from user_errors import refused

API = "Python API (ether_diffusion.control)"
CONTROL = "evaluate/s2i.py --control_dir, S2IPipeline.from_output"

TINY_FACTOR = 4  # tiny SD: 32 px images, 8x8 latents


def _perturb(encoder, seed=0):
    """Give the zero-initialised last conv some weight, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        encoder.conv_out.weight.copy_(torch.randn(encoder.conv_out.weight.shape, generator=g) * 0.1)
    return encoder


def _control(batch, size=32, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _maps(n, size=32, seed=0):
    """n coloured ADE20K maps with a few blocky classes each."""
    rng = np.random.default_rng(seed)
    maps = []
    for _ in range(n):
        labels = rng.choice([1, 3, 4, 8, 13], size=(4, 4)).astype(np.uint8).repeat(size // 4, 0).repeat(size // 4, 1)
        maps.append(Image.fromarray(colorize(labels)))
    return maps


# ------------------------------------------------------------------------------------------ encoder
def test_sd15_encoder_is_controlnets_block():
    unet = build_sd15_unet()  # meta device: only shapes are read
    encoder = make_control_encoder(unet, scale_factor=8)
    convs = [encoder.conv_in, *encoder.blocks, encoder.conv_out]
    assert len(convs) == 8 and all(c.kernel_size == (3, 3) for c in convs)  # "eight 3x3 convs to 320 channels"
    assert [c.stride[0] for c in convs].count(2) == 3
    assert encoder.conv_out.out_channels == 320 and encoder.conv_in.out_channels == 16
    assert torch.count_nonzero(encoder.conv_out.weight) == 0 and torch.count_nonzero(encoder.conv_out.bias) == 0
    out = _perturb(encoder)(torch.rand(1, 3, 64, 64))
    assert out.shape == (1, 320, 8, 8)  # 512 px -> 64x64 latents, scaled down


@pytest.mark.user_error("a model whose VAE factor is not a power of 2, or encoder blocks that do not match it",
                        tool=API)
def test_encoder_downsampling_follows_the_vae_factor(tiny_unet):
    encoder = make_control_encoder(tiny_unet, scale_factor=TINY_FACTOR)
    assert [c.stride[0] for c in encoder.blocks].count(2) == 2
    assert encoder(torch.rand(2, 3, 32, 32)).shape == (2, 32, 8, 8)
    with refused("VAE scale factor 6"):
        make_control_encoder(tiny_unet, scale_factor=6)
    with refused(r"downsample by 8, the VAE by 4"):
        make_control_encoder(tiny_unet, scale_factor=4, block_out_channels=(8, 8, 8, 8))


def test_step_zero_equals_the_base_unet(tiny_unet, unet_inputs):
    with torch.no_grad():
        base = tiny_unet(*unet_inputs).sample
    encoder = make_control_encoder(tiny_unet, TINY_FACTOR)
    attach_control_encoder(tiny_unet, encoder)
    with use_control(tiny_unet, _control(2)):
        controlled = tiny_unet(*unet_inputs).sample
    assert torch.equal(controlled, base)
    # the zero conv still learns: its gradient is non-zero, and once it moves the map matters
    controlled.square().mean().backward()
    assert encoder.conv_out.weight.grad.abs().sum() > 0
    _perturb(encoder)
    with torch.no_grad(), use_control(tiny_unet, _control(2, seed=1)):
        moved = tiny_unet(*unet_inputs).sample
    assert (moved - base).abs().max() > 1e-3


def test_control_is_tiled_over_the_cfg_batch(tiny_unet):
    encoder = _perturb(make_control_encoder(tiny_unet, TINY_FACTOR))
    conv_in = tiny_unet.conv_in
    controlled = ControlledConvIn(conv_in, encoder)
    latents, control = torch.randn(4, 4, 8, 8), _control(2)
    controlled.control = control
    with torch.no_grad():
        out = controlled(latents)
        expected = conv_in(latents) + torch.cat([encoder(control)] * 2)
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="latent batch 3 is not a multiple of the control batch 2"):
        controlled(torch.randn(3, 4, 8, 8))
    controlled.control = _control(2, size=64)
    with pytest.raises(ValueError, match=r"encodes to \(16, 16\) but the latents are \(8, 8\)"):
        controlled(latents)
    controlled.control = None
    with pytest.raises(RuntimeError, match="no control image"):
        controlled(latents)


@pytest.mark.user_error("attaching a second control encoder, or one of another width", tool=API)
def test_attach_and_detach(tiny_unet, unet_inputs):
    conv_in = tiny_unet.conv_in
    encoder = make_control_encoder(tiny_unet, TINY_FACTOR)
    attach_control_encoder(tiny_unet, encoder)
    assert tiny_unet.conv_in.encoder is encoder
    assert any(p is encoder.conv_out.weight for p in tiny_unet.parameters())  # moves and syncs with the UNet
    with refused("already has a control encoder"):
        attach_control_encoder(tiny_unet, encoder)
    with use_control(tiny_unet, _control(2)):
        pass
    assert tiny_unet.conv_in.control is None  # the control does not outlive the block
    assert detach_control_encoder(tiny_unet) is encoder and tiny_unet.conv_in is conv_in
    wrong = make_control_encoder(build_sd15_unet(), 4)  # 320 channels for a 32-channel conv_in
    with refused("outputs 320 channels, the UNet's conv_in 32"):
        attach_control_encoder(tiny_unet, wrong)


def test_adapter_injection_leaves_the_encoder_out(tiny_unet):
    inject_adapters(tiny_unet, AdapterConfig(method="ether", n_blocks=4, target_modules=["to_q", "ff.net.0.proj"]))
    encoder = make_control_encoder(tiny_unet, TINY_FACTOR)
    attach_control_encoder(tiny_unet, encoder)
    trainable = {n for n, p in tiny_unet.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.startswith("conv_in.encoder.")} == {f"conv_in.encoder.{n}" for n, _ in encoder.named_parameters()}
    assert all(n.startswith("conv_in.encoder.") or "ether_" in n for n in trainable)


# ------------------------------------------------------------------------------------------ files
def test_save_and_load_encoder(tiny_unet, tmp_path):
    encoder = _perturb(make_control_encoder(tiny_unet, TINY_FACTOR))
    save_control_encoder(encoder, tmp_path)
    config = json.loads((tmp_path / ENCODER_CONFIG).read_text())
    assert config == {"conditioning_embedding_channels": 32, "conditioning_channels": 3,
                      "block_out_channels": [16, 32, 96], "vae_scale_factor": 4}
    loaded = load_control_encoder(tmp_path)
    for (name, a), (_, b) in zip(encoder.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.user_error("a control folder without the encoder, a config not matching its weights, or a broken config",
                        tool=CONTROL)
def test_load_encoder_errors(tiny_unet, tmp_path):
    with refused(f"{ENCODER_WEIGHTS} does not exist"):
        load_control_encoder(tmp_path)
    save_control_encoder(make_control_encoder(tiny_unet, TINY_FACTOR), tmp_path)
    config = json.loads((tmp_path / ENCODER_CONFIG).read_text())
    (tmp_path / ENCODER_CONFIG).write_text(json.dumps({**config, "block_out_channels": [16, 32, 64]}))
    with refused(f"{ENCODER_WEIGHTS} does not match .*{ENCODER_CONFIG}"):
        load_control_encoder(tmp_path)
    (tmp_path / ENCODER_CONFIG).write_text("{oops")
    with refused(f"{ENCODER_CONFIG}: not a control encoder config"):
        load_control_encoder(tmp_path)


# ------------------------------------------------------------------------------------------ pipeline
def _images(pipe, **kwargs):
    kwargs = {"num_inference_steps": 2, "generator": torch.Generator().manual_seed(0), **kwargs}
    out = pipe(**kwargs)
    return np.stack([np.asarray(im) for im in getattr(out, "images", out)])  # a StableDiffusionPipelineOutput or a list


def test_pipeline_at_step_zero_matches_stable_diffusion():
    pipe = load_pipeline("builtin:tiny-sd")
    plain = _images(pipe, prompt=["a bedroom", "a street"], guidance_scale=5.0)
    s2i = S2IPipeline(pipe, make_control_encoder(pipe.unet, pipe.vae_scale_factor))
    controlled = _images(s2i, prompt=["a bedroom", "a street"], control_image=_maps(2), guidance_scale=5.0)
    assert np.array_equal(plain, controlled)


@pytest.mark.user_error("S2IPipeline with more control images than prompts", tool=API)
def test_pipeline_cfg_sees_the_map_in_both_halves():
    pipe = load_pipeline("builtin:tiny-sd")
    s2i = S2IPipeline(pipe, _perturb(make_control_encoder(pipe.unet, pipe.vae_scale_factor)))
    added = []

    def record(module, inputs, output):
        added.append(output - module.conv_in(inputs[0]))
    hook = pipe.unet.conv_in.register_forward_hook(record)
    maps = _maps(2)
    images = _images(s2i, prompt=["a bedroom", "a street"], control_image=maps, guidance_scale=5.0,
                     num_images_per_prompt=2)
    hook.remove()
    assert images.shape == (4, 32, 32, 3)
    emb = added[0]
    assert emb.shape[0] == 8  # [uncond; cond] x 2 prompts x 2 images
    torch.testing.assert_close(emb[:4], emb[4:])  # both CFG halves see the same maps
    torch.testing.assert_close(emb[0], emb[1])  # prompt 0's two images share map 0 ...
    assert (emb[1] - emb[2]).abs().max() > 1e-4  # ... and prompt 1 has its own
    other = _images(s2i, prompt=["a bedroom", "a street"], control_image=maps[::-1], guidance_scale=5.0,
                    num_images_per_prompt=2)
    assert not np.array_equal(images, other)  # the map changes the picture
    with refused("3 control images for 2 prompts"):
        s2i(prompt=["a", "b"], control_image=_maps(3), num_inference_steps=1)


def test_pipeline_from_output_folder(tmp_path):
    pipe = load_pipeline("builtin:tiny-sd")
    inject_adapters(pipe.unet, AdapterConfig(method="ether+", n_blocks=4, target_modules=["to_q", "to_v", "ff.net.0.proj"]))
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "ether_" in name:
                p.add_(torch.randn_like(p) * 0.3)
    save_adapter(pipe.unet, tmp_path / "adapter.safetensors")
    encoder = _perturb(make_control_encoder(pipe.unet, pipe.vae_scale_factor))
    save_control_encoder(encoder, tmp_path)
    in_memory = _images(S2IPipeline(pipe, encoder), prompt="a bedroom", control_image=_maps(1)[0])

    loaded = S2IPipeline.from_output("builtin:tiny-sd", tmp_path)
    assert np.array_equal(_images(loaded, prompt="a bedroom", control_image=_maps(1)[0]), in_memory)
    grid = control_grid(_maps(1), [Image.fromarray(in_memory[0])])
    assert grid.size == (64, 32)
    assert np.array_equal(np.asarray(grid)[:, :32], np.asarray(_maps(1)[0]))  # map | generated
    assert np.array_equal(np.asarray(grid)[:, 32:], in_memory[0])
    (tmp_path / ENCODER_WEIGHTS).unlink()
    with refused(f"{ENCODER_WEIGHTS} does not exist"):
        S2IPipeline.from_output("builtin:tiny-sd", tmp_path)
