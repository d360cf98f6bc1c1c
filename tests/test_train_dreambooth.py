"""train_dreambooth.py: a real `accelerate launch` of the demo config and an in-process run on real photos, on
the tiny model (32 px, a few steps), every bad input in-process (exit code 2, one line), and the DreamBooth data
code. Every method's training, exact resume and checkpoint pruning: test_methods.py."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from dreambooth_photos import COPY
from ether_diffusion.trainers import dreambooth as dreambooth_trainer
from trainer_helpers import REPO, TINY, train
from trainer_helpers import fails as fails_in_process
from trainer_helpers import launch as launch_script
from user_errors import refused

from ether_diffusion import arguments, dreambooth_data, inject_adapters, load_adapter
from ether_diffusion.adapters import count_adapter_parameters
from ether_diffusion.builtin import resolve_instance_dir, resolve_model_path
from ether_diffusion.errors import UserError
from ether_diffusion.tiny_sd import build_sd15_unet
from ether_diffusion.toy import world

DOG = COPY / "dog"  # three photos of two sizes


def launch(*args, timeout=300):
    return launch_script("train_dreambooth.py", *args, timeout=timeout)


@pytest.fixture(scope="module")
def script():
    return dreambooth_trainer


@pytest.fixture
def subject(tmp_path):
    return world.write_subject(tmp_path / "subject", world.DEMO_SUBJECT)


def adapter_tensors(path):
    return load_file(str(path))


# ------------------------------------------------------------------------------------------ end to end
def test_demo_config_with_prior_preservation_and_validation(tmp_path):
    out = tmp_path / "demo"
    launch("--config", "configs/dreambooth/demo.yaml", "--output_dir", out, "--max_train_steps", 4, "--train_batch_size", 2,
           "--validation_steps", 2, "--num_validation_images", 2, "--validation_inference_steps", 2,
           "--num_class_images", 2, "--sample_batch_size", 2, "--class_inference_steps", 2, "--checkpointing_steps", 3,
           "--distance_logging_steps", 2)
    # the drawn subject and the generated class images are saved for the next run
    assert len(list((out / "demo-subject").glob("*.png"))) == 5
    assert len(list((out / "class-images").glob("*.jpg"))) == 2
    # validation grids: 4 prompts (from the config) x 2 images of 32 px; the final grid is the last one
    for name in ("step-000002.png", "step-000004.png", "final.png"):
        assert Image.open(out / "samples" / name).size == (64, 128), name
    assert (out / "samples" / "final.png").read_bytes() == (out / "samples" / "step-000004.png").read_bytes()
    with safe_open(str(out / "adapter.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert (meta["method"], meta["instance_prompt"], meta["steps"]) == ("ether+", "a photo of qwe toy", "4")
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    demo_lr = yaml.safe_load((REPO / "configs" / "dreambooth" / "demo.yaml").read_text())["learning_rate"]
    assert [d["step"] for d in log] == [1, 2, 3, 4] and all(d["loss"] > 0 and d["lr"] == float(demo_lr) for d in log)
    # the adapter's distances from the base model every 2 steps; ETHER+ starts at the identity and moves
    assert [("transform_distance" in d) for d in log] == [False, True, False, True]
    assert 0 < log[1]["transform_distance"] < log[3]["transform_distance"] and log[3]["weight_distance"] > 0
    # TensorBoard by default: loss, lr and the grids
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [EventAccumulator(str(p.parent)).Reload() for p in out.glob("logs/**/events.out.tfevents.*")]
    scalars = {tag: len(e.Scalars(tag)) for e in events for tag in e.Tags()["scalars"]}
    images = {tag: len(e.Images(tag)) for e in events for tag in e.Tags()["images"]}
    assert scalars["loss"] == 4 and scalars["lr"] == 4
    assert scalars["transform_distance"] == 2 and scalars["transform_distance_per_block"] == 2
    assert images["validation"] == 2


def test_bf16_trains_a_float32_adapter_through_validation(script, subject, tmp_path):
    """--mixed_precision bf16: the frozen weights in bf16, the adapter in float32. Had validation (step 2) cast the
    UNet, steps 3-4 would have left values that bf16 represents exactly."""
    out = tmp_path / "o"
    train(script, "--pretrained_model_name_or_path", TINY, "--instance_data_dir", subject, "--instance_prompt",
          "a photo of qwe toy", "--output_dir", out, "--resolution", 32, "--max_train_steps", 4, "--learning_rate",
          "1e-2", "--validation_steps", 2, "--num_validation_images", 1, "--validation_inference_steps", 1,
          "--mixed_precision", "bf16", "--report_to", "none")
    tensors = adapter_tensors(out / "adapter.safetensors")
    assert any(not torch.equal(t, t.bfloat16().float()) for t in tensors.values())


def test_real_photos_of_mixed_sizes_train_and_export_a_stock_pipeline(tmp_path, caplog):
    photos = tmp_path / "dog"
    shutil.copytree(DOG, photos)
    assert len({Image.open(p).size for p in photos.glob("*.jpg")}) > 1  # unequal sizes
    (photos / "notes.txt").write_text("not an image")
    out, merged = tmp_path / "out", tmp_path / "merged"
    train(dreambooth_trainer, "--pretrained_model_name_or_path", TINY, "--instance_data_dir", photos,
          "--instance_prompt", "a photo of qwe dog", "--output_dir", out, "--resolution", 32, "--train_batch_size", 2,
          "--max_train_steps", 2, "--method", "ether", "--n_blocks", 4, "--prediction_type", "v_prediction",
          "--report_to", "none", "--export_merged", merged)
    assert f"skipping {photos / 'notes.txt'}: not an image file" in caplog.text
    assert Image.open(out / "samples" / "final.png").size == (4 * 32, 32)  # the instance prompt, 4 images
    # the merged folder is plain diffusers and computes what base model + adapter compute
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_pretrained(merged)
    assert type(pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q) is torch.nn.Linear
    base = UNet2DConditionModel.from_pretrained(resolve_model_path(TINY), subfolder="unet")
    load_adapter(base, out / "adapter.safetensors")
    x, t, text = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, text).sample, base(x, t, text).sample, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------ bad input
def fails(script, argv, capsys) -> str:
    return fails_in_process(script.main, argv, capsys)


def base_args(instance_dir, out):
    return ["--pretrained_model_name_or_path", TINY, "--instance_data_dir", instance_dir, "--instance_prompt",
            "a photo of qwe toy", "--output_dir", out, "--resolution", 32, "--report_to", "none"]


@pytest.mark.user_error("--instance_data_dir names a missing folder", tool="train_dreambooth.py")
def test_missing_and_empty_instance_folders(script, tmp_path, capsys):
    line = fails(script, base_args(tmp_path / "nope", tmp_path / "o"), capsys)
    assert f"instance image folder not found: {tmp_path / 'nope'}" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no images here")
    assert f"instance image folder {empty} has no images" in fails(script, base_args(empty, tmp_path / "o"), capsys)
    assert not (tmp_path / "o").exists()  # nothing written for a run that cannot start


@pytest.mark.user_error("a dangling symbolic link in the instance folder", tool="train_dreambooth.py")
def test_a_link_to_a_missing_photo_is_named(script, subject, tmp_path, capsys):
    photos = shutil.copytree(subject, tmp_path / "photos")
    (photos / "05.jpg").symlink_to(tmp_path / "moved" / "05.jpg")
    line = fails(script, base_args(photos, tmp_path / "o"), capsys)
    assert line == f"error: {photos / '05.jpg'} is a symbolic link to {tmp_path / 'moved' / '05.jpg'}, which does not exist"


@pytest.mark.user_error("a blank --instance_prompt", tool="train_dreambooth.py")
def test_a_blank_instance_prompt_is_refused(script, subject, tmp_path, capsys):
    line = fails(script, [*base_args(subject, tmp_path / "o"), "--instance_prompt", "   "], capsys)
    assert line == "error: --instance_prompt '   ' is blank"


@pytest.mark.user_error("a corrupt or truncated instance photo", tool="train_dreambooth.py")
def test_corrupt_and_truncated_images_are_named(script, subject, tmp_path, capsys):
    (subject / "broken.png").write_bytes(b"\x89PNG not really")
    assert f"{subject / 'broken.png'}: cannot read image" in fails(script, base_args(subject, tmp_path / "o"), capsys)
    (subject / "broken.png").unlink()
    jpg = (DOG / "00.jpg").read_bytes()
    (subject / "half.jpg").write_bytes(jpg[: len(jpg) // 2])
    assert f"{subject / 'half.jpg'}: cannot read image" in fails(script, base_args(subject, tmp_path / "o"), capsys)


@pytest.mark.user_error("a 1x1 (or 7 px wide) instance photo", tool="train_dreambooth.py")
def test_a_tiny_instance_photo_is_named_with_its_size(script, subject, tmp_path, capsys):
    Image.new("RGB", (1, 1), "red").save(subject / "dot.png")
    line = fails(script, base_args(subject, tmp_path / "o"), capsys)
    assert line == (f"error: {subject / 'dot.png'} is 1x1 pixels: too small to train on (at least "
                    f"{dreambooth_data.MIN_IMAGE_SIDE} on each side; give the photo itself)")
    Image.new("RGB", (7, 300), "red").save(subject / "dot.png")
    assert f"{subject / 'dot.png'} is 7x300 pixels" in fails(script, base_args(subject, tmp_path / "o"), capsys)
    assert not (tmp_path / "o").exists()  # refused before the run starts
    Image.new("RGB", (8, 8), "red").save(subject / "dot.png")  # small but a picture: accepted
    dreambooth_data.check_images(dreambooth_data.list_images(subject))


@pytest.mark.parametrize("error", [
    pytest.param(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)"),
                 id="cuda", marks=pytest.mark.user_error("out of memory in the VAE encoder (a GPU's)",
                                                         tool="train_dreambooth.py")),
    pytest.param(RuntimeError("[enforce fail at alloc_cpu.cpp:114] . DefaultCPUAllocator: not enough memory: you "
                              "tried to allocate 1073741824 bytes."), id="cpu",
                 marks=pytest.mark.user_error("out of memory in the VAE encoder (the CPU's)", tool="train_dreambooth.py")),
])
def test_out_of_memory_in_the_vae_encoder_says_what_to_lower(script, subject, tmp_path, capsys, monkeypatch, error):
    from diffusers import AutoencoderKL

    def encode(self, x, *args, **kwargs):
        raise error

    monkeypatch.setattr(AutoencoderKL, "encode", encode)
    line = fails(script, [*base_args(subject, tmp_path / "o"), "--train_batch_size", 2, "--max_train_steps", 1], capsys)
    assert line == ("error: out of memory on cpu encoding a batch of 2 images of 32x32 px: lower --train_batch_size "
                    "(raise --gradient_accumulation_steps to keep the batch) or --resolution, or use --mixed_precision "
                    "fp16/bf16")


def test_other_errors_in_the_vae_encoder_are_not_taken_for_out_of_memory(monkeypatch, tiny_sd_path):
    from diffusers import AutoencoderKL

    from ether_diffusion.training import encode_latents

    def encode(self, x, *args, **kwargs):
        raise RuntimeError("expected input to have 3 channels, but got 4 channels instead")

    monkeypatch.setattr(AutoencoderKL, "encode", encode)
    vae = AutoencoderKL.from_pretrained(tiny_sd_path, subfolder="vae")
    with pytest.raises(RuntimeError, match="expected input to have 3 channels"):
        encode_latents(vae, torch.zeros(1, 4, 32, 32), torch.float32)


@pytest.mark.user_error("no --class_prompt, --resolution 30, --method dora, no --instance_prompt, a config typo",
                        tool="train_dreambooth.py")
def test_bad_arguments(script, subject, tmp_path, capsys):
    args = base_args(subject, tmp_path / "o")
    assert "--with_prior_preservation needs --class_prompt" in fails(script, args + ["--with_prior_preservation"], capsys)
    assert "--resolution 30 is not a positive multiple of 8" in fails(script, args + ["--resolution", 30], capsys)
    assert "argument --method: invalid choice: 'dora'" in fails(script, args + ["--method", "dora"], capsys)
    assert "--instance_prompt is required" in fails(script, args[:4] + args[6:], capsys)
    (tmp_path / "a-file").write_text("x")
    assert f"--output_dir {tmp_path / 'a-file'} is a file, not a folder" in fails(
        script, base_args(subject, tmp_path / "a-file"), capsys)
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("method: ether\nnum_class_image: 200\n")
    assert f"{cfg}: unknown key 'num_class_image' (did you mean 'num_class_images'?)" in fails(
        script, args + ["--config", cfg], capsys)


@pytest.mark.user_error("--n_blocks that does not divide a layer's width", tool="train_dreambooth.py")
def test_n_blocks_that_does_not_divide_a_layer_names_it(script, subject, tmp_path, capsys):
    line = fails(script, base_args(subject, tmp_path / "o") + ["--method", "ether+", "--n_blocks", 3], capsys)
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert f"layer {layer}: input size 32 is not divisible by n_blocks=3" in line


# ------------------------------------------------------------------------------------------ data
def test_non_image_files_are_skipped_with_a_warning(tmp_path, caplog):
    world.write_subject(tmp_path, world.DEMO_SUBJECT)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".DS_Store").write_text("x")
    (tmp_path / "sub").mkdir()
    images = dreambooth_data.list_images(tmp_path)
    assert [p.name for p in images] == [f"{i:02d}.png" for i in range(5)]
    assert [r.getMessage() for r in caplog.records] == [f"skipping {tmp_path / 'notes.txt'}: not an image file"]


def test_subject_dataset_crops_from_the_sample_seed(tmp_path):
    gradient = np.zeros((40, 64, 3), np.uint8)
    gradient[..., 0] = np.arange(64)[None, :] * 4  # red grows left to right: every crop offset looks different
    Image.fromarray(gradient).save(tmp_path / "wide.png")
    ds = dreambooth_data.SubjectDataset(sorted(DOG.glob("*.jpg")) + [tmp_path / "wide.png"], size=32)
    for i in range(len(ds)):
        x = ds[i]["instance_images"]
        assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1
    wide = len(ds) - 1
    crops = [ds[(wide, seed)]["instance_images"] for seed in range(8)]
    assert torch.equal(ds[(wide, 3)]["instance_images"], crops[3])
    assert any(not torch.equal(crops[0], c) for c in crops[1:])
    centered = dreambooth_data.SubjectDataset([tmp_path / "wide.png"], size=32, center_crop=True)
    assert torch.equal(centered[(0, 1)]["instance_images"], centered[(0, 2)]["instance_images"])


def test_prior_preservation_batches_put_instances_first(tmp_path):
    world.write_subject(tmp_path / "inst", world.DEMO_SUBJECT, count=2)
    Image.new("RGB", (32, 32), "black").save(tmp_path / "class.png")
    ds = dreambooth_data.SubjectDataset(sorted((tmp_path / "inst").glob("*.png")), [tmp_path / "class.png"], size=32)
    assert len(ds) == 2
    batch = dreambooth_data.collate_fn(True)([ds[0], ds[1]])
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["num_instance"] == 2
    assert torch.all(batch["pixel_values"][2:] == -1)  # the black class image, twice


class FakePipe:
    """A pipeline whose image is its generator's seed (red channel); counts the batch sizes it was called with."""

    def __init__(self, calls):
        self.calls = calls

    def set_progress_bar_config(self, **kw):
        pass

    def __call__(self, prompts, generator, **kw):
        self.calls.append(len(prompts))
        return type("Out", (), {"images": [Image.new("RGB", (8, 8), (g.initial_seed() % 256, 0, 0)) for g in generator]})


