"""The toy world's pretraining script, rerun for a few steps at tiny sizes: every stage, exact resume, the
export the package ships and the `builtin:toy-sd` assembly from it."""
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ether_diffusion.errors import UserError
from ether_diffusion.toy import model as toy_model
from ether_diffusion.toy import pretrain, world

TINY = {
    "seed": 0, "size": 32, "checkpoint_every": 2,
    "vae": {"block_out_channels": [8, 16, 16], "layers_per_block": 1, "latent_channels": 8, "norm_num_groups": 8,
            "pool": 32, "toy_fraction": 0.5, "toy_weight": 5, "kl_weight": 1e-5, "batch_size": 4, "steps": 4,
            "lr": 1e-3, "warmup": 1},
    "unet": {"block_out_channels": [16, 32, 32], "layers_per_block": 1, "attention_head_dim": 2,
             "norm_num_groups": 8, "pool": 32, "toy_fraction": 0.6, "full_look": 0.5, "named_toys": 20,
             "named_fraction": 0.5, "caption_dropout": 0.1, "batch_size": 4, "steps": 3, "lr": 5e-4,
             "warmup": 1, "weight_decay": 0.01, "ema_decay": 0.999},
    "text_encoder": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
    "judge": {"embed_dim": 16, "image_size": 32, "patch_size": 8, "vision_width": 16, "vision_layers": 1,
              "head_width": 8, "text_width": 16, "text_heads": 2, "text_layers": 1, "pool": 32, "toy_fraction": 0.6,
              "near_misses": 0.5, "noise": 0.1, "batch_size": 8, "steps": 3, "lr": 1e-3, "warmup": 1,
              "weight_decay": 0.05},
    "segmenter": {"hidden_sizes": [8, 8, 16, 16], "depths": [1, 1, 1, 1], "patch_size": 2, "hidden_size": 8,
                  "batch_size": 4, "steps": 3, "lr": 2e-3, "warmup": 1, "weight_decay": 0.01},
}


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tiny_config):
    out = tmp_path_factory.mktemp("pretrain") / "out"
    pretrain.main(["--output_dir", str(out), "--config", str(tiny_config), "--threads", "1"])
    return out


