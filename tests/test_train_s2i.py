"""train_controlnet_s2i.py, in-process, on the tiny model and a tiny ADE20K folder (32 px, a few steps): the demo
config, the trainer's one exact-resume proof (adapter and encoder), step-0 equality, the paper configs on SD-1.5,
and every bad input (exit code 2, one line, nothing written). The entry-point script: test_arguments.py."""
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from ether_diffusion.trainers import s2i as s2i_trainer
from trainer_helpers import TINY, fails, record_loss_weightings, stop_and_resume, train

from ether_diffusion import AdapterConfig, arguments, inject_adapters
from ether_diffusion.adapters import CONTROL_TARGETS, adapter_state_dict, count_adapter_parameters
from ether_diffusion.ade20k import ADE20KDataset, colorize
from ether_diffusion.builtin import builtin_caption_file
from ether_diffusion.control import ENCODER_CONFIG, ENCODER_WEIGHTS, S2IPipeline, use_control
from ether_diffusion.grids import sample_control_grid
from ether_diffusion.sample import use_dpm_solver
from ether_diffusion.tiny_ade20k import write_tiny_ade20k
from ether_diffusion.tiny_sd import build_sd15_unet

ENCODER_FILES = (ENCODER_WEIGHTS, ENCODER_CONFIG)


@pytest.fixture(scope="module")
def script():
    return s2i_trainer


@pytest.fixture
def ade(tmp_path):
    return write_tiny_ade20k(tmp_path / "data", n_train=4, n_val=2, size=48)


def tensors(path):
    return load_file(str(path))


