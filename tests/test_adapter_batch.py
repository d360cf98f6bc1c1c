"""Several adapters in one batch (`ether_diffusion.adapter_batch`): each sample gets what its adapter alone gives."""
import copy

import pytest
import torch

from ether_diffusion import AdapterConfig, inject_adapters, save_adapter
from ether_diffusion.adapter_batch import adapter_batch_of, generate, load_adapters
from ether_diffusion.adapters import adapter_state_dict
from ether_diffusion.errors import UserError
from ether_diffusion.pipelines import apply_adapter, load_pipeline
from user_errors import refused

TINY = "builtin:tiny-sd"
PROMPTS = ["a photo of qwe toy", "a qwe toy on the beach", "a red qwe toy"]
SETTINGS = dict(num_inference_steps=2, output_type="latent")


pytestmark = pytest.mark.usefixtures("one_thread")


def trained_adapter(unet, path, seed, **config):
    """An adapter file whose every tensor is moved away from its start (as training would), differently per seed."""
    unet = copy.deepcopy(unet)
    inject_adapters(unet, AdapterConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_state_dict(unet).values():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return save_adapter(unet, path)


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


def alone(pipe, adapter, prompt, seed, images, **kwargs):
    """What the adapter alone gives: `pipe` with only this adapter (the evaluator's `apply_adapter`)."""
    apply_adapter(pipe, adapter)
    return pipe(prompt, num_images_per_prompt=images, generator=torch.Generator("cpu").manual_seed(seed),
                **SETTINGS, **kwargs).images


CONFIGS = [
    dict(method="ether", n_blocks=1), dict(method="ether", n_blocks=4), dict(method="ether+", n_blocks=1),
    dict(method="ether+", n_blocks=4), dict(method="ether+", n_blocks=8, target_modules=["to_q", "to_v", "ff.net.0.proj"]),
    dict(method="lora", rank=4, alpha=8), dict(method="hra", rank=4), dict(method="oft", n_blocks=4),
    dict(method="naive", n_blocks=4),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c['method']}-{c.get('n_blocks', c.get('rank'))}")
def test_each_sample_gets_what_its_adapter_alone_gives(config, tiny_unet, tmp_path):
    files = {name: trained_adapter(tiny_unet, tmp_path / f"{name}.safetensors", seed, **config)
             for seed, name in enumerate(["dog", "cat", "duck"])}
    names, seeds = ["cat", "dog", "cat"], [3, 3, 11]  # an adapter twice, a seed twice, one adapter unused
    batch = generate(load_pipeline(TINY, adapters=files), PROMPTS, names, seeds, num_images_per_prompt=2, **SETTINGS).images

    single = load_pipeline(TINY)
    for i, (prompt, name, seed) in enumerate(zip(PROMPTS, names, seeds)):
        reference = alone(single, files[name], prompt, seed, 2)
        assert relative_error(batch[2 * i:2 * i + 2], reference) < 1e-4, (name, prompt)
    # and the adapters do differ: the same prompt and seed through another adapter is far away
    assert relative_error(alone(single, files["dog"], PROMPTS[0], 3, 2), batch[0:2]) > 1e-2


def test_without_guidance_the_batch_is_the_route(tiny_unet, tmp_path):
    files = {name: trained_adapter(tiny_unet, tmp_path / f"{name}.safetensors", seed, method="ether+")
             for seed, name in enumerate(["dog", "cat"])}
    pipe = load_pipeline(TINY, adapters=files)
    batch = generate(pipe, PROMPTS[:2], ["dog", "cat"], [5, 5], guidance_scale=1.0, **SETTINGS).images
    single = load_pipeline(TINY)
    for i, name in enumerate(["dog", "cat"]):
        assert relative_error(batch[i:i + 1], alone(single, files[name], PROMPTS[i], 5, 1, guidance_scale=1.0)) < 1e-4


def test_reloading_replaces_the_adapters_and_the_layers_come_back(tiny_unet, tmp_path):
    files = {name: trained_adapter(tiny_unet, tmp_path / f"{name}.safetensors", seed, method="ether")
             for seed, name in enumerate(["dog", "cat"])}
    pipe = load_pipeline(TINY, adapters=files)
    load_adapters(pipe.unet, {"cat": files["cat"]})
    assert adapter_batch_of(pipe.unet).names == ["cat"]
    with pytest.raises(UserError, match="no adapter named 'dog' is loaded"):
        generate(pipe, PROMPTS[:1], ["dog"], [0], **SETTINGS)
    from ether_diffusion.adapter_batch import unload_adapters

    unload_adapters(pipe.unet)
    assert adapter_batch_of(pipe.unet) is None
    assert all(type(m).__name__ != "MixedAdapterLinear" for m in pipe.unet.modules())


@pytest.mark.user_error("adapters that cannot share a batch: another method, n_blocks, target layers or base model, "
                        "or a LoRA file", tool="Python API (load_pipeline(adapters=))")
def test_adapters_that_cannot_share_a_batch_are_refused_naming_the_file(tiny_unet, tmp_path):
    dog = trained_adapter(tiny_unet, tmp_path / "dog.safetensors", 0, method="ether+")
    pipe = load_pipeline(TINY)

    def refuses(other, message):
        with refused() as e:
            load_adapters(pipe.unet, {"dog": dog, "other": other})
        assert str(e.value).startswith(f"{other}: ") and message in str(e.value)
        assert adapter_batch_of(pipe.unet) is None and not hasattr(pipe.unet, "ether_adapter_config")

    refuses(trained_adapter(tiny_unet, tmp_path / "lora.safetensors", 1, method="lora"),
            f"adapter has method='lora' but {dog} has method='ether+'")
    refuses(trained_adapter(tiny_unet, tmp_path / "n2.safetensors", 1, method="ether+", n_blocks=2),
            "adapter has n_blocks=2")
    refuses(trained_adapter(tiny_unet, tmp_path / "q.safetensors", 1, method="ether+", target_modules=["to_q"]),
            "adapter has target_modules=['to_q']")
    # another base model: the same layers with other widths
    from diffusers import UNet2DConditionModel

    other_model = UNet2DConditionModel.from_config({**tiny_unet.config, "cross_attention_dim": 16})
    refuses(trained_adapter(other_model, tmp_path / "other-model.safetensors", 1, method="ether+"), "shape")
    # a LoRA file exported from an adapter loads alone (adapter=), not in a batch
    lora_file = tmp_path / "exported.safetensors"
    from safetensors.torch import save_file

    save_file({"unet.x.lora_A.weight": torch.zeros(1, 1)}, str(lora_file))
    refuses(lora_file, "must be ether-diffusion adapter files")
    # the pipeline still works with good adapters afterwards
    load_adapters(pipe.unet, {"dog": dog})
    assert adapter_batch_of(pipe.unet).names == ["dog"]


def test_load_pipeline_keeps_one_adapter_or_several():
    with pytest.raises(UserError, match="not with adapter= or merge=True"):
        load_pipeline(TINY, adapter="a.safetensors", adapters={"b": "b.safetensors"})
