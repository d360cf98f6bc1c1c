import json

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from ether_diffusion.ade20k import (NUM_CLASSES, ADE20KDataset, caption_from_labels, colorize, colors_to_labels,
                                    load_control_map, load_palette)
from ether_diffusion.tiny_ade20k import write_tiny_ade20k
from user_errors import refused

S2I = "train_controlnet_s2i.py, evaluate/s2i.py (ADE20K reader)"

ROAD, SKYSCRAPER = 7, 49


@pytest.fixture
def ade(tmp_path):
    return write_tiny_ade20k(tmp_path, n_train=4, n_val=2, size=64)


# ------------------------------------------------------------------------------------------ palette
def test_palette_matches_the_ade20k_classes():
    colors, names = load_palette()
    assert colors.shape == (NUM_CLASSES + 1, 3)
    assert tuple(colors[0]) == (0, 0, 0) and names[0] == "other"
    assert (names[1], tuple(colors[1])) == ("wall", (120, 120, 120))
    assert (names[150], tuple(colors[150])) == ("flag", (92, 0, 255))
    assert names[ROAD] == "road" and tuple(colors[ROAD]) == tuple(colors[SKYSCRAPER]) == (140, 140, 140)
    # apart from road/skyscraper, every label has its own colour
    assert len({tuple(c) for c in colors}) == NUM_CLASSES


def test_palette_round_trip_labels_colors_labels():
    labels = np.arange(NUM_CLASSES + 1, dtype=np.uint8).repeat(3).reshape(151, 3)  # every label, 2-D map
    back = colors_to_labels(colorize(labels))
    expected = labels.copy()
    expected[expected == SKYSCRAPER] = ROAD  # the shared colour reads back as the lower label
    np.testing.assert_array_equal(back, expected)
    # and colours -> labels -> colours is exact for every palette colour
    colors = colorize(labels)
    np.testing.assert_array_equal(colorize(colors_to_labels(colors)), colors)


def test_unknown_colour_is_named():
    rgb = colorize(np.ones((4, 5), dtype=np.uint8))
    rgb[2, 3] = (1, 2, 3)
    with refused(r"map.png: colour \(1, 2, 3\) at pixel \(x=3, y=2\) is not in the ADE20K palette"):
        colors_to_labels(rgb, source="map.png")


def test_label_above_150_is_named():
    with refused("m.png: label 151 is above 150"):
        colorize(np.array([[0, 151]]), source="m.png")


def test_caption_from_labels_lists_classes_by_area():
    labels = np.zeros((10, 10), dtype=np.uint8)
    labels[:6] = 1     # wall, 60 px
    labels[6:9] = 8    # bed, 30 px
    labels[9, :5] = 4  # floor, 5 px; the rest stays "other" and is left out
    assert caption_from_labels(labels) == "a photo of wall, bed, floor"
    assert caption_from_labels(np.zeros((3, 3), dtype=np.uint8)) == "a photo"


# ------------------------------------------------------------------------------------------ dataset
class StubTokenizer:
    model_max_length = 8

    def __call__(self, text, max_length, padding, truncation, return_tensors):
        ids = [len(word) for word in text.split()][:max_length]
        ids += [0] * (max_length - len(ids))

        class Out:
            input_ids = torch.tensor([ids])
        return Out()


def test_dataset_items(ade):
    ds = ADE20KDataset(ade.parent, "train", resolution=32, caption_file=ade / "metadata.jsonl", tokenizer=StubTokenizer())
    assert len(ds) == 4 and len(ADE20KDataset(ade, "validation", resolution=32)) == 2
    item = ds[0]
    assert item["pixel_values"].shape == (3, 32, 32) and item["conditioning_pixel_values"].shape == (3, 32, 32)
    assert -1 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1 and item["pixel_values"].min() < 0
    assert 0 <= item["conditioning_pixel_values"].min() and item["conditioning_pixel_values"].max() <= 1
    # the conditioning image is the palette colouring of the returned labels
    expected = torch.from_numpy(colorize(item["labels"].numpy())).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(item["conditioning_pixel_values"], expected)
    captions = {json.loads(line)["file_name"]: json.loads(line)["text"] for line in open(ade / "metadata.jsonl")}
    assert item["caption"] == captions["ADE_train_00000001.jpg"]
    assert item["input_ids"].shape == (8,) and item["input_ids"][0] == len(item["caption"].split()[0])
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and len(batch["caption"]) == 2


