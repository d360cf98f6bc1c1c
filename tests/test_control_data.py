"""train_controlnet_s2i.py on ControlNet-style data (ether_diffusion/control_data.py): a small fill50k-style dataset
that the tests write (circle outlines as conditioning images, filled circles on coloured backgrounds as images,
captions), as an imagefolder with metadata.jsonl and as a `save_to_disk` dataset; diffusers' README command run on
it (changed only in model, data, resolution and steps); the validation pairing rule; --proportion_empty_prompts;
exact resume; and the mistakes (missing column, offline hub, missing package, flags of the other path)."""
import json
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file
from trainer_helpers import TINY, fails, stop_and_resume, train
from user_errors import refused

from ether_diffusion import control_data, packages, training
from ether_diffusion.control import (ENCODER_CONFIG, ENCODER_WEIGHTS, IMAGE_CONDITIONING, S2IPipeline,
                                     control_conditioning, make_control_encoder, save_control_encoder)
from ether_diffusion.errors import UserError
from ether_diffusion.tiny_ade20k import write_tiny_ade20k
from ether_diffusion.trainers import s2i

pytestmark = pytest.mark.usefixtures("one_thread")
TOOL = "train_controlnet_s2i.py"
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (40, 170, 60), "yellow": (230, 210, 40),
           "white": (245, 245, 245), "black": (10, 10, 10)}


