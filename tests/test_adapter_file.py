"""Adapter files: round trip, every mismatch named, loading into stock diffusers, merged export."""
import copy
import functools
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ether_diffusion import AdapterConfig, inject_adapters, load_adapter, merge_adapters, save_adapter
from ether_diffusion.adapters import METHODS, adapter_parameters, adapter_state_dict
from ether_diffusion.pipelines import load_pipeline
from user_errors import case, refused

API = "Python API (load_adapter/save_adapter)"


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


@pytest.mark.user_error("loading an adapter into a model/config of another method", tool=API)
def test_wrong_method_is_named(saved_ether):
    fresh, path = saved_ether
    with refused(r"method='ether' but the model/config expects method='ether\+'"):
        load_adapter(fresh, path, config=AdapterConfig(method="ether+", n_blocks=2))
    inject_adapters(fresh, AdapterConfig(method="oft", n_blocks=2))
    with refused("method='ether' but the model/config expects method='oft'"):
        load_adapter(fresh, path)


@pytest.mark.user_error("loading an adapter with another n_blocks than the config's", tool=API)
def test_wrong_n_is_named(saved_ether):
    fresh, path = saved_ether
    with refused("n_blocks=2 but the model/config expects n_blocks=4"):
        load_adapter(fresh, path, config=AdapterConfig(method="ether", n_blocks=4))


@pytest.mark.user_error("load_adapter(config=...) naming the target layers in another order", tool=API)
def test_target_modules_in_another_order_are_the_same_adapter(saved_ether):
    fresh, path = saved_ether
    targets = AdapterConfig().target_modules
    load_adapter(fresh, path, config=AdapterConfig(method="ether", n_blocks=2, target_modules=targets[::-1]))
    with refused("target_modules=.* but the model/config expects target_modules=.*'to_q'.*"):
        load_adapter(copy.deepcopy(fresh), path, config=AdapterConfig(method="ether", n_blocks=2, target_modules=["to_q"]))


@pytest.mark.user_error("loading an adapter into a UNet that lacks its layers", tool=API)
def test_missing_target_is_named(saved_ether, tmp_path):
    from diffusers import UNet2DConditionModel

    _, path = saved_ether
    # A UNet without the cross-attention block of level 0: the file's layers for it do not exist there.
    other = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4, norm_num_groups=8,
    )
    with refused(r"tensor down_blocks\.0\.attentions\.0\..* has no layer in this model"):
        load_adapter(other, path)


@pytest.mark.user_error("an adapter whose header shapes differ from the model's layers", tool=API)
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
    with refused(rf"{key} has shape \(2, 8\) in the file but \(2, 16\) in the model"):
        load_adapter(fresh, bad)