def test_without_caption_file_captions_come_from_class_names(ade):
    ds = ADE20KDataset(ade, "train", resolution=64, max_samples=2)
    assert len(ds) == 2
    assert "class names" in ds.caption_source
    item = ds[1]
    assert item["caption"] == caption_from_labels(item["labels"].numpy())
    assert item["caption"].startswith("a photo of ")


def _write_pair(ade, name, image, labels, split="training"):
    Image.fromarray(image).save(ade / "images" / split / f"{name}.png")  # lossless, so colours compare exactly
    Image.fromarray(labels).save(ade / "annotations" / split / f"{name}.png")


def test_image_and_map_get_the_same_resize_and_crop(ade):
    # a wide pair whose left half is wall and right half bed; the image is the map's colours
    labels = np.ones((40, 80), dtype=np.uint8)
    labels[:, 40:] = 8
    labels[:, 70:] = 3
    for f in (ade / "images" / "training").iterdir():
        f.unlink()
    _write_pair(ade, "ADE_train_00000001", colorize(labels), labels)
    for center_crop in (True, False):
        ds = ADE20KDataset(ade, "train", resolution=20, center_crop=center_crop)
        for _ in range(5):  # random crops land in different places; all must agree
            item = ds[0]
            image = (item["pixel_values"] + 1) / 2
            assert item["labels"].shape == (20, 20)
            # away from class borders (antialiased bilinear blurs those, also from just outside the crop),
            # image and map colours agree
            interior = torch.ones(20, 20, dtype=torch.bool)
            interior[:, [0, -1]] = False
            borders = (item["labels"][:, 1:] != item["labels"][:, :-1]).any(0).nonzero().flatten()
            for b in borders:
                interior[:, max(0, b - 1):b + 3] = False
            diff = (image - item["conditioning_pixel_values"]).abs().amax(0)[interior]
            assert diff.numel() > 100 and diff.max() < 0.02


def test_random_crops_come_from_the_sample_seed_alone(ade):
    labels = np.ones((40, 80), dtype=np.uint8)
    labels[:, 40:] = 8
    labels[:, 70:] = 3
    (ade / "images/training/ADE_train_00000001.jpg").unlink()
    _write_pair(ade, "ADE_train_00000001", colorize(labels), labels)
    ds = ADE20KDataset(ade, "train", resolution=20, center_crop=False)
    crops = [ds[(0, seed)] for seed in range(8)]
    assert any(not torch.equal(crops[0]["labels"], c["labels"]) for c in crops[1:])  # the crops differ
    torch.manual_seed(123)  # the global RNG plays no part: a resumed run or another worker sees the same crop
    again = ds[(0, 3)]
    assert torch.equal(again["labels"], crops[3]["labels"]) and torch.equal(again["pixel_values"], crops[3]["pixel_values"])


def test_load_control_map_is_the_datasets_centre_crop(ade):
    ds = ADE20KDataset(ade, "train", resolution=32)
    control, labels = load_control_map(ds.pairs[1][1], 32)
    assert np.array_equal(labels, ds[1]["labels"].numpy())
    assert torch.equal(TF.to_tensor(control), ds[1]["conditioning_pixel_values"])


def test_conditioning_is_rgb_reads_coloured_maps(ade, tmp_path):
    plain = ADE20KDataset(ade, "train", resolution=32)
    expected = [plain[i] for i in range(len(plain))]
    for f in (ade / "annotations" / "training").iterdir():
        Image.fromarray(colorize(np.asarray(Image.open(f)))).save(f)
    coloured = ADE20KDataset(ade, "train", resolution=32, conditioning_is_rgb=True)
    for i, item in enumerate(expected):
        torch.testing.assert_close(coloured[i]["conditioning_pixel_values"], item["conditioning_pixel_values"])
        assert torch.equal(coloured[i]["labels"], item["labels"])
    # without the flag an RGB map is refused with a hint
    with refused("ADE_train_00000001.png: a RGB image is not a label map.*--conditioning_is_rgb"):
        plain[0]


