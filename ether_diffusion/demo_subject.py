"""A subject the project draws itself, for the demo and tests: "qwe toy", a red round creature with big eyes,
a yellow star on its belly and blue feet, seen at different places, sizes and backgrounds.

`instance_data_dir: builtin:demo-subject` (see `builtin.py` and `configs/dreambooth/demo.yaml`) makes the
DreamBooth trainer write these images into `<output_dir>/demo-subject/` on first use, so the demo needs no
download.
"""
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

from .files import save_image

BACKGROUNDS = [(186, 220, 240), (235, 225, 190), (200, 235, 200), (240, 205, 215), (215, 210, 240), (230, 230, 230)]
FLOORS = [(120, 95, 70), (90, 140, 80), (150, 150, 160), (200, 180, 140)]


def _star(cx, cy, r_out, r_in, points=5, phase=-math.pi / 2):
    pts = []
    for i in range(2 * points):
        r = r_out if i % 2 == 0 else r_in
        a = phase + i * math.pi / points
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def draw_subject(size: int = 64, seed: int = 0) -> Image.Image:
    """One picture of the subject; the pose, place, size and background follow from `seed`."""
    rng = random.Random(seed)
    s = size * 4  # draw large, then downsample: smooth edges
    bg = BACKGROUNDS[rng.randrange(len(BACKGROUNDS))]
    im = Image.new("RGB", (s, s), bg)
    d = ImageDraw.Draw(im)
    horizon = int(s * rng.uniform(0.55, 0.8))
    if rng.random() < 0.7:
        d.rectangle([0, horizon, s, s], fill=FLOORS[rng.randrange(len(FLOORS))])
    r = s * rng.uniform(0.2, 0.3)  # body radius
    cx = s * rng.uniform(0.35, 0.65)
    cy = min(horizon - r * 0.55, s - r * 1.25) + rng.uniform(-0.05, 0.05) * s
    look = rng.uniform(-0.35, 0.35)  # where the eyes look, as a fraction of the radius
    # feet, body, star, eyes
    for fx in (-0.45, 0.45):
        d.ellipse([cx + fx * r - 0.3 * r, cy + 0.8 * r, cx + fx * r + 0.3 * r, cy + 1.15 * r], fill=(40, 70, 200))
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(215, 35, 40), outline=(120, 15, 20), width=max(2, s // 96))
    d.polygon(_star(cx, cy + 0.35 * r, 0.38 * r, 0.16 * r), fill=(250, 210, 30))
    for ex in (-0.38, 0.38):
        x, y = cx + ex * r, cy - 0.25 * r
        d.ellipse([x - 0.25 * r, y - 0.25 * r, x + 0.25 * r, y + 0.25 * r], fill="white")
        px = x + look * 0.2 * r
        d.ellipse([px - 0.11 * r, y - 0.11 * r, px + 0.11 * r, y + 0.11 * r], fill="black")
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return im.resize((size, size), Image.Resampling.LANCZOS)


def draw_demo_subject(num_images: int = 5, size: int = 64, seed: int = 0) -> list[Image.Image]:
    return [draw_subject(size, seed=seed * 1000 + i) for i in range(num_images)]


def write_demo_subject(folder, num_images: int = 5, size: int = 64, seed: int = 0) -> Path:
    """Write the subject's pictures as `folder/qwe-toy-NN.png` unless they are there already.

    Each file appears complete or not at all (`save_image`), so processes starting together never read a
    half-written image."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(draw_demo_subject(num_images, size, seed)):
        path = folder / f"qwe-toy-{i:02d}.png"
        if path.is_file():
            continue
        save_image(image, path)
    return folder
