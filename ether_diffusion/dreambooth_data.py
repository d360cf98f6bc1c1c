"""DreamBooth data: the subject's images, the class images of prior preservation, and their generation.

Images are checked when the folder is read (before any model is loaded): a file with an image extension that
PIL cannot decode is an error naming the file; other files are skipped with a warning. Reading and writing
go through `files.py`.
"""
import hashlib
import itertools
import logging
import re
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

# A generated class image: `<index>-<hash of its pixels>.jpg`, made from seed + index (`generate_class_images`).
CLASS_IMAGE_RE = re.compile(r"^(\d{5})-[0-9a-f]{12}\.jpg$")


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


# Below one latent pixel (the VAE's factor 8) a photo shows nothing of the subject: a 1x1 file is a mistake
# (a thumbnail or placeholder), not a photo to upscale to --resolution.
MIN_IMAGE_SIDE = 8


def check_images(paths):
    """Every image decodes and is at least `MIN_IMAGE_SIDE` pixels on each side."""
    for p in paths:
        width, height = load_rgb(p).size
        if min(width, height) < MIN_IMAGE_SIDE:
            raise UserError(f"{p} is {width}x{height} pixels: too small to train on (at least "
                            f"{MIN_IMAGE_SIDE} on each side; give the photo itself)")


def check_class_dir(class_dir, instance_dir):
    """Generated class images must not land among the subject's photos: they would count as the subject's, and
    every later run would train on them. (Only a folder's own files are read, so nested folders do not mix.)"""
    if Path(class_dir).resolve() == Path(instance_dir).resolve():
        raise UserError(f"--class_data_dir {class_dir} is the --instance_data_dir: class images are generated into it "
                        "and would be read as photos of the subject; use a folder of its own for the class images")


def class_images(class_dir, num_class_images: int) -> list[Path]:
    """The `num_class_images` class images training uses (in name order: generated ones by index), all of
    them: a folder with fewer (a generation that did not finish) is an error, never a run on fewer."""
    images = list_images(class_dir, what="class")[:num_class_images]
    if len(images) < num_class_images:
        raise UserError(f"class image folder {class_dir} has {len(images)} images, fewer than --num_class_images "
                        f"{num_class_images}")
    return images


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
    loading anything. Image i is seeded with `seed + i` (the set does not depend on the batch size), and a
    lost one is made again under its own index (`missing_class_indices`): a resumed run trains on the same
    images as the run it continues. With several processes each makes every num_processes-th image. Files
    are written under a temporary name and renamed, so an interrupted run leaves no half-written image behind.
    """
    class_dir = Path(class_dir)
    class_dir.mkdir(parents=True, exist_ok=True)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    todo_all = missing_class_indices(class_dir, num_class_images)
    if accelerator is not None:
        accelerator.wait_for_everyone()  # every process has counted before any writes
    if not todo_all:
        return 0
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    todo = todo_all[rank::world]
    logger.info("generating %d class images of %r in %s", len(todo_all), class_prompt, class_dir)

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


def missing_class_indices(class_dir: Path, num_class_images: int) -> list[int]:
    """The indices of the generated class images `class_dir` needs to hold `num_class_images`. The user's own
    images count first and ours are numbered from after them; a lost one of ours (a gap) is made again under
    its own index, so the set is the one an uninterrupted run had."""
    images, _ = image_files(class_dir)
    ours = {int(m[1]) for p in images if (m := CLASS_IMAGE_RE.match(p.name))}
    users = len(images) - len(ours)
    needed = num_class_images - len(images)
    free = (i for i in itertools.count(min([users, *ours])) if i not in ours)
    return list(itertools.islice(free, max(needed, 0)))
