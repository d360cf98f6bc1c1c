"""Adapter files: round trip, every mismatch named, loading into stock diffusers, merged export."""
import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ether_diffusion import AdapterConfig, inject_adapters, load_adapter, merge_adapters, save_adapter
from ether_diffusion.adapters import METHODS, adapter_parameters
from ether_diffusion.errors import UserError
from ether_diffusion.pipelines import load_pipeline


def _trained(unet, method, n=2, seed=0):
    inject_adapters(unet, AdapterConfig(method=method, n_blocks=n))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(unet):
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return unet


@pytest.mark.parametrize("method", METHODS)
def test_save_then_load_into_fresh_unet_reproduces_outputs(tiny_unet, unet_inputs, tmp_path, method):
    fresh = copy.deepcopy(tiny_unet)
    _trained(tiny_unet, method)
    path = save_adapter(tiny_unet, tmp_path / "adapter.safetensors", extra_metadata={"instance_prompt": "a qwe dog"})
    meta = load_adapter(fresh, path)
    with torch.no_grad():
        assert torch.equal(tiny_unet(*unet_inputs).sample, fresh(*unet_inputs).sample)
    assert meta["method"] == method and meta["instance_prompt"] == "a qwe dog"
    assert not list(tmp_path.glob("*.tmp"))


def test_header_describes_the_adapter(tiny_unet, tmp_path):
    _trained(tiny_unet, "ether+", n=4)
    path = save_adapter(tiny_unet, tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["format"] == "ether-diffusion-adapter" and meta["format_version"] == "1"
    assert meta["method"] == "ether+" and meta["n_blocks"] == "4"
    assert json.loads(meta["target_modules"]) == ["to_q", "to_k", "to_v", "to_out.0"]
    shapes = json.loads(meta["shapes"])
    assert set(shapes) == set(keys) and len(keys) == 32 * 4
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert shapes[f"{q}.ether_u"] == [4, 8] and shapes[f"{q}.ether_u_out"] == [4, 8]


@pytest.fixture
def saved_ether(tiny_unet, tmp_path):
    fresh = copy.deepcopy(tiny_unet)
    _trained(tiny_unet, "ether", n=2)
    return fresh, save_adapter(tiny_unet, tmp_path / "ether.safetensors")


def test_wrong_method_is_named(saved_ether):
    fresh, path = saved_ether
    with pytest.raises(UserError, match=r"method='ether' but the model/config expects method='ether\+'"):
        load_adapter(fresh, path, config=AdapterConfig(method="ether+", n_blocks=2))
    inject_adapters(fresh, AdapterConfig(method="oft", n_blocks=2))
    with pytest.raises(UserError, match="method='ether' but the model/config expects method='oft'"):
        load_adapter(fresh, path)


def test_wrong_n_is_named(saved_ether):
    fresh, path = saved_ether
    with pytest.raises(UserError, match="n_blocks=2 but the model/config expects n_blocks=4"):
        load_adapter(fresh, path, config=AdapterConfig(method="ether", n_blocks=4))


def test_missing_target_is_named(saved_ether, tmp_path):
    from diffusers import UNet2DConditionModel

    _, path = saved_ether
    # A UNet without the cross-attention block of level 0: the file's layers for it do not exist there.
    other = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4, norm_num_groups=8,
    )
    with pytest.raises(UserError, match=r"tensor down_blocks\.0\.attentions\.0\..* has no layer in this model"):
        load_adapter(other, path)


def test_shape_difference_is_named(saved_ether, tmp_path):
    fresh, path = saved_ether
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    key = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.ether_u"
    state[key] = torch.randn(2, 8)
    shapes = json.loads(meta["shapes"])
    shapes[key] = [2, 8]
    meta["shapes"] = json.dumps(shapes)
    bad = tmp_path / "bad_shape.safetensors"
    save_file(state, str(bad), metadata=meta)
    with pytest.raises(UserError, match=rf"{key} has shape \(2, 8\) in the file but \(2, 16\) in the model"):
        load_adapter(fresh, bad)


def test_not_an_adapter_file(tiny_unet, tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, not a tensor file")
    with pytest.raises(UserError, match="notes.safetensors is not a safetensors file"):
        load_adapter(tiny_unet, text)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(UserError, match="plain.safetensors is a safetensors file but not an ether-diffusion adapter"):
        load_adapter(tiny_unet, plain)
    with pytest.raises(UserError, match="adapter file not found: .*missing.safetensors"):
        load_adapter(tiny_unet, tmp_path / "missing.safetensors")


def test_save_without_adapters_is_an_error(tiny_unet, tmp_path):
    with pytest.raises(UserError, match="no adapters to save"):
        save_adapter(tiny_unet, tmp_path / "x.safetensors")


def test_stock_pipeline_loads_adapter_and_merged_export_is_plain_diffusers(tiny_sd_path, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    _trained(unet, "ether+", n=2)
    adapter = save_adapter(unet, tmp_path / "adapter.safetensors")

    def sample(pipe):
        return pipe("a qwe dog", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images

    base = load_pipeline("builtin:tiny-sd")
    with_adapter = load_pipeline("builtin:tiny-sd", adapter=adapter)
    assert isinstance(with_adapter, StableDiffusionPipeline)
    images = sample(with_adapter)
    assert abs(images - sample(base)).max() > 1e-3  # the adapter changes what is generated

    merge_adapters(with_adapter.unet)
    with_adapter.save_pretrained(tmp_path / "merged")
    plain = StableDiffusionPipeline.from_pretrained(tmp_path / "merged")  # stock diffusers, no ether_diffusion
    plain.set_progress_bar_config(disable=True)
    assert abs(sample(plain) - images).max() < 1e-3
