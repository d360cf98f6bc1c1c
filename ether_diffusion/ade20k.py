"""ADE20K SceneParsing data for semantic-map -> image training (S2I).

Layout (the official ADEChallengeData2016 release):

    ADEChallengeData2016/images/{training,validation}/*.jpg
    ADEChallengeData2016/annotations/{training,validation}/*.png    single-channel labels 0..150, 0 = other

Label maps are turned into the conditioning image with the 150-class ADE20K palette
(`ade20k_palette.csv`, shipped with the package; label 0 "other" is black). With `conditioning_is_rgb=True`
the annotation PNGs are taken as already-coloured maps in that palette and read back into labels first.

Palette ambiguity: the palette gives road (label 7) and skyscraper (label 49) the same colour
(140, 140, 140). Labels -> colours is exact; colours -> labels maps that colour to road, the lower label
value. A coloured map therefore cannot express "skyscraper"; the conditioning image is the same either way.

Random crops come from the sample's own seed: items are looked up by `index` or by `(index, seed)` (the
keys of `data_order.ResumableSampler`), and a crop drawn with `torch.Generator().manual_seed(seed)` does not
depend on the global RNG, on data-loader workers or on which batches a resumed run skipped.

Captions come from a caption file in the `metadata.jsonl` convention of datasets' imagefolder
(`{"file_name": "ADE_train_00000001.jpg", "text": "..."}` per line; entries are matched by the image's file
name, so one file can hold both splits). Without one, a caption is made from the class names present in the
(cropped) map, largest area first: "a photo of wall, floor, bed".

`builtin:tiny-ade20k` (a data folder value, see `builtin.py`) is a tiny random folder in this layout that
the S2I demo writes itself (`tiny_ade20k.py`).
"""
import csv
import json
import logging
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from .crop import resize_and_crop
from .errors import UserError
from .files import IMAGE_EXTENSIONS, image_files, open_image, to_rgb

logger = logging.getLogger(__name__)

NUM_CLASSES = 150  # label values 1..150; 0 is "other"
PALETTE_FILE = Path(__file__).with_name("ade20k_palette.csv")
SPLIT_DIRS = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}


# ----------------------------------------------------------------------------------------------- palette
@lru_cache(maxsize=None)
def load_palette():
    """(colors, names): `colors` is (151, 3) uint8 indexed by label value (row 0 = "other" = black);
    `names[label]` is the class's first name ("road;route" -> "road"), names[0] = "other"."""
    colors = np.zeros((NUM_CLASSES + 1, 3), dtype=np.uint8)
    names = ["other"] + [""] * NUM_CLASSES
    with open(PALETTE_FILE, newline="") as f:
        for row in csv.DictReader(line for line in f if not line.startswith("#")):
            label = int(row["label_value"])
            colors[label] = (int(row["r"]), int(row["g"]), int(row["b"]))
            names[label] = row["name"].split(";")[0]
    colors.setflags(write=False)
    return colors, tuple(names)


def _pack_rgb(rgb):
    """(..., 3) uint8 -> (...) int64 key r<<16 | g<<8 | b, so a colour compares as one number."""
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


@lru_cache(maxsize=None)
def _color_lookup():
    """Sorted unique colour keys and the label of each. np.unique keeps the first occurrence, i.e. the
    lowest label value, which is how the shared road/skyscraper colour resolves to road."""
    colors, _ = load_palette()
    keys, first_label = np.unique(_pack_rgb(colors), return_index=True)
    return keys, first_label.astype(np.uint8)


def colorize(labels, source="label map"):
    """(H, W) integer labels 0..150 -> (H, W, 3) uint8 colours. A label above 150 is a UserError naming
    `source` (a file name in the dataset)."""
    labels = np.asarray(labels)
    if labels.size and labels.max() > NUM_CLASSES:
        raise UserError(f"{source}: label {int(labels.max())} is above {NUM_CLASSES} (ADE20K labels are 0..150, 0 = other)")
    if labels.size and labels.min() < 0:
        raise UserError(f"{source}: negative label {int(labels.min())} (ADE20K labels are 0..150, 0 = other)")
    return load_palette()[0][labels]


def colors_to_labels(rgb, source="colour map"):
    """(H, W, 3) uint8 palette colours -> (H, W) uint8 labels, vectorised (searchsorted over the 151 packed
    colours). Black is 0 ("other"); (140, 140, 140) is road (7), never skyscraper (49). A colour that is not
    in the palette is a UserError naming `source`, the colour and one pixel that has it."""
    keys, key_labels = _color_lookup()
    packed = _pack_rgb(np.asarray(rgb))
    index = np.searchsorted(keys, packed).clip(max=len(keys) - 1)
    unknown = keys[index] != packed
    if unknown.any():
        y, x = (int(v[0]) for v in np.nonzero(unknown))
        color = tuple(int(c) for c in np.asarray(rgb)[y, x])
        raise UserError(f"{source}: colour {color} at pixel (x={x}, y={y}) is not in the ADE20K palette "
                        f"({int(unknown.sum())} pixels have unknown colours)")
    return key_labels[index]


