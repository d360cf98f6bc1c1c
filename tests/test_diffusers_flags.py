"""diffusers users at home: the flag table (docs/diffusers_flags.md) against the trainers' parsers, diffusers'
README commands run end to end (changed only in model, data, resolution and steps), the checks of packages and
the hub before any work, and the loss options (--snr_gamma, --noise_offset)."""
import argparse
import ast
import json
import logging
import re
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr
from dreambooth_photos import COPY
from safetensors import safe_open
from trainer_helpers import REPO, TINY, fails, record_loss_weightings, train

from ether_diffusion import arguments, diffusers_flags, hub, packages, training
from ether_diffusion.builtin import resolve_model_path
from ether_diffusion.errors import UserError
from ether_diffusion.trainers import dreambooth, s2i

DOG = COPY / "dog"  # three photos
TABLE = REPO / "docs" / "diffusers_flags.md"
TOOL = "train_dreambooth.py"


def table_rows() -> list[dict]:
    rows = []
    for line in TABLE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and re.fullmatch(r"[a-z0-9_]+", cells[0]) and cells[0] != "flag":
            flag, scripts, default, status, why = cells
            rows.append(dict(flag=flag, scripts=scripts.split(), default=default, status=status, why=why))
    return rows


ROWS = table_rows()
PARSERS = {"dreambooth": dreambooth.make_parser(), "s2i": s2i.make_parser()}


def parsers_of(row) -> dict:
    """L and D flags are train_dreambooth.py's, C flags train_controlnet_s2i.py's."""
    names = (["dreambooth"] if {"L", "D"} & set(row["scripts"]) else []) + (["s2i"] if "C" in row["scripts"] else [])
    return {name: PARSERS[name] for name in names}


def action_of(parser, flag):
    return next((a for a in parser._actions if f"--{flag}" in a.option_strings), None)


def test_the_table_lists_every_flag_of_the_three_scripts_once():
    flags = [r["flag"] for r in ROWS]
    assert len(flags) == len(set(flags)) and len(flags) > 70
    assert {r["status"] for r in ROWS} == {"same", "differs", "refused"}
    # the table holds every refusal the parsers make, and every refusal has its reason in the code
    for name, parser in PARSERS.items():
        refused = {a.dest for a in parser._actions if isinstance(a, diffusers_flags.Refused)}
        assert refused <= {r["flag"] for r in ROWS if r["status"] == "refused"}, name
    assert set(diffusers_flags.REFUSED) == {r["flag"] for r in ROWS if r["status"] == "refused"}


@pytest.mark.parametrize("row", ROWS, ids=[r["flag"] for r in ROWS])
def test_the_table_and_the_parsers_agree(row):
    for name, parser in parsers_of(row).items():
        action = action_of(parser, row["flag"])
        assert action is not None, f"{name} has no --{row['flag']}"
        if row["status"] == "refused":
            assert isinstance(action, diffusers_flags.Refused), name
            with pytest.raises(UserError) as e:
                arguments.parse_args(parser, [f"--{row['flag']}", "x"])
            assert str(e.value) == f"--{row['flag']}: {row['why']}"
            continue
        assert not isinstance(action, diffusers_flags.Refused), name
        if row["status"] == "same":
            assert action.default == ast.literal_eval(row["default"].strip("`")), name