def test_class_images_are_generated_once_and_reused(tmp_path):
    calls = []

    def load_pipe():
        return FakePipe(calls)

    made = dreambooth_data.generate_class_images(load_pipe, tmp_path / "cls", "a dog", 5, sample_batch_size=2, seed=10)
    assert made == 5 and calls == [2, 2, 1]
    files = sorted(p.name for p in (tmp_path / "cls").iterdir())
    assert len(files) == 5 and all(f.endswith(".jpg") and not f.startswith(".") for f in files)
    assert dreambooth_data.generate_class_images(load_pipe, tmp_path / "cls", "a dog", 5) == 0
    assert dreambooth_data.generate_class_images(load_pipe, tmp_path / "cls", "a dog", 6, seed=10) == 1
    assert calls == [2, 2, 1, 1]


@pytest.mark.user_error("a class image deleted from --class_data_dir (a gap in the generated set)", tool="train_dreambooth.py")
def test_a_lost_class_image_is_made_again_under_its_own_index(tmp_path):
    cls = tmp_path / "cls"
    dreambooth_data.generate_class_images(lambda: FakePipe([]), cls, "a dog", 5, seed=10)
    before = {p.name: p.read_bytes() for p in cls.iterdir()}
    lost = sorted(cls.iterdir())[2]
    lost.unlink()
    calls = []
    assert dreambooth_data.generate_class_images(lambda: FakePipe(calls), cls, "a dog", 5, seed=10) == 1
    assert calls == [1] and {p.name: p.read_bytes() for p in cls.iterdir()} == before  # index 2 again, as it was
    # the user's own images count too; ours go on after the last one
    (cls / "my-dog.png").write_bytes((cls / lost.name).read_bytes())
    assert dreambooth_data.missing_class_indices(cls, 7) == [5]