def caption_from_labels(labels):
    """"a photo of wall, floor, bed": the classes present (label 0 left out), largest area first."""
    _, names = load_palette()
    counts = np.bincount(np.asarray(labels).ravel(), minlength=NUM_CLASSES + 1)[1:]
    present = [int(i) + 1 for i in np.argsort(-counts, kind="stable") if counts[i] > 0]
    return "a photo of " + ", ".join(names[label] for label in present) if present else "a photo"


# ----------------------------------------------------------------------------------------------- maps
def read_label_map(path, conditioning_is_rgb=False, expected_size=None) -> np.ndarray:
    """An annotation file as (H, W) uint8 labels 0..150: a single-channel label PNG, or with
    `conditioning_is_rgb` a map coloured in the palette (read back into labels). Every way it can be wrong
    (unreadable, size differs from `expected_size` (its image's), a label above 150, a colour outside the
    palette, an RGB file without the flag) is a UserError naming the file."""
    annotation = open_image(path)
    if expected_size is not None and annotation.size != tuple(expected_size):
        raise UserError(f"{path}: map size {annotation.size[0]}x{annotation.size[1]} differs from "
                        f"its image's {expected_size[0]}x{expected_size[1]}")
    if conditioning_is_rgb:
        return colors_to_labels(np.asarray(annotation.convert("RGB")), source=str(path))
    if annotation.mode not in ("L", "P", "I", "I;16"):
        raise UserError(f"{path}: a {annotation.mode} image is not a label map of values 0..150 "
                        f"(use --conditioning_is_rgb for coloured maps)")
    labels = np.asarray(annotation, dtype=np.int64)
    colorize(labels, source=str(path))  # range check only
    return labels.astype(np.uint8)


def load_control_map(path, resolution, conditioning_is_rgb=False):
    """A map file for validation or sampling: (coloured PIL map, labels), resized and centre-cropped to
    `resolution` exactly as the dataset's centre crop does."""
    _, labels = resize_and_crop(None, Image.fromarray(read_label_map(path, conditioning_is_rgb)), resolution)
    labels = np.asarray(labels)
    return Image.fromarray(colorize(labels)), labels


# ----------------------------------------------------------------------------------------------- dataset
def dataset_folder(root) -> Path:
    """The ADEChallengeData2016 folder, given it or its parent."""
    root = Path(root)
    return root / "ADEChallengeData2016" if (root / "ADEChallengeData2016").is_dir() else root


def has_split(root, split: str) -> bool:
    """Whether the ADEChallengeData2016 folder `root` (or its parent) has images and annotations of `split`."""
    return all((dataset_folder(root) / kind / SPLIT_DIRS[split]).is_dir() for kind in ("images", "annotations"))


def looks_like_ade20k(root) -> bool:
    """Whether `root` is an ADEChallengeData2016 folder (or its parent), as `ADE20KDataset` reads it."""
    root = Path(root)
    return (root / "ADEChallengeData2016").is_dir() or (root / "annotations").is_dir()