@pytest.mark.user_error("a refused diffusers flag in --config", tool=f"{TOOL} --config")
def test_a_refused_flag_in_a_config_file_is_refused_too(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("text_encoder_use_attention_mask: true\n")
    with pytest.raises(UserError, match="^--text_encoder_use_attention_mask: not supported: Stable Diffusion's CLIP"):
        arguments.parse_args(PARSERS["dreambooth"], ["--config", str(cfg)])


# ------------------------------------------------------------------------------------------ checks before any work
PRIOR_COMMAND = [  # diffusers' README, DreamBooth with prior preservation (class images: 200 -> 2, 1 step each)
    "--pretrained_model_name_or_path", TINY, "--instance_data_dir", DOG, "--with_prior_preservation",
    "--prior_loss_weight=1.0", "--instance_prompt", "a photo of sks dog", "--class_prompt", "a photo of dog",
    "--resolution=32", "--train_batch_size=1", "--gradient_accumulation_steps=1", "--learning_rate=5e-6",
    "--lr_scheduler", "constant", "--lr_warmup_steps=0", "--num_class_images=2", "--class_inference_steps=1",
    "--max_train_steps=2", "--push_to_hub"]

LORA_COMMAND = [  # diffusers' README, DreamBooth LoRA, with --method lora
    "--pretrained_model_name_or_path", TINY, "--instance_data_dir", DOG, "--instance_prompt", "a photo of sks dog",
    "--resolution=32", "--train_batch_size=1", "--gradient_accumulation_steps=1", "--checkpointing_steps=100",
    "--learning_rate=1e-4", "--report_to", "wandb", "--lr_scheduler", "constant", "--lr_warmup_steps=0",
    "--max_train_steps=2", "--validation_prompt", "A photo of sks dog in a bucket", "--validation_epochs=50",
    "--seed=0", "--push_to_hub", "--method", "lora"]


def nothing_done(out, class_dir):
    """Neither class images nor any output of training exist."""
    assert not class_dir.exists() or not any(class_dir.iterdir())
    assert not (out / "adapter.safetensors").exists() and not list(out.glob("checkpoint-*"))


@pytest.mark.user_error("--push_to_hub offline (HF_HUB_OFFLINE=1)", tool=TOOL)
def test_push_to_hub_offline_fails_before_class_images(tmp_path, capsys):
    out = tmp_path / "out"
    line = fails(dreambooth.main, [*PRIOR_COMMAND, "--class_data_dir", tmp_path / "class", "--output_dir", out], capsys)
    assert line.startswith("error: --push_to_hub: the hub is offline (HF_HUB_OFFLINE=1)")
    nothing_done(out, tmp_path / "class")


@pytest.mark.user_error("--enable_xformers_memory_efficient_attention without xformers", tool=TOOL)
def test_missing_xformers_fails_before_class_images(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(packages, "installed", lambda name: name != "xformers")  # as here, where it is not
    out = tmp_path / "out"
    argv = [a for a in PRIOR_COMMAND if a != "--push_to_hub"]
    line = fails(dreambooth.main, [*argv, "--class_data_dir", tmp_path / "class", "--output_dir", out,
                                   "--enable_xformers_memory_efficient_attention"], capsys)
    assert line == ("error: --enable_xformers_memory_efficient_attention needs xformers, which is not installed: "
                    "pip install xformers, or leave the flag out: PyTorch's attention is used")
    nothing_done(out, tmp_path / "class")


@pytest.mark.user_error("--report_to wandb without wandb installed", tool=TOOL)
def test_the_lora_readme_command_without_wandb_fails_at_once(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(arguments, "get_available_trackers", lambda: [])  # as where wandb is not installed
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    out = tmp_path / "out"
    line = fails(dreambooth.main, [*LORA_COMMAND, "--output_dir", out], capsys)
    assert line == "error: --report_to wandb: its package is not installed (install it, or use --report_to none)"
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--hub_model_id", "me/dog"], "--hub_model_id is only used with --push_to_hub"),
    (["--hub_token", "t"], "--hub_token is only used with --push_to_hub"),
    (["--offset_noise", "--noise_offset", "0.2"], "--offset_noise is --noise_offset 0.1: give one of them"),
    (["--snr_gamma", "0"], "--snr_gamma must be positive, got 0.0"),
    (["--x0_loss_max_weight", "0"], "--x0_loss_max_weight must be positive, got 0.0"),
    (["--snr_gamma", "5", "--x0_loss_max_weight", "20"],
     "--snr_gamma and --x0_loss_max_weight are two loss weightings: give one of them"),
])
def test_hub_and_noise_settings_that_would_do_nothing_or_conflict(argv, message, tmp_path):
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        dreambooth.parse_args(["--pretrained_model_name_or_path", TINY, "--instance_data_dir", str(DOG),
                               "--instance_prompt", "a", "--output_dir", str(tmp_path / "o"), *argv])


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture
def fake_hub(monkeypatch):
    """The hub as `huggingface_hub` would see it online: the repository made and the folder uploaded are recorded
    (the folder's files, read when uploaded)."""
    calls = {}
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)

    class Repo:
        repo_id = "me/repo"

    def create_repo(name, exist_ok, token):
        calls["created"] = (name, exist_ok, token)
        return Repo()

    def upload_folder(repo_id, folder_path, ignore_patterns, **kw):
        calls["uploaded"] = (repo_id, Path(folder_path), ignore_patterns)
        calls["card"] = (Path(folder_path) / "README.md").read_text()
        return None

    monkeypatch.setattr(hub, "create_repo", create_repo)
    monkeypatch.setattr(hub, "upload_folder", upload_folder)
    return calls