def fill50k_row(rng, size):
    """(conditioning image, image, caption) as fill50k has them: a circle's outline on black, and that circle
    filled with one colour on a background of another."""
    circle, background = rng.sample(sorted(COLOURS), 2)
    r = rng.randint(size // 6, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    box = (cx - r, cy - r, cx + r, cy + r)
    conditioning = Image.new("RGB", (size, size), "black")
    ImageDraw.Draw(conditioning).ellipse(box, outline="white", width=2)
    image = Image.new("RGB", (size, size), COLOURS[background])
    ImageDraw.Draw(image).ellipse(box, fill=COLOURS[circle])
    return conditioning, image, f"{circle} circle with {background} background"


def write_imagefolder(folder, n=4, size=48, seed=0):
    """An imagefolder: images/, conditioning_images/ and metadata.jsonl (datasets' `*_file_name` columns)."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True)
    (folder / "conditioning_images").mkdir()
    lines = []
    for i in range(n):
        conditioning, image, caption = fill50k_row(rng, size)
        image.save(folder / f"images/{i}.png")
        conditioning.save(folder / f"conditioning_images/{i}.png")
        lines.append({"file_name": f"images/{i}.png", "conditioning_image_file_name": f"conditioning_images/{i}.png",
                      "text": caption})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def write_saved_dataset(folder, n=4, size=48, seed=0, splits=False):
    """The same rows as a `datasets.Dataset` written by `save_to_disk` (fill50k's columns and features); with
    `splits`, as the train split of a `DatasetDict`."""
    import datasets

    rng = random.Random(seed)
    rows = [fill50k_row(rng, size) for _ in range(n)]
    features = datasets.Features({"image": datasets.Image(), "conditioning_image": datasets.Image(),
                                  "text": datasets.Value("string")})
    data = datasets.Dataset.from_dict({"image": [r[1] for r in rows], "conditioning_image": [r[0] for r in rows],
                                       "text": [r[2] for r in rows]}, features=features)
    (datasets.DatasetDict({"train": data}) if splits else data).save_to_disk(str(folder))
    return folder


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """datasets' cache (where imagefolders are converted to Arrow) in the test's folder, not the user's."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


@pytest.fixture
def fill(tmp_path):
    return write_imagefolder(tmp_path / "fill")


@pytest.fixture
def validation_images(tmp_path):
    """conditioning_image_1.png and _2.png, as diffusers' README downloads them."""
    rng = random.Random(7)
    paths = []
    for i in (1, 2):
        path = tmp_path / f"conditioning_image_{i}.png"
        fill50k_row(rng, 40)[0].save(path)
        paths.append(path)
    return paths


def readme_command(data_args, validation_images, out):
    """diffusers' README fill50k command: model, data, resolution and steps changed, the rest as written."""
    return ["--pretrained_model_name_or_path", TINY, "--output_dir", out, *data_args, "--resolution=32",
            "--learning_rate=1e-5", "--validation_image", *validation_images,
            "--validation_prompt", "red circle with blue background", "cyan circle with brown floral background",
            "--train_batch_size=4", "--max_train_steps=2", "--validation_inference_steps=2"]


def pixels(image):
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("layout", ["imagefolder", "save_to_disk"])
def test_the_fill50k_readme_command_trains_end_to_end(layout, tmp_path, validation_images):
    if layout == "imagefolder":
        data_args = ["--train_data_dir", write_imagefolder(tmp_path / "fill")]
    else:
        data_args = ["--dataset_name", write_saved_dataset(tmp_path / "fill50k")]
    out = tmp_path / "controlnet-model"
    train(s2i, *readme_command(data_args, validation_images, out))

    # the encoder trained, records what it reads, and the adapter says the same
    assert load_file(out / ENCODER_WEIGHTS)["conv_out.weight"].abs().max() > 0
    assert control_conditioning(out) == IMAGE_CONDITIONING
    with safe_open(str(out / "adapter.safetensors"), framework="pt") as f:
        assert f.metadata()["conditioning"] == IMAGE_CONDITIONING
    assert "Conditioning image to image (ControlNet-style data)" in (out / "README.md").read_text()
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2]
    # TensorBoard under the trackers' project, diffusers' default name
    assert list((out / "logs" / "train_controlnet").glob("events.out.tfevents.*"))

    # the grid: one row per prompt (one image each), conditioning image | 4 generated (num_validation_images 4)
    grid = Image.open(out / "samples" / "final.png")
    assert grid.size == (5 * 32, 2 * 32)
    for row, path in enumerate(validation_images):  # each row starts with its validation image at 32 px
        expected = pixels(Image.open(path).resize((32, 32), Image.BILINEAR))
        assert np.abs(pixels(grid.crop((0, 32 * row, 32, 32 * row + 32))) - expected).max() <= 1
    # and the output folder loads as S2IPipeline's, like an ADE20K run's
    s2i_pipe = S2IPipeline.from_output(TINY, out)
    assert len(s2i_pipe("red circle", Image.open(validation_images[0]), num_inference_steps=1, height=32, width=32)) == 1


def test_every_layout_gives_the_same_items_as_diffusers_transforms(tmp_path):
    folder = write_imagefolder(tmp_path / "fill")
    saved = write_saved_dataset(tmp_path / "saved")
    saved_splits = write_saved_dataset(tmp_path / "saved-splits", splits=True)
    parse = lambda *data: s2i.parse_args(["--pretrained_model_name_or_path", TINY, "--resolution", "32",
                                          "--output_dir", str(tmp_path / "o"), "--center_crop", *map(str, data)])
    a = control_data.ControlDataset.from_args(parse("--train_data_dir", folder))
    others = [control_data.ControlDataset.from_args(parse(*data)) for data in (
        ["--dataset_name", saved], ["--dataset_name", folder], ["--train_data_dir", saved_splits])]
    assert len(a) == 4 and [len(b) for b in others] == [4, 4, 4]
    for i in range(4):
        x = a[i]
        assert x["caption"] == json.loads((folder / "metadata.jsonl").read_text().splitlines()[i])["text"]
        for y in (b[i] for b in others):
            assert y["caption"] == x["caption"]
            for key in ("pixel_values", "conditioning_pixel_values"):
                torch.testing.assert_close(x[key], y[key])
        # diffusers: resize the shorter side (bilinear) and centre-crop; images in [-1, 1], conditioning in [0, 1]
        conditioning = Image.open(folder / f"conditioning_images/{i}.png").resize((32, 32), Image.BILINEAR)
        got = (x["conditioning_pixel_values"] * 255).round().permute(1, 2, 0).numpy()
        assert np.abs(got - pixels(conditioning)).max() <= 1
        assert x["pixel_values"].min() >= -1 and x["pixel_values"].max() <= 1 and x["pixel_values"].min() < 0
    # --max_train_samples: the first N rows
    assert len(control_data.ControlDataset.from_args(parse("--train_data_dir", folder, "--max_train_samples", 2))) == 2


def test_a_path_column_and_a_list_of_captions_are_read(tmp_path):
    """`"conditioning_image": "path"` (a string column) is a file relative to the folder; a list of captions gives
    one of them, drawn from the sample's seed (the first without one)."""
    folder = write_imagefolder(tmp_path / "fill", n=2)
    lines = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(
        {"file_name": d["file_name"], "conditioning_image": d["conditioning_image_file_name"],
         "text": [d["text"], "another caption"]}) + "\n" for d in lines))
    args = s2i.parse_args(["--pretrained_model_name_or_path", TINY, "--resolution", "32", "--train_data_dir",
                           str(folder), "--output_dir", str(tmp_path / "o"), "--center_crop"])
    dataset = control_data.ControlDataset.from_args(args)
    expected = TF.to_tensor(Image.open(folder / "conditioning_images/0.png").resize((32, 32), Image.BILINEAR))
    torch.testing.assert_close(dataset[0]["conditioning_pixel_values"], expected)
    assert dataset[0]["caption"] == lines[0]["text"]
    drawn = {dataset[(0, seed)]["caption"] for seed in range(20)}
    assert drawn == {lines[0]["text"], "another caption"}
    assert dataset[(0, 5)]["caption"] == dataset[(0, 5)]["caption"]