# ------------------------------------------------------------------------------------------ bad input
def test_label_above_150_names_the_file(ade):
    labels = np.asarray(Image.open(ade / "annotations/training/ADE_train_00000002.png")).copy()
    labels[0, 0] = 151
    Image.fromarray(labels).save(ade / "annotations/training/ADE_train_00000002.png")
    ds = ADE20KDataset(ade, "train", resolution=32)
    ds[0]
    with refused("ADE_train_00000002.png: label 151 is above 150"):
        ds[1]
    with refused("ADE_train_00000002.png: label 151 is above 150"):
        ds.check_maps()  # what a trainer calls before it writes anything


def test_image_without_annotation_is_named(ade):
    (ade / "annotations/training/ADE_train_00000003.png").unlink()
    with refused("image .*ADE_train_00000003.jpg has no annotation .*ADE_train_00000003.png"):
        ADE20KDataset(ade, "train", resolution=32)


def test_map_size_differs_from_image(ade):
    Image.fromarray(np.ones((48, 64), dtype=np.uint8)).save(ade / "annotations/training/ADE_train_00000001.png")
    ds = ADE20KDataset(ade, "train", resolution=32)
    with refused("ADE_train_00000001.png: map size 64x48 differs from its image's 64x64"):
        ds[0]
    with refused("ADE_train_00000001.png: map size 64x48 differs from its image's 64x64"):
        ds.check_maps()


def test_unknown_colour_in_rgb_map_names_the_file(ade):
    for f in (ade / "annotations" / "training").iterdir():
        Image.fromarray(colorize(np.asarray(Image.open(f)))).save(f)
    rgb = np.asarray(Image.open(ade / "annotations/training/ADE_train_00000004.png")).copy()
    rgb[5, 6] = (1, 2, 3)
    Image.fromarray(rgb).save(ade / "annotations/training/ADE_train_00000004.png")
    ds = ADE20KDataset(ade, "train", resolution=32, conditioning_is_rgb=True)
    with refused(r"ADE_train_00000004.png: colour \(1, 2, 3\) at pixel \(x=6, y=5\)"):
        ds[3]


def test_caption_line_not_json_names_the_line(ade):
    lines = open(ade / "metadata.jsonl").read().splitlines()
    lines[2] = '{"file_name": "ADE_train_00000003.jpg", "text": oops}'
    (ade / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with refused(r"metadata.jsonl line 3 is not JSON"):
        ADE20KDataset(ade, "train", resolution=32, caption_file=ade / "metadata.jsonl")


@pytest.mark.user_error("a caption line without file_name and text", tool=S2I)
def test_caption_line_without_fields_names_the_line(ade):
    (ade / "metadata.jsonl").write_text('{"file_name": "ADE_train_00000001.jpg", "text": "a"}\n["x"]\n')
    with refused(r"metadata.jsonl line 2: expected"):
        ADE20KDataset(ade, "train", resolution=32, caption_file=ade / "metadata.jsonl")


def test_caption_file_name_without_image(ade):
    with open(ade / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "ADE_train_00000099.jpg", "text": "ghost"}) + "\n")
    with refused(r"metadata.jsonl line 7: file_name 'ADE_train_00000099.jpg' has no image"):
        ADE20KDataset(ade, "validation", resolution=32, caption_file=ade / "metadata.jsonl")


@pytest.mark.user_error("a dataset folder without images/training, a missing caption file, an unknown split", tool=S2I)
def test_missing_folders_and_caption_file(ade, tmp_path):
    with refused("images/training does not exist"):
        ADE20KDataset(tmp_path / "nowhere", "train", resolution=32)
    with refused("caption file .*missing.jsonl does not exist"):
        ADE20KDataset(ade, "train", resolution=32, caption_file=ade / "missing.jsonl")
    with refused("unknown split 'test'"):
        ADE20KDataset(ade, "test", resolution=32)
