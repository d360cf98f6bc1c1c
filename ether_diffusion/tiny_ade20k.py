"""A tiny ADE20K-layout folder (random label maps + matching images + captions): `builtin:tiny-ade20k`, the
S2I demo's data, and the fixture the dataset, trainer and evaluator tests share."""
import json
from pathlib import Path

import numpy as np
from PIL import Image

from .ade20k import caption_from_labels, colorize

# A few common ADE20K classes: wall, sky, floor, tree, road, bed, person.
FIXTURE_CLASSES = (1, 3, 4, 5, 7, 8, 13)


def _random_label_map(rng, size):
    """A background class plus a few rectangles of other classes and a strip of 0 ("other")."""
    labels = np.full((size, size), rng.choice(FIXTURE_CLASSES), dtype=np.uint8)
    for _ in range(3):
        y0, x0 = rng.integers(0, size // 2, size=2)
        h, w = rng.integers(size // 4, size // 2 + 1, size=2)
        labels[y0:y0 + h, x0:x0 + w] = rng.choice(FIXTURE_CLASSES)
    labels[-max(1, size // 16):, :] = 0
    return labels


def write_tiny_ade20k(root, n_train=4, n_val=2, size=64, seed=0, captions=True) -> Path:
    """Write `root/ADEChallengeData2016` with `n_train` / `n_val` pairs of size x size images and label
    PNGs (mode "L", values 0..150). Each image is its map's palette colours plus noise, so image and map
    agree. With `captions`, `metadata.jsonl` (both splits, imagefolder convention) is written beside
    `images/` and `annotations/`. Returns the ADEChallengeData2016 folder."""
    rng = np.random.default_rng(seed)
    dataset = Path(root) / "ADEChallengeData2016"
    entries = []
    for split, prefix, count in (("training", "ADE_train", n_train), ("validation", "ADE_val", n_val)):
        (dataset / "images" / split).mkdir(parents=True, exist_ok=True)
        (dataset / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(1, count + 1):
            name = f"{prefix}_{i:08d}"
            labels = _random_label_map(rng, size)
            noise = rng.integers(-20, 21, size=(size, size, 3))
            image = (colorize(labels).astype(np.int64) + noise).clip(0, 255).astype(np.uint8)
            Image.fromarray(image).save(dataset / "images" / split / f"{name}.jpg", quality=95)
            Image.fromarray(labels).save(dataset / "annotations" / split / f"{name}.png")
            entries.append({"file_name": f"{name}.jpg", "text": caption_from_labels(labels).replace("a photo", "a room", 1)})
    if captions:
        with open(dataset / "metadata.jsonl", "w") as f:
            f.writelines(json.dumps(entry) + "\n" for entry in entries)
    return dataset