def read_caption_file(path, known_file_names):
    """{file name: caption} from a metadata.jsonl file. Names are compared by their last path component.
    Every line must be a JSON object with "file_name" and "text", and every file name must be one of
    `known_file_names` (the images of all splits); otherwise a UserError names the line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"caption file {path} does not exist")
    captions = {}
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {line_number}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{where} is not JSON: {line.strip()[:80]!r}") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str) or not isinstance(entry.get("text"), str):
                raise UserError(f'{where}: expected {{"file_name": ..., "text": ...}}, got {line.strip()[:80]!r}')
            name = Path(entry["file_name"]).name
            if name not in known_file_names:
                raise UserError(f"{where}: file_name {entry['file_name']!r} has no image in the dataset")
            if name in captions:
                raise UserError(f"{where}: file_name {entry['file_name']!r} appears twice")
            captions[name] = entry["text"]
    return captions


class ADE20KDataset(torch.utils.data.Dataset):
    """Image + colourised semantic map + caption, resized and cropped together to `resolution`.

    Every pair and the caption file are checked when the dataset is built, so layout mistakes stop a run
    before training starts. Per-image problems (a label above 150, a map whose size differs from its image,
    an unknown colour in an RGB map) raise a UserError naming the file when the item is loaded, or all at
    once in `check_maps()`, which a trainer calls before it writes anything.

    Keys: `index`, or `(index, seed)` from `data_order.ResumableSampler`: a random crop (`center_crop=False`)
    then comes from that seed alone. Items: `pixel_values` (3, R, R) in [-1, 1], `conditioning_pixel_values`
    (3, R, R) in [0, 1], `labels` (R, R) int64, `caption` (str) and, with a tokenizer, `input_ids` (padded
    to model_max_length).
    """

    def __init__(self, root, split="training", resolution=512, caption_file=None, conditioning_is_rgb=False,
                 max_samples=None, center_crop=True, tokenizer=None):
        root = dataset_folder(root)
        if split not in SPLIT_DIRS:
            raise UserError(f"unknown split {split!r}; use one of {sorted(SPLIT_DIRS)}")
        split_dir = SPLIT_DIRS[split]
        image_dir, annotation_dir = root / "images" / split_dir, root / "annotations" / split_dir
        for folder in (image_dir, annotation_dir):
            if not folder.is_dir():
                raise UserError(f"{folder} does not exist (expected the ADEChallengeData2016 layout "
                                f"images/{split_dir}/*.jpg and annotations/{split_dir}/*.png)")
        images = (image_files(image_dir)[0] if image_dir.is_dir() else [])
        if not images:
            raise UserError(f"{image_dir} holds no images")

        pairs = [(image, annotation_dir / f"{image.stem}.png") for image in images]
        missing = [image for image, annotation in pairs if not annotation.is_file()]
        if missing:
            more = f" ({len(missing) - 1} more images lack one)" if len(missing) > 1 else ""
            raise UserError(f"image {missing[0]} has no annotation {annotation_dir / (missing[0].stem + '.png')}{more}")

        self.caption_file = caption_file
        if caption_file is not None:
            all_images = {p.name for folder in SPLIT_DIRS.values() for p in image_files(root / "images" / folder)[0]
                          if (root / "images" / folder).is_dir()}
            captions = read_caption_file(caption_file, all_images)
            uncaptioned = sum(image.name not in captions for image, _ in pairs)
            self.caption_source = f"captions from {caption_file}"
            if uncaptioned:
                self.caption_source += f" ({uncaptioned} images without an entry get class-name captions)"
        else:
            captions = {}
            self.caption_source = "no caption file: captions are made from the class names in each map"
        logger.info("ADE20K %s: %d pairs, %s", split_dir, len(pairs), self.caption_source)

        self.pairs = pairs[:max_samples] if max_samples is not None else pairs
        self.captions = captions
        self.resolution = resolution
        self.conditioning_is_rgb = conditioning_is_rgb
        self.center_crop = center_crop
        self.tokenizer = tokenizer

    def __len__(self):
        return len(self.pairs)

    def load_labels(self, annotation_path, expected_size):
        """The annotation as a PIL "L" image of labels 0..150 (read back from colours with RGB maps)."""
        return Image.fromarray(read_label_map(annotation_path, self.conditioning_is_rgb, expected_size))

    def check_maps(self, progress=False):
        """Read every map once (labels, colours, size against its image's header) so that a bad file stops a
        run before training starts; the images themselves are not decoded (ADE20K's 20k maps take about a
        minute, the images would take several)."""
        from tqdm.auto import tqdm

        for image_path, annotation_path in tqdm(self.pairs, desc="Checking maps", disable=not progress):
            with open_image(image_path, decode=False) as image:
                size = image.size
            read_label_map(annotation_path, self.conditioning_is_rgb, size)

    def caption_for(self, name, labels):
        """The caption file's text for the image `name` (any suffix: a map's file name will do), or the
        class names of `labels`, largest area first."""
        stem = Path(name).stem
        for suffix in IMAGE_EXTENSIONS:
            if stem + suffix in self.captions:
                return self.captions[stem + suffix]
        return caption_from_labels(labels)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        image_path, annotation_path = self.pairs[index]
        image = to_rgb(open_image(image_path), image_path)
        labels = self.load_labels(annotation_path, image.size)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        image, labels = resize_and_crop(image, labels, self.resolution, center=self.center_crop, generator=generator)
        labels = np.asarray(labels)

        caption = self.caption_for(image_path.name, labels)
        item = {
            "pixel_values": TF.to_tensor(image) * 2.0 - 1.0,
            "conditioning_pixel_values": TF.to_tensor(colorize(labels)),
            "labels": torch.from_numpy(labels.astype(np.int64)),
            "caption": caption,
        }
        if self.tokenizer is not None:
            item["input_ids"] = self.tokenizer(caption, max_length=self.tokenizer.model_max_length, padding="max_length",
                                               truncation=True, return_tensors="pt").input_ids[0]
        return item