@pytest.mark.user_error("a text file, a plain safetensors file, or a missing file given as the adapter", tool=API)
def test_not_an_adapter_file(tiny_unet, tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, not a tensor file")
    with refused("notes.safetensors is not a safetensors file"):
        load_adapter(tiny_unet, text)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with refused("plain.safetensors is a safetensors file but not an ether-diffusion adapter"):
        load_adapter(tiny_unet, plain)
    with refused("adapter file not found: .*missing.safetensors"):
        load_adapter(tiny_unet, tmp_path / "missing.safetensors")


@pytest.mark.user_error("save_adapter on a model without adapters", tool=API)
def test_save_without_adapters_is_an_error(tiny_unet, tmp_path):
    with refused("no adapters to save"):
        save_adapter(tiny_unet, tmp_path / "x.safetensors")


def rewritten(path, out, meta=None, tensors=None):
    """A copy of the adapter file `path` at `out`, with header entries and tensors replaced (None: removed)."""
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    for updates, target in ((meta or {}, header), (tensors or {}, state)):
        for key, value in updates.items():
            if value is None:
                target.pop(key)
            else:
                target[key] = value
    save_file(state, str(out), metadata=header)
    return out


Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.ether_u"  # shape (2, 16) with n_blocks=2


def nan_at_one(tensor):
    tensor = tensor.clone()
    tensor.view(-1)[1] = float("nan")
    return tensor


damage = functools.partial(case, tool=API)


@pytest.mark.parametrize("meta, tensors, message", [
    damage({}, {Q: "nan"}, rf"tensor {Q} has 1 NaN/inf values \(of 32\): the training that wrote it diverged",
           "an adapter file with NaN values (a diverged run)"),
    damage({}, {Q: "inf"}, rf"tensor {Q} has 32 NaN/inf values", "an adapter file with infinite values"),
    damage({"shapes": None}, {}, "the adapter header has no 'shapes' entry", "an adapter header without 'shapes'"),
    damage({"n_blocks": "two"}, {}, "the adapter header has n_blocks='two', not an integer",
           'an adapter header with n_blocks="two"'),
    damage({"method": "dora"}, {}, "adapter header: unknown method 'dora'", "an adapter header with an unknown method"),
    damage({"alpha": "NaN"}, {}, "adapter header: alpha must be a positive number", "an adapter header with alpha NaN"),
    damage({"target_modules": "to_q"}, {}, "the adapter header has target_modules='to_q', not a JSON list",
           "an adapter header whose target_modules is not JSON"),
    damage({"shapes": "[1, 2]"}, {}, "the adapter header's 'shapes' is not a map of tensor names to shapes",
           "an adapter header whose 'shapes' is not a map"),
    damage({}, {Q: "wrong shape"}, rf"tensor {Q} has shape \(1, 16\) but its header says \(2, 16\)",
           "an adapter tensor whose shape differs from its header's (was broadcast)"),
    damage({}, {Q: None}, rf"tensor {Q} is in the header but not in the file",
           "an adapter file missing a tensor its header lists"),
])
def test_damaged_adapter_files_are_refused_before_any_weight_changes(saved_ether, tmp_path, meta, tensors, message):
    fresh, path = saved_ether
    with safe_open(str(path), framework="pt") as f:
        good = f.get_tensor(Q)
    replace = {"nan": nan_at_one(good), "inf": torch.full_like(good, float("inf")), "wrong shape": good[:1].clone()}
    bad = rewritten(path, tmp_path / "bad.safetensors", meta, {k: replace.get(v, v) for k, v in tensors.items()})
    inject_adapters(fresh, AdapterConfig(method="ether", n_blocks=2))
    before = {k: v.clone() for k, v in adapter_state_dict(fresh).items()}
    with refused(f"{bad}: .*{message}"):
        load_adapter(fresh, bad)
    assert all(torch.equal(before[k], v) for k, v in adapter_state_dict(fresh).items())  # nothing half-loaded


@pytest.mark.user_error("a truncated adapter file (a copy cut short)", tool=API)
def test_a_truncated_adapter_file_is_named(saved_ether, tmp_path):
    fresh, path = saved_ether
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-100])
    with refused(f"{cut} is not a safetensors file .*file not fully covered"):
        load_adapter(fresh, cut)


@pytest.mark.user_error("save_adapter to a folder path", tool=API)
def test_saving_to_a_folder_is_refused_and_leaves_nothing(saved_ether, tmp_path):
    fresh, _ = saved_ether
    _trained(fresh, "ether")
    folder = tmp_path / "ad"
    folder.mkdir()
    with refused(f"{folder} is a folder; give the adapter a file name such as {folder / 'adapter.safetensors'}"):
        save_adapter(fresh, folder)
    assert list(tmp_path.glob("*.tmp")) == [] and list(folder.iterdir()) == []


@pytest.mark.user_error("save_adapter below a path that is a file", tool=API)
def test_saving_below_a_file_is_refused(saved_ether, tmp_path):
    fresh, _ = saved_ether
    _trained(fresh, "ether")
    (tmp_path / "notes").write_text("x")
    with refused(f"{tmp_path / 'notes'} is a file, not a folder"):
        save_adapter(fresh, tmp_path / "notes" / "adapter.safetensors")


def test_a_failed_write_leaves_no_temporary_file(saved_ether, tmp_path, monkeypatch):
    import ether_diffusion.adapter_file as adapter_file

    fresh, _ = saved_ether
    _trained(fresh, "ether")

    def half_write(state, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise OSError("the write failed")

    monkeypatch.setattr(adapter_file, "save_file", half_write)
    with pytest.raises(OSError, match="the write failed"):
        save_adapter(fresh, tmp_path / "out" / "a.safetensors")
    assert list((tmp_path / "out").iterdir()) == []


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
