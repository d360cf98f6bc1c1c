"""DreamBooth data: the subject's images, the class images of prior preservation, and their generation.

Images are checked when the folder is read (before any model is loaded): a file with an image extension that
PIL cannot decode is an error naming the file; other files are skipped with a warning. Reading and writing
go through `files.py`.
"""
import hashlib
import logging
from functools import partial
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from tqdm.auto import tqdm

from . import processes
from .crop import resize_and_crop
from .errors import UserError, writing
from .files import IMAGE_EXTENSIONS, image_files, load_rgb, save_image

logger = logging.getLogger(__name__)


def list_images(folder, what: str = "instance") -> list[Path]:
    """The images of a folder that must have some; non-image files are skipped with a warning."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{what} image folder not found: {folder}")
    images, others = image_files(folder)
    for p in others:
        logger.warning("skipping %s: not an image file", p)
    if not images:
        raise UserError(f"{what} image folder {folder} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    return images


def check_images(paths):
    for p in paths:
        load_rgb(p)


class SubjectDataset(torch.utils.data.Dataset):
    """Instance images (and class images for prior preservation), resized and cropped to `size`, in [-1, 1].

    Prompts are not here: they are the same for every example, so the trainer encodes them once.
    Keys are `index` or `(index, sample_seed)` (see `data_order.ResumableSampler`): the random crop then comes
    from that seed, not from the global RNG. The length is that of the larger set, as in diffusers.
    """

    def __init__(self, instance_images, class_images=None, size: int = 512, center_crop: bool = False):
        self.instance_images = list(instance_images)
        self.class_images = list(class_images or [])
        self.size = size
        self.center_crop = center_crop

    def __len__(self):
        return max(len(self.instance_images), len(self.class_images))

    def transform(self, image: Image.Image, generator=None) -> torch.Tensor:
        image, _ = resize_and_crop(image, None, self.size, center=self.center_crop, generator=generator)
        return TF.normalize(TF.to_tensor(image), [0.5], [0.5])

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        example = {"instance_images": self.transform(load_rgb(self.instance_images[index % len(self.instance_images)]),
                                                     generator)}
        if self.class_images:
            example["class_images"] = self.transform(load_rgb(self.class_images[index % len(self.class_images)]),
                                                     generator)
        return example


def _collate(examples, with_prior_preservation: bool):
    # Instance and class images in one batch (instances first): one UNet forward for both losses.
    pixels = [e["instance_images"] for e in examples]
    if with_prior_preservation:
        pixels += [e["class_images"] for e in examples]
    return {"pixel_values": torch.stack(pixels).contiguous().float(), "num_instance": len(examples)}


def collate_fn(with_prior_preservation: bool):
    return partial(_collate, with_prior_preservation=with_prior_preservation)


def generate_class_images(load_pipe, class_dir, class_prompt: str, num_class_images: int, *,
                          sample_batch_size: int = 4, num_inference_steps: int = 50, resolution=None,
                          seed: int = 0, accelerator=None) -> int:
    """Fill `class_dir` up to `num_class_images` images of `class_prompt`; returns how many were made.

    `load_pipe()` is only called when images are missing, so a second run reuses the saved images without
    loading anything. Image i is seeded with `seed + i` (the set does not depend on the batch size); with
    several processes each makes every num_processes-th image. Files are written under a temporary name
    and renamed, so an interrupted run leaves no half-written image behind.
    """
    class_dir = Path(class_dir)
    class_dir.mkdir(parents=True, exist_ok=True)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    existing, _ = image_files(class_dir)
    if accelerator is not None:
        accelerator.wait_for_everyone()  # every process has counted before any writes
    if len(existing) >= num_class_images:
        return 0
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    todo = list(range(len(existing), num_class_images))[rank::world]
    logger.info("generating %d class images of %r in %s", num_class_images - len(existing), class_prompt, class_dir)

    def generate():
        pipe = load_pipe()
        pipe.set_progress_bar_config(disable=True)
        show = accelerator is None or accelerator.is_local_main_process
        with tqdm(total=len(todo), desc="Generating class images", disable=not show) as bar:
            for start in range(0, len(todo), sample_batch_size):
                batch = todo[start:start + sample_batch_size]
                generators = [torch.Generator("cpu").manual_seed(seed + i) for i in batch]
                images = pipe([class_prompt] * len(batch), generator=generators,
                              num_inference_steps=num_inference_steps, height=resolution, width=resolution).images
                for i, image in zip(batch, images):
                    path = class_dir / f"{i:05d}-{hashlib.sha1(image.tobytes()).hexdigest()[:12]}.jpg"
                    with writing(path):
                        save_image(image, path, format="JPEG", quality=95)
                bar.update(len(batch))

    if accelerator is None:
        generate()
    else:  # every process makes its share; a failure on one (a full disk) stops them all
        processes.everywhere(accelerator, generate)
    return len(todo)