# ------------------------------------------------------------------------------------------ validation pairing
def test_validation_images_and_prompts_pair_as_in_diffusers():
    pair = control_data.pair_validation
    assert pair(["i"], ["a", "b", "c"]) == (["i", "i", "i"], ["a", "b", "c"])  # one image, many prompts
    assert pair(["i", "j"], ["a"]) == (["i", "j"], ["a", "a"])  # many images, one prompt
    assert pair(["i", "j"], ["a", "b"]) == (["i", "j"], ["a", "b"])  # one each
    with pytest.raises(UserError, match="^2 --validation_image and 3 --validation_prompt: give one image, one prompt"):
        pair(["i", "j"], ["a", "b", "c"])


def test_validation_grid_rows_follow_the_pairing(fill, validation_images, tmp_path):
    base = ["--pretrained_model_name_or_path", TINY, "--train_data_dir", str(fill), "--resolution", "32",
            "--output_dir", str(tmp_path / "o")]
    dataset = control_data.ControlDataset.from_args(s2i.parse_args(base))
    one_image = s2i.parse_args(base + ["--validation_image", str(validation_images[0]), "--validation_prompt", "a", "b"])
    images, prompts, real = control_data.validation_inputs(one_image, dataset)
    assert prompts == ["a", "b"] and len(images) == 2 and images[0] is images[1] and images[0].size == (32, 32)
    assert real is None
    # neither given: the first training rows (all four here), centre-cropped, with their captions and pictures
    images, prompts, real = control_data.validation_inputs(s2i.parse_args(base), dataset)
    captions = [json.loads(line)["text"] for line in (fill / "metadata.jsonl").read_text().splitlines()]
    assert prompts == captions and [im.size for im in images + real] == [(32, 32)] * 8


@pytest.mark.user_error("--validation_image and --validation_prompt that do not pair (2 and 3; a prompt without an "
                        "image)", tool=TOOL)
def test_validation_pairing_mistakes_stop_before_anything_is_written(fill, validation_images, tmp_path, capsys):
    out = tmp_path / "o"
    base = ["--pretrained_model_name_or_path", TINY, "--train_data_dir", fill, "--output_dir", out, "--resolution", 32]
    line = fails(s2i.main, base + ["--validation_image", *validation_images, "--validation_prompt", "a", "b", "c"], capsys)
    assert line == ("error: 2 --validation_image and 3 --validation_prompt: give one image, one prompt, or as many "
                    "prompts as images")
    line = fails(s2i.main, base + ["--validation_prompt", "a"], capsys)
    assert line.startswith("error: --validation_prompt needs --validation_image with ControlNet-style data")
    assert not out.exists()


