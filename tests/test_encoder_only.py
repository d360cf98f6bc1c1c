"""`train_controlnet_s2i.py --method none`: the signal encoder trained alone (the paper's "Encoder-only" row of
Table 3). No adapter anywhere, refusals when a resume would mix runs with and without an adapter, and
`S2IPipeline.from_output` loading such a folder. The trainer's exact resume: test_train_s2i.py."""
import pytest
import torch
from safetensors.torch import load_file
from ether_diffusion.trainers import dreambooth as dreambooth_trainer, s2i as s2i_trainer
from trainer_helpers import TINY, fails, train

from ether_diffusion.adapter_file import ADAPTER_FILE
from ether_diffusion.control import ENCODER_WEIGHTS, S2IPipeline
from ether_diffusion.tiny_ade20k import write_tiny_ade20k


@pytest.fixture(scope="module")
def script():
    return s2i_trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 6-step encoder-only run."""
    root = tmp_path_factory.mktemp("encoder_only")
    data = write_tiny_ade20k(root / "data", n_train=3, n_val=1, size=48)
    common = ["--pretrained_model_name_or_path", TINY, "--train_data_dir", data, "--resolution", 32,
              "--train_batch_size", 1, "--max_train_steps", 6, "--checkpointing_steps", 2, "--method", "none",
              "--learning_rate", "1e-3", "--seed", 1, "--validation_steps", 100, "--validation_inference_steps", 1,
              "--num_validation_images", 1, "--report_to", "none"]
    train(s2i_trainer, *common, "--output_dir", root / "full")
    return {"data": data, "full": root / "full", "common": common}


def test_encoder_only_trains_the_encoder_and_writes_no_adapter(runs):
    full = runs["full"]
    assert not list(full.glob(f"**/{ADAPTER_FILE}"))  # neither in the output folder nor in a checkpoint
    assert sorted(p.name for p in full.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    encoder = load_file(str(full / ENCODER_WEIGHTS))
    assert encoder["conv_out.weight"].abs().max() > 0  # the zero-initialised last conv moved
    # one parameter group: the encoder's, at min(lr, 1e-4)
    optimizer = torch.load(full / "checkpoint-6" / "optimizer.pt", weights_only=True)
    assert [g["lr"] for g in optimizer["param_groups"]] == [1e-4]


def test_from_output_loads_an_encoder_only_folder(runs):
    s2i = S2IPipeline.from_output(TINY, runs["full"] / "checkpoint-4")
    assert not any("ether" in name or "lora" in name for name, _ in s2i.pipe.unet.named_parameters())
    from PIL import Image

    label_map = Image.new("RGB", (32, 32), (120, 120, 120))
    assert len(s2i("a photo of a room", label_map, num_inference_steps=1, height=32, width=32)) == 1


@pytest.mark.user_error("resume an encoder-only run with an adapter method", tool="train_controlnet_s2i.py")
def test_resuming_an_encoder_only_run_with_an_adapter_is_refused(script, runs, tmp_path, capsys):
    argv = [*runs["common"], "--output_dir", runs["full"], "--method", "ether", "--resume_from_checkpoint", "latest"]
    line = fails(script.main, argv, capsys)
    assert "checkpoint-6 was trained without an adapter but this run asks for one" in line


@pytest.mark.user_error("resume an adapter run with --method none", tool="train_controlnet_s2i.py")
def test_resuming_an_adapter_run_without_one_is_refused(script, runs, tmp_path, capsys):
    out = tmp_path / "ether"
    train(script, *runs["common"], "--method", "ether", "--max_train_steps", 2, "--output_dir", out)
    argv = [*runs["common"], "--output_dir", out, "--resume_from_checkpoint", "latest"]
    line = fails(script.main, argv, capsys)
    assert "checkpoint-2 was trained with an adapter but this run asks for none" in line


@pytest.mark.user_error("--method none for DreamBooth", tool="train_dreambooth.py")
def test_dreambooth_has_no_encoder_only_method(capsys):
    line = fails(dreambooth_trainer.main, ["--method", "none"], capsys)
    assert "argument --method: invalid choice: 'none'" in line


@pytest.mark.user_error("--export_lora with --method none", tool="train_controlnet_s2i.py")
def test_encoder_only_has_no_adapter_to_export(script, capsys):
    line = fails(script.main, ["--pretrained_model_name_or_path", TINY, "--train_data_dir", "x", "--output_dir", "o",
                               "--method", "none", "--export_lora", "kohya"], capsys)
    assert "--export_lora kohya: --method none trains no adapter to export" in line


def test_encoder_only_learning_rate_defaults_to_the_encoders_cap(script):
    args = script.parse_args(["--pretrained_model_name_or_path", TINY, "--train_data_dir", "x", "--output_dir", "o",
                              "--method", "none"])
    assert args.learning_rate == args.encoder_learning_rate == 1e-4