def log_lines(caplog) -> list[str]:
    """Our log lines (the accelerator's state, logged as an object, cannot be formatted once the test reset it)."""
    return [r.msg.strip() for r in caplog.records if r.name.startswith("ether_diffusion") and isinstance(r.msg, str)]


def first_log_line(caplog) -> str:
    return log_lines(caplog)[0]


def method_of(out) -> dict:
    with safe_open(str(out / "adapter.safetensors"), framework="pt") as f:
        return f.metadata()


def test_the_readme_lora_command_trains_lora_validates_per_epoch_and_pushes(tmp_path, fake_hub, caplog):
    caplog.set_level(logging.INFO, logger="ether_diffusion")
    out = tmp_path / "lora-dreambooth-model"
    argv = [a if a != "wandb" else "tensorboard" for a in LORA_COMMAND]  # wandb is not installed here
    train(dreambooth, *argv, "--output_dir", out)
    meta = method_of(out)
    assert (meta["method"], meta["rank"]) == ("lora", "4")
    # --validation_epochs 50: diffusers validates after the first epoch (here cut short at step 2); the final
    # grid is that one, and --validation_steps (100) drew none
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["final.png", "step-000002.png"]
    assert (out / "samples" / "final.png").read_bytes() == (out / "samples" / "step-000002.png").read_bytes()
    # the first log line says what trains; the trainable count follows once the model is loaded
    assert first_log_line(caplog) == "Method = lora (rank 4), targets = to_q,to_k,to_v,to_out.0, learning rate = 0.0001"
    assert any("Trainable adapter parameters = 9,984" in line for line in log_lines(caplog))
    # pushed: the repository made before training, the folder with its model card uploaded at the end
    assert fake_hub["created"] == ("lora-dreambooth-model", True, None)
    assert fake_hub["uploaded"] == ("me/repo", out, hub.IGNORED)
    assert "LoRA (rank 4" in fake_hub["card"]


def test_the_readme_prior_preservation_command_trains_and_pushes(tmp_path, fake_hub, caplog):
    caplog.set_level(logging.INFO, logger="ether_diffusion")
    out, class_dir = tmp_path / "out", tmp_path / "class"
    train(dreambooth, *PRIOR_COMMAND, "--class_data_dir", class_dir, "--output_dir", out)
    assert len(list(class_dir.glob("*.jpg"))) == 2
    assert method_of(out)["method"] == "ether+"  # our default, said first in the log
    assert first_log_line(caplog) == "Method = ether+ (n = 1 blocks), targets = to_q,to_k,to_v,to_out.0, learning rate = 5e-06"
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2]
    assert fake_hub["uploaded"][1] == out and "ETHER+" in fake_hub["card"]


def test_train_dreambooth_py_loss_and_optimizer_flags_are_used(tmp_path, monkeypatch):
    zero_grads, weightings = [], record_loss_weightings(monkeypatch)
    real = torch.optim.AdamW.zero_grad
    monkeypatch.setattr(torch.optim.AdamW, "zero_grad",
                        lambda self, set_to_none=True: zero_grads.append(set_to_none) or real(self, set_to_none))
    tokenizer = Path(resolve_model_path(TINY)) / "tokenizer"
    out = tmp_path / "out"
    train(dreambooth, *[a for a in PRIOR_COMMAND if a != "--push_to_hub"], "--class_data_dir", tmp_path / "class",
          "--output_dir", out, "--snr_gamma", 5.0, "--offset_noise", "--set_grads_to_none", "--tokenizer_name", tokenizer,
          "--pre_compute_text_embeddings", "--report_to", "none", "--num_validation_images", 1,
          "--validation_inference_steps", 1, "--validation_scheduler", "DDPMScheduler")
    assert zero_grads == [True, True]
    assert weightings == {(5.0, None)}  # (snr_gamma, x0_max_weight)
    assert all(json.loads(line)["loss"] > 0 for line in (out / "train_log.jsonl").read_text().splitlines())