# ------------------------------------------------------------------------------------------ empty prompts
def test_proportion_empty_prompts_one_gives_the_text_encoder_empty_captions(fill, tmp_path, monkeypatch):
    seen = []
    encode = training.encode_prompt

    def recording(tokenizer, text_encoder, prompt, device):
        seen.append(list(prompt))
        return encode(tokenizer, text_encoder, prompt, device)

    monkeypatch.setattr(training, "encode_prompt", recording)
    common = ["--pretrained_model_name_or_path", TINY, "--train_data_dir", fill, "--resolution", 32,
              "--train_batch_size", 2, "--max_train_steps", 2, "--validation_steps", 100, "--num_validation_images", 1,
              "--validation_inference_steps", 1, "--report_to", "none", "--seed", 0]
    captions = {json.loads(line)["text"] for line in (fill / "metadata.jsonl").read_text().splitlines()}
    train(s2i, *common, "--output_dir", tmp_path / "all", "--proportion_empty_prompts", 1.0)
    assert seen == [["", ""], ["", ""]]
    seen.clear()
    train(s2i, *common, "--output_dir", tmp_path / "none")
    assert len(seen) == 2 and all(c in captions for batch in seen for c in batch)


def test_empty_prompts_are_drawn_from_each_samples_seed(fill, tmp_path):
    args = s2i.parse_args(["--pretrained_model_name_or_path", TINY, "--train_data_dir", str(fill), "--resolution", "32",
                           "--output_dir", str(tmp_path / "o")])
    half = control_data.with_empty_prompts(control_data.ControlDataset.from_args(args), 0.5)
    dropped = [half[(i % 4, seed)]["caption"] == "" for i, seed in enumerate(range(400))]
    assert 0.4 < sum(dropped) / len(dropped) < 0.6  # about half, as diffusers' random.random() < 0.5
    assert dropped == [half[(i % 4, seed)]["caption"] == "" for i, seed in enumerate(range(400))]  # and the same again
    assert half[0]["caption"] != ""  # looked up without a seed (validation, inspection): kept


def test_ade20k_maps_take_proportion_empty_prompts_too(tmp_path):
    ade = write_tiny_ade20k(tmp_path / "ade", n_train=2, n_val=1, size=32)
    argv = ["--pretrained_model_name_or_path", TINY, "--train_data_dir", str(ade), "--resolution", "32",
            "--output_dir", str(tmp_path / "o")]
    assert s2i.load_data(s2i.parse_args(argv)).dataset[0, 1]["caption"].startswith("a photo of")
    dataset = s2i.load_data(s2i.parse_args(argv + ["--proportion_empty_prompts", "1"])).dataset
    assert [dataset[i, seed]["caption"] for i, seed in ((0, 1), (1, 2))] == ["", ""]


# ------------------------------------------------------------------------------------------ exact resume
def test_stop_and_resume_on_control_data_ends_where_the_full_run_does(tmp_path):
    data = write_imagefolder(tmp_path / "fill", n=5, size=48)  # random 32 px crops of 48 px pictures
    common = ["--pretrained_model_name_or_path", TINY, "--train_data_dir", data, "--resolution", 32,
              "--train_batch_size", 1, "--gradient_accumulation_steps", 2, "--max_train_steps", 6,
              "--checkpointing_steps", 2, "--learning_rate", "1e-2", "--seed", 3, "--proportion_empty_prompts", 0.5,
              "--validation_steps", 100, "--validation_inference_steps", 1, "--num_validation_images", 1,
              "--report_to", "none"]
    full, resumed = stop_and_resume(s2i, common, tmp_path, run=train)
    for name in ("adapter.safetensors", ENCODER_WEIGHTS):
        a, b, c4 = (load_file(folder / name) for folder in (full, resumed, full / "checkpoint-4"))
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6, name
        assert max((a[k] - c4[k]).abs().max().item() for k in a) > 1e-6, name  # it trained after the checkpoint
    losses = [[json.loads(line)["loss"] for line in (f / "train_log.jsonl").read_text().splitlines()] for f in (full, resumed)]
    assert losses[1] == pytest.approx(losses[0], abs=1e-6)


# ------------------------------------------------------------------------------------------ mistakes
@pytest.mark.user_error("a column name the dataset does not have (--caption_column)", tool=TOOL)
def test_a_missing_column_is_named_with_the_columns_present(fill, tmp_path, capsys):
    out = tmp_path / "o"
    line = fails(s2i.main, ["--pretrained_model_name_or_path", TINY, "--train_data_dir", fill, "--output_dir", out,
                            "--resolution", 32, "--caption_column", "caption"], capsys)
    assert line == (f"error: --caption_column 'caption': {fill} has no such column "
                    "(its columns: image, conditioning_image, text)")
    assert not out.exists()