def test_every_stage_writes_its_folder_and_logs(pretrained):
    from diffusers import StableDiffusionPipeline

    assert (pretrained / "vae" / "config.json").is_file() and (pretrained / "judge" / "segmenter").is_dir()
    pipe = StableDiffusionPipeline.from_pretrained(pretrained / "toy-sd")
    unet_names = {n for n, _ in pipe.unet.named_modules()}
    for level in range(3):  # cross-attention in every level, SD-1.5's module names
        assert f"down_blocks.{level}.attentions.0.transformer_blocks.0.attn2.to_k" in unet_names
    assert pipe.vae.config.latent_channels == pipe.unet.config.in_channels == 8
    assert pipe.vae.config.scaling_factor != 0.18215  # set from the latents' statistics
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.beta_end == 0.012
    assert pipe.tokenizer("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]
    log = [json.loads(line) for line in (pretrained / "pretrain_log.jsonl").read_text().splitlines()]
    assert [e["stage"] for e in log if e.get("done")] == ["vae", "unet", "judge"]
    assert not any((pretrained / "checkpoints").iterdir())  # finished stages leave no checkpoint behind


def test_a_stopped_stage_resumes_exactly(tmp_path, tiny_config, monkeypatch):
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    pretrain.main(["--output_dir", str(full), "--config", str(tiny_config), "--stages", "vae"])
    steps = {"n": 0}
    original = torch.optim.AdamW.step

    def interrupted(self, *args, **kwargs):
        steps["n"] += 1
        if steps["n"] == 4:  # killed during step 4: checkpoint-2 is the last one written
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(["--output_dir", str(stopped), "--config", str(tiny_config), "--stages", "vae"])
    monkeypatch.setattr(torch.optim.AdamW, "step", original)
    assert json.loads((stopped / "checkpoints" / "vae" / "state.json").read_text())["step"] == 2
    pretrain.main(["--output_dir", str(stopped), "--config", str(tiny_config), "--stages", "vae"])
    a = load_file(str(full / "vae" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(stopped / "vae" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_export_ships_fp16_and_trained_rows_and_assembles_a_normal_folder(pretrained, tmp_path):
    from diffusers import StableDiffusionPipeline

    ship = tmp_path / "weights"
    pretrain.main(["--output_dir", str(pretrained), "--config", str(pretrained / "pretrain.yaml"), "--export", str(ship)])
    text = load_file(str(ship / "toy-sd" / "text_encoder" / "model.safetensors"))
    ids = text[toy_model.SHIPPED_IDS]
    assert 10 < len(ids) < 100 and text[toy_model.SHIPPED_ROWS].dtype == torch.float16
    assert not any(k.endswith(toy_model.EMBEDDING) for k in text)
    assert load_file(str(ship / "judge" / "open_clip_model.safetensors"))["logit_scale"].dtype == torch.float16
    assert (ship / "pretrain.yaml").is_file() and (ship / "segmenter" / "preprocessor_config.json").is_file()

    folder = toy_model.assemble(tmp_path / "assembled", ship / "toy-sd")
    original = StableDiffusionPipeline.from_pretrained(pretrained / "toy-sd")
    rebuilt = StableDiffusionPipeline.from_pretrained(folder)
    assert rebuilt.unet.dtype == torch.float32
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(original, name).state_dict(), getattr(rebuilt, name).state_dict()
        assert a.keys() == b.keys()
        for key in a:  # fp16 storage; the untrained embedding rows come back exactly
            assert torch.allclose(a[key], b[key], rtol=1e-3, atol=1e-3), (name, key)
    embedding = rebuilt.text_encoder.get_input_embeddings().weight
    untrained = torch.ones(len(embedding), dtype=torch.bool)
    untrained[ids] = False
    assert torch.equal(embedding[untrained], original.text_encoder.get_input_embeddings().weight[untrained])


def test_named_toys_use_untrained_tokens_that_are_not_the_identifiers(pretrained):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pretrained / "toy-sd")
    named = pretrain.named_toys(pipe.tokenizer, 20, TINY["seed"])
    assert len(named) == 20 and not set(named.values()) & set(world.SUBJECTS.values())
    reserved = set(toy_model.world_token_ids(pipe.tokenizer)) | set(pipe.tokenizer(world.IDENTIFIER).input_ids)
    name_ids = {i for name in named for i in pipe.tokenizer(name).input_ids[1:-1]}
    assert name_ids and not name_ids & reserved
    # The names were in the captions (half the pool's toys), and their rows are still the seeded start: only
    # the world's words learn.
    trained = set(toy_model.trained_rows(pretrained / "toy-sd"))
    assert len(trained) > 20 and trained <= set(toy_model.world_token_ids(pipe.tokenizer))
    assert pretrain.named_toys(pipe.tokenizer, 20, TINY["seed"]) == named  # a function of the seed
    with pytest.raises(UserError, match="unet.named_toys: 5000 names asked"):
        pretrain.named_toys(pipe.tokenizer, 5000, 0)


def test_bad_stage_and_missing_config_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="unknown stage 'unet2'"):
        pretrain.parse_args(["--output_dir", str(tmp_path), "--stages", "vae,unet2"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**TINY, "unet": {**TINY["unet"], "named_toys": 0}}))
    with pytest.raises(UserError, match="unet.named_toys is 0 but unet.named_fraction is 0.5"):
        pretrain.load_config(bad)
    bad.write_text(yaml.safe_dump({**TINY, "unet": {**TINY["unet"], "named_fraction": 0}}))
    with pytest.raises(UserError, match="unet.named_toys is 20 but unet.named_fraction is 0 "):
        pretrain.load_config(bad)
    with pytest.raises(UserError, match="config file not found"):
        pretrain.main(["--output_dir", str(tmp_path), "--config", str(tmp_path / "none.yaml")])