@pytest.mark.user_error("a class image folder with fewer images than --num_class_images at training time",
                        tool="train_dreambooth.py")
def test_training_never_uses_fewer_class_images_than_asked(tmp_path):
    dreambooth_data.generate_class_images(lambda: FakePipe([]), tmp_path / "cls", "a dog", 2)
    with refused("class image folder .* has 2 images, fewer than --num_class_images 3"):
        dreambooth_data.class_images(tmp_path / "cls", 3)
    assert len(dreambooth_data.class_images(tmp_path / "cls", 2)) == 2


def test_builtin_subjects_are_drawn_once_and_deterministically(tmp_path):
    folder = resolve_instance_dir("builtin:demo-subject", tmp_path / "out")
    assert folder == tmp_path / "out" / "demo-subject"
    files = sorted(folder.iterdir())
    assert [p.name for p in files] == [f"{i:02d}.png" for i in range(5)]
    assert all(Image.open(p).size == (32, 32) for p in files)
    assert len({Image.open(p).tobytes() for p in files}) == 5  # five different pictures
    again = world.write_subject(tmp_path / "b", world.DEMO_SUBJECT)
    assert [p.read_bytes() for p in files] == [p.read_bytes() for p in sorted(again.iterdir())]
    heart = resolve_instance_dir("builtin:toy-subject/heart_toy", tmp_path / "out")
    assert heart == tmp_path / "out" / "toy-subject-heart_toy" and len(list(heart.glob("*.png"))) == 5
    with pytest.raises(UserError, match="the toy world has no subject 'dog'"):
        resolve_instance_dir("builtin:toy-subject/dog", tmp_path / "out")
    assert resolve_instance_dir("photos/dog", tmp_path) == Path("photos/dog")
    with pytest.raises(UserError, match="cannot read image"):
        (folder / "00.png").write_bytes(b"")
        dreambooth_data.check_images(dreambooth_data.list_images(folder))