@pytest.mark.user_error("--dataset_name a hub id that is not cached, with HF_HUB_OFFLINE=1", tool=TOOL)
def test_an_uncached_hub_dataset_offline_fails_before_any_training(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "o"
    line = fails(s2i.main, ["--pretrained_model_name_or_path", TINY, "--dataset_name", "fusing/fill50k", "--cache_dir",
                            tmp_path / "cache", "--output_dir", out, "--resolution", 32], capsys)
    assert line == ("error: --dataset_name fusing/fill50k is not in the datasets cache and the hub is offline "
                    "(HF_HUB_OFFLINE=1): unset it to download the dataset, or give a local folder")
    assert not out.exists()


@pytest.mark.user_error("--dataset_name without the datasets package installed", tool=TOOL)
def test_without_the_datasets_package_the_run_stops_at_once(fill, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(packages, "installed", lambda name: name != "datasets")
    out = tmp_path / "o"
    line = fails(s2i.main, ["--pretrained_model_name_or_path", TINY, "--dataset_name", fill, "--output_dir", out], capsys)
    assert line == "error: --dataset_name is read with the datasets package, which is not installed: pip install datasets"
    assert not out.exists()


@pytest.mark.user_error("a flag of the other data path (--validation_maps with ControlNet-style data, --image_column "
                        "or --validation_image with ADE20K maps), or both --train_data_dir and --dataset_name", tool=TOOL)
def test_flags_of_the_other_path_are_refused_not_ignored(fill, tmp_path, capsys):
    ade = write_tiny_ade20k(tmp_path / "ade", n_train=2, n_val=1, size=32)
    base = ["--pretrained_model_name_or_path", TINY, "--output_dir", tmp_path / "o", "--resolution", 32]
    line = fails(s2i.main, base + ["--train_data_dir", fill, "--validation_maps", "m.png"], capsys)
    assert line.startswith("error: --validation_maps is for ADE20K label maps, not ControlNet-style data "
                           "(--train_data_dir): use --validation_image")
    line = fails(s2i.main, base + ["--train_data_dir", ade, "--image_column", "photo"], capsys)
    assert line == (f"error: --image_column is for ControlNet-style data (--dataset_name, or a --train_data_dir with "
                    f"metadata.jsonl), but {ade} is read as ADE20K label maps")
    line = fails(s2i.main, base + ["--train_data_dir", ade, "--validation_image", "c.png", "--validation_prompt", "a"],
                 capsys)
    assert line.endswith("is read as ADE20K label maps: use --validation_maps")
    line = fails(s2i.main, base + ["--train_data_dir", ade, "--dataset_name", fill], capsys)
    assert line == "error: give one of --train_data_dir and --dataset_name, not both"


@pytest.mark.user_error("--proportion_empty_prompts outside [0, 1]", tool=TOOL)
def test_proportion_empty_prompts_is_a_proportion(fill, tmp_path, capsys):
    line = fails(s2i.main, ["--pretrained_model_name_or_path", TINY, "--train_data_dir", fill, "--output_dir",
                            tmp_path / "o", "--proportion_empty_prompts", 1.5], capsys)
    assert line == "error: --proportion_empty_prompts must be in [0, 1], got 1.5"


@pytest.mark.user_error("evaluate/s2i.py on a run trained on ControlNet-style data", tool="evaluate/s2i.py")
def test_the_ade20k_evaluator_refuses_a_control_data_run(tiny_unet, tmp_path):
    from evaluate import s2i as evaluate_s2i

    save_control_encoder(make_control_encoder(tiny_unet, 4), tmp_path / "run", IMAGE_CONDITIONING)
    assert json.loads((tmp_path / "run" / ENCODER_CONFIG).read_text())["conditioning"] == "image"
    argv = ["--dataset", str(tmp_path / "ade"), "--pretrained_model_name_or_path", TINY, "--control_dir",
            str(tmp_path / "run"), "--output_dir", str(tmp_path / "eval")]
    with refused("was trained on ControlNet-style data, not ADE20K label maps: mIoU and accuracy do not apply"):
        evaluate_s2i.parse_args(argv)
    save_control_encoder(make_control_encoder(tiny_unet, 4), tmp_path / "run")  # an ADE20K run's: accepted
    assert evaluate_s2i.parse_args(argv).control_dir == str(tmp_path / "run")
