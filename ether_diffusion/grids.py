"""Sample grids, made one way for the trainers' validation, `python -m ether_diffusion.sample`, the S2I
pipeline and the evaluators: rows are prompts (or maps), columns are images.

Every row starts from the same seed (a CPU generator: the same noise on any device), so column j of every
row starts from the same noise and rows compare prompts.
"""
import math
from pathlib import Path

import torch
from PIL import Image

from .files import save_image


def image_grid(images, rows: int | None = None, cols: int | None = None) -> Image.Image:
    """Paste equally sized images into a rows x cols grid (row-major)."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    if cols is None:
        cols = math.ceil(len(images) / rows) if rows else len(images)
    if rows is None:
        rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB").resize((w, h)), ((i % cols) * w, (i // cols) * h))
    return grid


def save_grid(grid: Image.Image, path) -> Path:
    """A grid written whole or not at all (`files.save_image`)."""
    return save_image(grid, path)


def sample_grid(pipe, prompts, num_images: int, seed: int = 0, num_inference_steps: int = 25,
                guidance_scale: float = 7.5, height=None, width=None):
    """`num_images` per prompt from a `StableDiffusionPipeline`; returns (grid, rows of PIL images)."""
    rows = []
    for prompt in prompts:
        generator = torch.Generator("cpu").manual_seed(seed)
        out = pipe(prompt, num_images_per_prompt=num_images, generator=generator,
                   num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height, width=width)
        rows.append(out.images)
    return image_grid([im for row in rows for im in row], rows=len(rows), cols=num_images), rows


def sample_subject_grid(pipe, adapter_names, prompts, num_images: int, seed: int = 0, **kwargs):
    """`sample_grid` for several adapters of one pipeline (`adapter_batch`): a row per adapter and prompt
    (adapter-major), each the row that adapter alone gives; one batch per prompt holds every adapter's images."""
    from .adapter_batch import generate

    rows = {}
    for p, prompt in enumerate(prompts):
        k = len(adapter_names)
        images = generate(pipe, [prompt] * k, adapter_names, [seed] * k, num_images_per_prompt=num_images, **kwargs).images
        for a in range(k):
            rows[a, p] = images[a * num_images:(a + 1) * num_images]
    rows = [rows[key] for key in sorted(rows)]
    return image_grid([im for row in rows for im in row], rows=len(rows), cols=num_images), rows


def control_grid(control_images, generated, images_per_map: int = 1, real_images=None) -> Image.Image:
    """One row per map: map | its generated image(s) [| its real picture], maps resized (nearest) to the
    generated size."""
    size = generated[0].size
    cells = []
    for i, control in enumerate(control_images):
        cells.append(control.convert("RGB").resize(size, Image.NEAREST))
        cells.extend(generated[i * images_per_map:(i + 1) * images_per_map])
        if real_images is not None:
            cells.append(real_images[i].convert("RGB").resize(size, Image.BICUBIC))
    return image_grid(cells, rows=len(control_images), cols=1 + images_per_map + (real_images is not None))


def sample_control_grid(s2i, prompts, control_images, num_images: int, seed: int = 0,
                        num_inference_steps: int = 25, guidance_scale: float = 7.5, height=None, width=None,
                        real_images=None):
    """One row per map from a `control.S2IPipeline`: map | `num_images` images generated from it and its
    prompt [| the map's real picture]; every row starts from the same seed, so the columns compare maps."""
    images = []
    for prompt, control in zip(prompts, control_images, strict=True):
        generator = torch.Generator("cpu").manual_seed(seed)
        images += s2i(prompt, control, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      generator=generator, height=height, width=width, num_images_per_prompt=num_images)
    return control_grid(control_images, images, images_per_map=num_images, real_images=real_images)