# ------------------------------------------------------------------------------------------ configs
PAPER = {  # config: (method, n_blocks or rank, learning rate, trainable parameters on SD-1.5)
    "ether": ("ether", 1, 6e-3, 99_456),  # the paper's 0.1M
    "etherplus": ("ether+", 1, 6e-3, 398_592),  # 0.4M
    "oft": ("oft", 4, 6e-5, 23_304_192),  # the paper prints half (11.6M): OFT's storage convention, App. C
    "naive": ("naive", 4, 6e-5, 23_304_192),
    "lora": ("lora", 4, 6e-4, 797_184),  # 0.8M
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_hold_the_papers_settings_and_fit_sd15(script, name):
    args = script.parse_args(["--config", f"configs/dreambooth/{name}.yaml", "--instance_data_dir", "dog",
                              "--instance_prompt", "a photo of qwe dog", "--class_prompt", "a photo of dog"])
    method, n, lr, count = PAPER[name]
    assert (args.method, args.n_blocks if method != "lora" else args.rank, args.learning_rate) == (method, n, lr)
    assert (args.max_train_steps, args.train_batch_size, args.resolution) == (1400, 1, 512)
    assert (args.with_prior_preservation, args.num_class_images) == (True, 200)
    assert args.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    unet = build_sd15_unet()  # on the meta device: no weights allocated
    inject_adapters(unet, arguments.adapter_config_from_args(args))
    assert count_adapter_parameters(unet) == count