def events(folder):
    """{tag: number of values} of the TensorBoard scalars and images under `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accs = [EventAccumulator(str(p.parent)).Reload() for p in folder.glob("**/events.out.tfevents.*")]
    scalars = {tag: len(a.Scalars(tag)) for a in accs for tag in a.Tags()["scalars"]}
    images = {tag: len(a.Images(tag)) for a in accs for tag in a.Tags()["images"]}
    return scalars, images


# ------------------------------------------------------------------------------------------ end to end
# The demo's config on the tiny random model and data (fast plumbing); the toy world's own run is checked below.
TINY_DEMO = ["--pretrained_model_name_or_path", TINY, "--train_data_dir", "builtin:tiny-ade20k",
             "--learning_rate", "1e-3", "--encoder_learning_rate", "1e-4"]


def test_demo_config_trains_and_its_output_loads_in_s2i_pipeline(script, tmp_path, caplog, monkeypatch):
    out = tmp_path / "demo"
    weightings = record_loss_weightings(monkeypatch)
    extra = ["--max_train_steps", 4, "--validation_steps", 2, "--validation_inference_steps", 2,
             "--checkpointing_steps", 3, "--distance_logging_steps", 2, *TINY_DEMO]
    with caplog.at_level(logging.INFO):
        train(script, "--config", "configs/s2i/demo.yaml", "--output_dir", out, *extra)
    # the method and its shape, then both counts, separately, at the start
    assert "Method = ether+ (n = 1 blocks), targets = to_q,to_k,to_v,to_out.0,ff.net.0.proj" in caplog.text
    assert "Trainable adapter parameters = 7,872" in caplog.text
    assert "Control encoder parameters (trained fully) = 72,080" in caplog.text
    assert weightings == {(None, 20.0)}  # the config's x0_loss_max_weight reaches the loss
    # builtin:tiny-ade20k was written into the output folder
    assert len(list((out / "tiny-ade20k/ADEChallengeData2016/annotations/training").glob("*.png"))) == 8
    # grids: the folder's 2 validation maps (no validation_maps in the config) x (map | 2 images | real) of 32 px
    for name in ("step-000002.png", "step-000004.png", "final.png"):
        assert Image.open(out / "samples" / name).size == (4 * 32, 2 * 32), name
    assert (out / "samples/final.png").read_bytes() == (out / "samples/step-000004.png").read_bytes()
    # checkpoints hold adapter, encoder, optimizer (two groups: adapter lr, capped encoder lr) and RNG
    ckpt = out / "checkpoint-3"
    assert {"adapter.safetensors", *ENCODER_FILES, "optimizer.pt", "scheduler.pt", "rng-0.pt"} <= {p.name for p in ckpt.iterdir()}
    optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert [g["lr"] for g in optimizer["param_groups"]] == [1e-3, 1e-4]
    # the encoder trained (its zero conv moved), and it is not in the adapter file
    encoder = tensors(out / ENCODER_WEIGHTS)
    assert encoder["conv_out.weight"].abs().max() > 0
    assert not any("encoder" in k for k in tensors(out / "adapter.safetensors"))
    # loss and lr every step; distances every 2 steps, in the log and in TensorBoard
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [d["step"] for d in log] == [1, 2, 3, 4]
    assert [("transform_distance" in d) for d in log] == [False, True, False, True]
    scalars, images = events(out / "logs")
    assert scalars["loss"] == 4 and scalars["transform_distance"] == 2 and images["validation"] == 2

    # The output folder (and any checkpoint) loads with S2IPipeline.from_output and redraws the final grid.
    args = script.parse_args(["--config", "configs/s2i/demo.yaml", "--output_dir", str(out), *map(str, extra)])
    args.caption_file = builtin_caption_file(args.train_data_dir, out / "tiny-ade20k")  # the trainer's captions
    dataset = ADE20KDataset(out / "tiny-ade20k", resolution=32, caption_file=args.caption_file)
    maps, prompts, real = script.load_validation_inputs(args, dataset, out / "tiny-ade20k")
    s2i = S2IPipeline.from_output(TINY, out)
    use_dpm_solver(s2i.pipe)  # the trainer's validation scheduler
    grid = sample_control_grid(s2i, prompts, maps, 2, seed=0, num_inference_steps=2, height=32, width=32,
                               real_images=real)
    diff = np.abs(np.asarray(grid, dtype=np.int16) - np.asarray(Image.open(out / "samples/final.png"), dtype=np.int16))
    assert diff.max() <= 2  # rounding of uint8 pixels across thread counts
    assert len(S2IPipeline.from_output(TINY, ckpt)(prompts[0], maps[0], num_inference_steps=2)) == 1


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory):
    """An uninterrupted 6-step run, and the same run stopped after step 4 and resumed from its checkpoint."""
    root = tmp_path_factory.mktemp("resume")
    data = write_tiny_ade20k(root / "data", n_train=5, n_val=1, size=48)  # batch 1, accumulation 2: 3 steps/epoch
    common = ["--pretrained_model_name_or_path", TINY, "--train_data_dir", data, "--caption_file",
              data / "metadata.jsonl", "--resolution", 32, "--train_batch_size", 1, "--gradient_accumulation_steps", 2,
              "--max_train_steps", 6, "--checkpointing_steps", 2, "--checkpoints_total_limit", 2,
              "--lr_scheduler", "linear", "--lr_warmup_steps", 2, "--learning_rate", "1e-2",
              "--encoder_learning_rate", "1e-4", "--seed", 3, "--method", "ether+", "--n_blocks", 2,
              "--validation_steps", 100, "--validation_inference_steps", 1, "--num_validation_images", 1,
              "--report_to", "none"]
    return stop_and_resume(s2i_trainer, common, root, run=train)


def test_stop_and_resume_ends_with_the_same_adapter_and_encoder(resumed_runs):
    full, resumed = resumed_runs
    assert sorted(p.name for p in full.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    for name in ("adapter.safetensors", ENCODER_WEIGHTS):
        a, b = tensors(full / name), tensors(resumed / name)
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6, name
        # and it did train after the checkpoint
        c4 = tensors(full / "checkpoint-4" / name)
        assert max((a[k] - c4[k]).abs().max().item() for k in a) > 1e-6, name
    logs = [json.loads(line) for line in (resumed / "train_log.jsonl").read_text().splitlines()]
    full_logs = [json.loads(line) for line in (full / "train_log.jsonl").read_text().splitlines()]
    assert [d["step"] for d in logs] == [1, 2, 3, 4, 5, 6]
    assert [d["lr"] for d in logs] == [d["lr"] for d in full_logs]
    assert logs[-1]["loss"] == pytest.approx(full_logs[-1]["loss"], abs=1e-6)


@pytest.mark.user_error("a checkpoint whose control encoder file is missing", tool="train_controlnet_s2i.py")
def test_resuming_needs_the_encoder_in_the_checkpoint(script, resumed_runs, ade, tmp_path, capsys):
    full, _ = resumed_runs
    out = tmp_path / "o"
    shutil.copytree(full / "checkpoint-6", out / "checkpoint-6")
    (out / "checkpoint-6" / ENCODER_WEIGHTS).unlink()
    line = fails(script.main, base_args(ade, out) + ["--n_blocks", 2, "--resume_from_checkpoint", "latest"], capsys)
    assert f"no usable checkpoint in {out}: checkpoint-6 is damaged: {ENCODER_WEIGHTS} is missing" in line


# ------------------------------------------------------------------------------------------ model
def test_step_zero_equals_the_base_unet_and_only_adapter_and_encoder_train(script, tiny_unet, unet_inputs):
    with torch.no_grad():
        base = tiny_unet(*unet_inputs).sample
    cfg = AdapterConfig(method="ether+", n_blocks=2, target_modules=list(CONTROL_TARGETS))
    inject_adapters(tiny_unet, cfg)
    encoder = script.add_encoder(tiny_unet, scale_factor=4)
    control = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), use_control(tiny_unet, control):
        torch.testing.assert_close(tiny_unet(*unet_inputs).sample, base, atol=1e-5, rtol=0)
    adapter = set(adapter_state_dict(tiny_unet))
    assert any(k.endswith("ff.net.0.proj.ether_u") for k in adapter)
    trainable = {n for n, p in tiny_unet.named_parameters() if p.requires_grad}
    assert trainable == adapter | {f"conv_in.encoder.{n}" for n, _ in encoder.named_parameters()}


@pytest.mark.user_error("--encoder_learning_rate 0", tool="train_controlnet_s2i.py")
def test_encoder_learning_rate_defaults_to_the_cap_and_takes_an_explicit_rate(script, ade, tmp_path, capsys):
    def parse(*extra):
        return script.parse_args(["--pretrained_model_name_or_path", TINY, "--train_data_dir", "d", *extra])

    assert parse("--method", "ether").encoder_learning_rate == 1e-4  # min(1e-3, cap)
    assert parse("--method", "oft").encoder_learning_rate == 1e-5  # min(1e-5, cap)
    assert parse("--method", "ether", "--encoder_learning_rate", "3e-3").encoder_learning_rate == 3e-3  # cap lifted
    line = fails(script.main, base_args(ade, tmp_path / "o") + ["--encoder_learning_rate", "0"], capsys)
    assert "--encoder_learning_rate must be positive, got 0" in line


# ------------------------------------------------------------------------------------------ bad input
def base_args(data, out):
    return ["--pretrained_model_name_or_path", TINY, "--train_data_dir", str(data), "--output_dir", str(out),
            "--resolution", "32", "--report_to", "none"]


def fails_before_writing(script, argv, out, capsys) -> str:
    line = fails(script.main, argv, capsys)
    assert not out.exists()  # nothing written for a run that cannot start
    return line


@pytest.mark.user_error("a label map with a label above 150", tool="train_controlnet_s2i.py")
def test_label_above_150_is_named_before_anything_is_written(script, ade, tmp_path, capsys):
    path = ade / "annotations/training/ADE_train_00000003.png"
    labels = np.asarray(Image.open(path)).copy()
    labels[0, 0] = 151
    Image.fromarray(labels).save(path)
    out = tmp_path / "o"
    assert f"{path}: label 151 is above 150" in fails_before_writing(script, base_args(ade, out), out, capsys)


@pytest.mark.user_error("an image without its annotation", tool="train_controlnet_s2i.py")
def test_image_without_annotation_is_named(script, ade, tmp_path, capsys):
    (ade / "annotations/training/ADE_train_00000002.png").unlink()
    out = tmp_path / "o"
    line = fails_before_writing(script, base_args(ade, out), out, capsys)
    assert f"image {ade / 'images/training/ADE_train_00000002.jpg'} has no annotation" in line


@pytest.mark.user_error("a map whose size differs from its image's", tool="train_controlnet_s2i.py")
def test_map_whose_size_differs_from_its_image(script, ade, tmp_path, capsys):
    path = ade / "annotations/training/ADE_train_00000004.png"
    Image.fromarray(np.ones((40, 48), dtype=np.uint8)).save(path)
    out = tmp_path / "o"
    assert f"{path}: map size 48x40 differs from its image's 48x48" in fails_before_writing(
        script, base_args(ade, out), out, capsys)


@pytest.mark.user_error("an RGB map with a colour outside the palette, or RGB maps without --conditioning_is_rgb",
                        tool="train_controlnet_s2i.py")
def test_unknown_colour_in_an_rgb_map(script, ade, tmp_path, capsys):
    for f in (ade / "annotations/training").iterdir():
        Image.fromarray(colorize(np.asarray(Image.open(f)))).save(f)
    path = ade / "annotations/training/ADE_train_00000002.png"
    rgb = np.asarray(Image.open(path)).copy()
    rgb[3, 4] = (1, 2, 3)
    Image.fromarray(rgb).save(path)
    out = tmp_path / "o"
    line = fails_before_writing(script, base_args(ade, out) + ["--conditioning_is_rgb"], out, capsys)
    assert f"{path}: colour (1, 2, 3) at pixel (x=4, y=3) is not in the ADE20K palette" in line
    # and without the flag the coloured maps are refused with a hint
    line = fails_before_writing(script, base_args(ade, out), out, capsys)
    assert "is not a label map of values 0..150 (use --conditioning_is_rgb" in line


@pytest.mark.user_error("a caption file with a line that is not JSON, or a file_name without an image",
                        tool="train_controlnet_s2i.py")
def test_caption_file_errors_name_the_line(script, ade, tmp_path, capsys):
    captions = ade / "metadata.jsonl"
    lines = captions.read_text().splitlines()
    out = tmp_path / "o"
    args = base_args(ade, out) + ["--caption_file", captions]
    captions.write_text("\n".join(lines[:2] + ["{not json"] + lines[3:]) + "\n")
    assert f"{captions} line 3 is not JSON: '{{not json'" in fails_before_writing(script, args, out, capsys)
    captions.write_text("\n".join(lines + [json.dumps({"file_name": "ADE_train_00000099.jpg", "text": "x"})]) + "\n")
    line = fails_before_writing(script, args, out, capsys)
    assert f"{captions} line {len(lines) + 1}: file_name 'ADE_train_00000099.jpg' has no image in the dataset" in line


@pytest.mark.user_error("3 --validation_prompt for 2 maps, a bad validation map, no --train_data_dir",
                        tool="train_controlnet_s2i.py")
def test_validation_inputs_are_checked_up_front(script, ade, tmp_path, capsys):
    out = tmp_path / "o"
    maps = [ade / "annotations/validation/ADE_val_00000001.png", ade / "annotations/validation/ADE_val_00000002.png"]
    args = base_args(ade, out) + ["--validation_maps", ",".join(map(str, maps))]
    line = fails_before_writing(script, args + ["--validation_prompt", "a", "--validation_prompt", "b",
                                                "--validation_prompt", "c"], out, capsys)
    assert "3 --validation_prompt values for 2 --validation_maps" in line
    Image.fromarray(np.full((8, 8), 200, dtype=np.uint8)).save(maps[1])
    assert f"{maps[1]}: label 200 is above 150" in fails_before_writing(script, args, out, capsys)
    assert "--train_data_dir is required" in fails(script.main, base_args(ade, out)[:2] + base_args(ade, out)[4:], capsys)


def test_validation_prompts_default_to_the_maps_captions(script, ade):
    args = script.parse_args(base_args(ade, "o") + ["--caption_file", str(ade / "metadata.jsonl"), "--validation_maps",
                                                    str(ade / "annotations/validation/ADE_val_00000002.png")])
    dataset = ADE20KDataset(ade, resolution=32, caption_file=args.caption_file)
    maps, prompts, real = script.load_validation_inputs(args, dataset, ade)
    captions = {json.loads(line)["file_name"]: json.loads(line)["text"] for line in open(ade / "metadata.jsonl")}
    assert prompts == [captions["ADE_val_00000002.jpg"]] and maps[0].size == (32, 32) and real is None
    # without validation maps, the validation split's maps (both here) with their captions and real pictures
    args = script.parse_args(base_args(ade, "o") + ["--caption_file", str(ade / "metadata.jsonl")])
    maps, prompts, real = script.load_validation_inputs(args, ADE20KDataset(ade, resolution=32), ade)
    assert prompts == [captions["ADE_val_00000001.jpg"], captions["ADE_val_00000002.jpg"]]
    assert [im.size for im in maps + real] == [(32, 32)] * 4 and real[0].getpixel((5, 5)) != maps[0].getpixel((5, 5))
    # a folder without a validation split shows its training maps; --num_validation_maps says how many
    shutil.rmtree(ade / "annotations/validation")
    args = script.parse_args(base_args(ade, "o") + ["--num_validation_maps", "3"])
    maps, prompts, real = script.load_validation_inputs(args, ADE20KDataset(ade, resolution=32), ade)
    assert len(maps) == len(real) == 3 and all(p.startswith("a photo of ") for p in prompts)


# ------------------------------------------------------------------------------------------ configs
PAPER = {  # config: (method, n_blocks, learning rate, encoder learning rate, adapter parameters on SD-1.5)
    "ether": ("ether", 1, 1e-3, 1e-4, 111_936),  # the paper's 0.1M (Table 3)
    "etherplus": ("ether+", 1, 1e-3, 1e-4, 623_232),  # 0.4M
    "oft": ("oft", 4, 1e-5, 1e-5, 26_401_792),
    "naive": ("naive", 4, 1e-5, 1e-5, 26_401_792),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_hold_the_papers_settings_and_fit_sd15(script, name):
    args = script.parse_args(["--config", f"configs/s2i/{name}.yaml", "--train_data_dir", "ade"])
    method, n, lr, encoder_lr, count = PAPER[name]
    assert (args.method, args.n_blocks, args.learning_rate, args.encoder_learning_rate) == (method, n, lr, encoder_lr)
    assert (args.train_batch_size, args.resolution) == (10, 512)
    assert args.target_modules == list(CONTROL_TARGETS)
    unet = build_sd15_unet()  # on the meta device: no weights allocated
    inject_adapters(unet, arguments.adapter_config_from_args(args))
    encoder = script.add_encoder(unet, scale_factor=8)
    assert count_adapter_parameters(unet) == count
    assert sum(p.numel() for p in encoder.parameters()) == 1_086_480