@pytest.mark.user_error("--tokenizer_name names a missing tokenizer", tool=TOOL)
def test_a_missing_tokenizer_name_is_named(tmp_path, capsys):
    line = fails(dreambooth.main, ["--pretrained_model_name_or_path", TINY, "--instance_data_dir", DOG,
                                   "--instance_prompt", "a", "--output_dir", tmp_path / "o", "--resolution", 32,
                                   "--report_to", "none", "--tokenizer_name", tmp_path / "no-tokenizer"], capsys)
    assert str(tmp_path / "no-tokenizer") in line


# ------------------------------------------------------------------------------------------ the loss options
def test_min_snr_weights_each_example_as_diffusers_compute_snr_says():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    timesteps = torch.tensor([5, 500, 990])  # SNR far above, near and far below 5
    per_example = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    snr = compute_snr(scheduler, timesteps)
    assert snr[0] > 5 > snr[2]
    expected = (per_example * torch.minimum(snr, torch.full_like(snr, 5.0)) / snr).mean()
    torch.testing.assert_close(training.diffusion_loss(scheduler, pred, target, timesteps, 5.0), expected)
    # no gamma: plain MSE; a gamma above every SNR: plain MSE too
    plain = training.diffusion_loss(scheduler, pred, target, timesteps)
    torch.testing.assert_close(plain, per_example.mean())
    torch.testing.assert_close(training.diffusion_loss(scheduler, pred, target, timesteps, float(snr.max()) + 1), plain)
    # v-prediction: the weights are floored at one
    scheduler.register_to_config(prediction_type="v_prediction")
    torch.testing.assert_close(training.diffusion_loss(scheduler, pred, target, timesteps, 5.0),
                               (per_example * (torch.minimum(snr, torch.full_like(snr, 5.0)) / snr + 1)).mean())


def test_x0_weighting_is_one_over_snr_capped():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    timesteps = torch.tensor([5, 500, 990])  # 1/SNR far below, near and far above 20
    per_example = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    snr = compute_snr(scheduler, timesteps)
    assert 1 / snr[0] < 1 < 1 / snr[1] < 20 < 1 / snr[2]
    weights = torch.stack([1 / snr[0], 1 / snr[1], torch.tensor(20.0)])
    torch.testing.assert_close(training.diffusion_loss(scheduler, pred, target, timesteps, x0_max_weight=20.0),
                               (per_example * weights).mean())
    scheduler.register_to_config(prediction_type="v_prediction")  # the clean latents' error is v's times 1/(SNR+1)
    torch.testing.assert_close(training.diffusion_loss(scheduler, pred, target, timesteps, x0_max_weight=20.0),
                               (per_example * (1 / (snr + 1)).clamp(max=20.0)).mean())


def test_noise_offset_adds_one_constant_per_image_and_channel():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    latents = torch.randn(2, 4, 8, 8)
    torch.manual_seed(0)
    _, _, plain = training.noisy_latents_and_target(scheduler, latents)
    torch.manual_seed(0)
    _, _, offset = training.noisy_latents_and_target(scheduler, latents, noise_offset=0.1)
    shift = offset - plain  # epsilon target: the noise itself
    assert shift.abs().amax() > 0
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand_as(shift))


def test_refused_action_swallows_any_values():
    parser = argparse.ArgumentParser()
    diffusers_flags.add_refused_args(parser, ["validation_images"])
    for argv in (["--validation_images"], ["--validation_images", "a.png", "b.png"], ["--validation_images=a.png"]):
        with pytest.raises(UserError, match="^--validation_images: not supported: it is for image-to-image"):
            parser.parse_args(argv)
