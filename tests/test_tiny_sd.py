"""The tiny offline SD: a normal diffusers folder, SD's module names, SD-1.5's token ids."""
import json
import shutil

import pytest
import torch

from ether_diffusion.builtin import TINY_SD, resolve_model_path
from ether_diffusion.tiny_sd import build_tiny_sd
from user_errors import refused

TOOLS = "every --pretrained_model_name_or_path / --model"


def test_builtin_name_resolves_to_a_diffusers_folder(tiny_sd_path):
    assert resolve_model_path(TINY_SD) == tiny_sd_path
    index = json.loads((__import__("pathlib").Path(tiny_sd_path) / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert resolve_model_path("runwayml/stable-diffusion-v1-5") == "runwayml/stable-diffusion-v1-5"
    assert resolve_model_path(tiny_sd_path) == tiny_sd_path


@pytest.mark.user_error("a model folder that does not exist, or a file given as the model", tool=TOOLS)
def test_missing_model_folder_is_named(tmp_path):
    with refused("model folder not found: .*/no-model"):
        resolve_model_path(str(tmp_path / "no-model"))
    (tmp_path / "model.ckpt").write_text("not a folder")
    with refused("model.ckpt is a file, not a diffusers model folder"):
        resolve_model_path(str(tmp_path / "model.ckpt"))


def test_tokenizer_ids_match_sd15(tiny_sd_path):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_sd_path, subfolder="tokenizer")
    # Ids of SD-1.5's tokenizer (openai/clip-vit-large-patch14) for these words.
    assert tok("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok("a dog", padding="max_length").input_ids[-1] == 49407  # SD pads with <|endoftext|>


def test_unet_keeps_sd_module_names(tiny_unet):
    names = {n for n, _ in tiny_unet.named_modules()}
    for name in (
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.0.proj",
    ):
        assert name in names


def test_build_is_seeded(tmp_path):
    from safetensors.torch import load_file

    a, b = build_tiny_sd(tmp_path / "a", seed=3), build_tiny_sd(tmp_path / "b", seed=3)
    wa = load_file(a / "unet" / "diffusion_pytorch_model.safetensors")
    wb = load_file(b / "unet" / "diffusion_pytorch_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.user_error("an empty ETHER_DIFFUSION_CACHE= (the built-in model cache)", tool="every command")
def test_an_empty_cache_variable_means_the_default_cache(monkeypatch, tmp_path):
    from ether_diffusion.tiny_sd import cache_root

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("ETHER_DIFFUSION_CACHE", "")
    assert cache_root() == tmp_path / ".cache" / "ether_diffusion"  # not the working directory
    monkeypatch.setenv("ETHER_DIFFUSION_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"


@pytest.mark.user_error("HOME or ETHER_DIFFUSION_CACHE naming a file, or a read-only cache (the built-in model cache)",
                        tool="every command")
def test_a_cache_that_cannot_be_written_says_what_to_set(monkeypatch, tmp_path, read_only, tiny_sd_path):
    from ether_diffusion.tiny_sd import TINY_VERSION

    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    monkeypatch.setenv("ETHER_DIFFUSION_CACHE", "")
    monkeypatch.setenv("HOME", str(a_file))
    with refused(f"^the built-in model cache {a_file}/.cache/ether_diffusion/tiny-sd-v{TINY_VERSION}: {a_file} is a "
                 "file, not a folder: set ETHER_DIFFUSION_CACHE to a folder you can write$"):
        resolve_model_path(TINY_SD)
    monkeypatch.setenv("ETHER_DIFFUSION_CACHE", str(a_file))
    with refused(f"^the built-in model cache {a_file}/tiny-sd-v{TINY_VERSION}: {a_file} is a file, not a folder: set "
                 "ETHER_DIFFUSION_CACHE"):
        resolve_model_path(TINY_SD)
    cache = read_only(tmp_path / "shared-cache")
    monkeypatch.setenv("ETHER_DIFFUSION_CACHE", str(cache))
    with refused(f"^the built-in model cache {cache}/tiny-sd-v{TINY_VERSION}: {cache} is not writable \\(a read-only "
                 "folder, or another user's\\?\\): set ETHER_DIFFUSION_CACHE to a folder you can write$"):
        resolve_model_path(TINY_SD)
    assert list(cache.iterdir()) == []  # nothing half-built
    # a read-only cache that already holds the model (built by whoever shares it) is used as it is
    cache.chmod(0o755)
    shutil.copytree(tiny_sd_path, cache / f"tiny-sd-v{TINY_VERSION}")
    cache.chmod(0o555)
    assert resolve_model_path(TINY_SD) == str(cache / f"tiny-sd-v{TINY_VERSION}")
