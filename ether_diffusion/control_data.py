"""ControlNet-style training data for the S2I trainer, read as diffusers' `examples/controlnet/train_controlnet.py`
reads it: rows of (target image, conditioning image, caption) from a `datasets` dataset.

Where the rows come from (`--dataset_name` or `--train_data_dir`, one of them):

- `--dataset_name`: a hub id (fill50k's `fusing/fill50k`, with `--dataset_config_name`), a folder written by
  `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, or any local folder `datasets.load_dataset` reads;
- `--train_data_dir`: an imagefolder with `metadata.jsonl`, e.g.

      {"file_name": "images/0.png", "conditioning_image_file_name": "conditioning_images/0.png", "text": "..."}

  (datasets names the columns image, conditioning_image, text; a plain `"conditioning_image": "path"` key is
  read as a file path relative to the folder), or a `save_to_disk` folder. A folder in the
  ADEChallengeData2016 layout stays on the ADE20K path (`ade20k.py`): label maps coloured with the palette.

The columns are `--image_column`, `--conditioning_image_column` and `--caption_column` (diffusers' defaults
image, conditioning_image, text); the split is `train`. The conditioning image may be any picture (edges,
depth, poses, scribbles): it reaches the signal encoder as RGB in [0, 1], resized and cropped with its image
(bilinear, as diffusers resizes it). A caption may be a string or a list of strings (one drawn per sample).

Keys are `index` or `(index, seed)` from `data_order.ResumableSampler`, as in `ade20k.ADE20KDataset`: the
crop, the caption drawn from a list and `--proportion_empty_prompts` all come from the sample's own seed,
so a resumed run reads exactly what the uninterrupted one did.

`datasets` is imported only when such data is asked for; without it the run stops in one line before any work.
"""
import logging
import random
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from . import packages
from .ade20k import looks_like_ade20k
from .crop import resize_and_crop
from .errors import UserError, first_line
from .files import load_rgb, open_image, to_rgb

logger = logging.getLogger(__name__)

METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what Dataset(Dict).save_to_disk writes first
# the ADE20K path's flags, and what ControlNet-style data has instead
ADE20K_ONLY = {"caption_file": "captions come from --caption_column",
               "conditioning_is_rgb": "conditioning images are read as RGB pictures",
               "validation_maps": "use --validation_image"}
# diffusers' column flags and their defaults
COLUMNS = {"image_column": "image", "conditioning_image_column": "conditioning_image", "caption_column": "text"}


# ----------------------------------------------------------------------------------------------- which path
def is_saved_dataset(folder: Path) -> bool:
    return any((folder / name).is_file() for name in SAVED_MARKERS)


def is_datasets_folder(folder: Path) -> bool:
    """A folder `datasets` reads as ControlNet data: an imagefolder's metadata file (at its top or in a
    split's folder) or a `save_to_disk` folder; never the ADEChallengeData2016 layout."""
    if not folder.is_dir() or looks_like_ade20k(folder):
        return False
    places = [folder, *(p for p in folder.iterdir() if p.is_dir())]
    return is_saved_dataset(folder) or any((p / name).is_file() for p in places for name in METADATA_FILES)


def wants_control_data(args) -> bool:
    """Whether the run reads ControlNet-style data (else ADE20K label maps)."""
    return args.dataset_name is not None or (
        args.train_data_dir is not None and is_datasets_folder(Path(args.train_data_dir).expanduser()))


def source_flag(args) -> str:
    return "--dataset_name" if args.dataset_name is not None else "--train_data_dir"


# ----------------------------------------------------------------------------------------------- checks
def check_args(args):
    """While parsing: each path's flags that the other would ignore, and for ControlNet-style data the
    package and diffusers' validation pairing."""
    if not wants_control_data(args):
        defaults = {**COLUMNS, "dataset_config_name": None, "validation_image": None}
        given = [flag for flag, default in defaults.items() if getattr(args, flag) != default]
        if given:
            raise UserError(f"--{given[0]} is for ControlNet-style data (--dataset_name, or a --train_data_dir with "
                            f"metadata.jsonl), but {args.train_data_dir} is read as ADE20K label maps"
                            + (": use --validation_maps" if given[0] == "validation_image" else ""))
        return
    if not packages.installed("datasets"):
        raise UserError(f"{source_flag(args)} is read with the datasets package, which is not installed: "
                        "pip install datasets")
    for flag, instead in ADE20K_ONLY.items():
        if getattr(args, flag):
            raise UserError(f"--{flag} is for ADE20K label maps, not ControlNet-style data ({source_flag(args)}): {instead}")
    if args.validation_prompt and not args.validation_image:
        raise UserError("--validation_prompt needs --validation_image with ControlNet-style data (diffusers' rule); "
                        "leave both out to sample the first training rows with their captions")
    if args.validation_image:
        check_pairing(len(args.validation_image), len(args.validation_prompt or []))


def check_pairing(images: int, prompts: int):
    """diffusers' rule: one image for all prompts, one prompt for all images, or as many of each."""
    if prompts == 0:
        raise UserError("--validation_image needs --validation_prompt (diffusers' rule): one for all images or one each")
    if images != 1 and prompts != 1 and images != prompts:
        raise UserError(f"{images} --validation_image and {prompts} --validation_prompt: give one image, one prompt, "
                        "or as many prompts as images")


def pair_validation(images: list, prompts: list) -> tuple[list, list]:
    """The (images, prompts) rows of a validation grid, by `check_pairing`'s rule."""
    check_pairing(len(images), len(prompts))
    n = max(len(images), len(prompts))
    return (images * n if len(images) == 1 else images), (prompts * n if len(prompts) == 1 else prompts)


# ----------------------------------------------------------------------------------------------- loading
def load_rows(args):
    """The `train` split of `--dataset_name` / `--train_data_dir` as a `datasets.Dataset`. A hub id that is not
    cached while the hub is offline, a missing folder, a failed load: one line each."""
    import datasets
    from huggingface_hub import constants

    flag, source = source_flag(args), args.dataset_name or args.train_data_dir
    folder = Path(source).expanduser()
    if source.startswith(("/", ".", "~")) and not folder.exists():
        raise UserError(f"{flag} {source}: no such folder")
    try:
        if is_saved_dataset(folder):
            if args.dataset_config_name is not None:
                raise UserError(f"--dataset_config_name: {source} was saved by save_to_disk and has no configs")
            loaded = datasets.load_from_disk(str(folder))
        else:
            loaded = datasets.load_dataset(source, args.dataset_config_name, cache_dir=args.cache_dir)
    except UserError:
        raise
    except ConnectionError as e:
        if constants.HF_HUB_OFFLINE:
            raise UserError(f"{flag} {source} is not in the datasets cache and the hub is offline (HF_HUB_OFFLINE=1): "
                            "unset it to download the dataset, or give a local folder") from None
        raise UserError(f"{flag} {source}: cannot reach the hub ({first_line(e)})") from None
    except Exception as e:  # not found, no data files, a bad config name: all one line
        raise UserError(f"{flag} {source}: cannot load it ({type(e).__name__}: {first_line(e)})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise UserError(f"{flag} {source} has no train split (its splits: {', '.join(loaded)})")
        loaded = loaded["train"]
    return loaded


def check_columns(rows, args, source: str):
    for flag in COLUMNS:
        if getattr(args, flag) not in rows.column_names:
            raise UserError(f"--{flag} {getattr(args, flag)!r}: {source} has no such column "
                            f"(its columns: {', '.join(rows.column_names)})")


class ControlDataset(torch.utils.data.Dataset):
    """Image + conditioning image + caption rows, resized and cropped together to `resolution`.

    Items: `pixel_values` (3, R, R) in [-1, 1], `conditioning_pixel_values` (3, R, R) in [0, 1] and `caption`
    (str), keyed like `ade20k.ADE20KDataset` (see the module docstring)."""

    def __init__(self, rows, columns: tuple[str, str, str], resolution: int, center_crop: bool, source: str,
                 root: Path | None = None):
        self.rows = rows
        self.image_column, self.conditioning_column, self.caption_column = columns
        self.resolution = resolution
        self.center_crop = center_crop
        self.source = source
        self.root = root  # where file paths in string columns are relative to (a local dataset's folder)

    @classmethod
    def from_args(cls, args):
        rows = load_rows(args)
        source = args.dataset_name or args.train_data_dir
        check_columns(rows, args, source)
        if args.max_train_samples is not None:
            rows = rows.select(range(min(args.max_train_samples, len(rows))))
        if len(rows) == 0:
            raise UserError(f"{source_flag(args)} {source} has no rows")
        folder = Path(source).expanduser()
        dataset = cls(rows, tuple(getattr(args, f) for f in COLUMNS), args.resolution, args.center_crop, source,
                      root=folder if folder.is_dir() else None)
        dataset[0, 0]  # the first row decodes (its columns hold images and a caption), before any work
        logger.info("ControlNet-style data %s: %d rows, columns %s", source, len(dataset), ", ".join(dataset.columns()))
        return dataset

    def columns(self) -> tuple[str, str, str]:
        return self.image_column, self.conditioning_column, self.caption_column

    def __len__(self):
        return len(self.rows)

    def image(self, row: dict, column: str, index: int):
        """The RGB picture in `column`: an `Image` feature (decoded by datasets) or a file path."""
        value = row[column]
        where = f"{self.source} row {index}, column {column!r}"
        if isinstance(value, str):
            path = Path(value) if Path(value).is_absolute() or self.root is None else self.root / value
            return to_rgb(open_image(path), path)
        if not hasattr(value, "convert"):
            raise UserError(f"{where}: a {type(value).__name__}, not an image or an image file's path")
        return to_rgb(value, where)

    def caption(self, row: dict, index: int, generator=None) -> str:
        """The caption, or one of a list of captions: drawn from `generator`, the first without one (diffusers)."""
        value = row[self.caption_column]
        if isinstance(value, str):
            return value
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            return value[int(torch.randint(len(value), (1,), generator=generator))] if generator is not None else value[0]
        raise UserError(f"{self.source} row {index}, column {self.caption_column!r}: captions are strings or lists of "
                        f"strings, not {type(value).__name__}")

    def pair(self, index: int, generator=None, center: bool | None = None):
        """((image, conditioning image), row) of row `index`, resized and cropped together (centred with
        `center`, default --center_crop); a conditioning image of another size is first resized to its image's."""
        row = self.rows[index]
        image = self.image(row, self.image_column, index)
        control = self.image(row, self.conditioning_column, index)
        if control.size != image.size:
            control = control.resize(image.size, Image.BILINEAR)
        center = self.center_crop if center is None else center
        return resize_and_crop(image, control, self.resolution, center=center, generator=generator,
                               label_interpolation=InterpolationMode.BILINEAR), row

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        (image, control), row = self.pair(index, generator)
        return {"pixel_values": TF.to_tensor(image) * 2.0 - 1.0, "conditioning_pixel_values": TF.to_tensor(control),
                "caption": self.caption(row, index, generator)}


def validation_inputs(args, dataset: ControlDataset) -> tuple[list, list[str], list | None]:
    """(conditioning images at the resolution, prompts, real pictures or None) for the grids, read before
    training: the --validation_image files with --validation_prompt (diffusers' pairing), else the first
    --num_validation_maps training rows with their captions and images."""
    if args.validation_image:
        images = [resize_and_crop(load_rgb(path), None, args.resolution)[0] for path in args.validation_image]
        return *pair_validation(images, list(args.validation_prompt)), None
    rows = range(min(args.num_validation_maps, len(dataset)))
    pairs = [dataset.pair(i, center=True) for i in rows]
    return ([images[1] for images, _ in pairs], [dataset.caption(row, i) for i, (_, row) in zip(rows, pairs)],
            [images[0] for images, _ in pairs])


# ----------------------------------------------------------------------------------------------- empty prompts
class EmptyPrompts(torch.utils.data.Dataset):
    """`dataset` with a `proportion` of its captions replaced by "" (diffusers' --proportion_empty_prompts, the
    ControlNet paper's 50% that teaches the encoder to read the conditioning alone). Whether a sample's caption
    goes is drawn from its own seed, so a resumed run drops the same ones; items looked up without a seed
    keep theirs."""

    def __init__(self, dataset, proportion: float):
        self.dataset = dataset
        self.proportion = proportion

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        item = self.dataset[key]
        if isinstance(key, tuple) and random.Random(key[1]).random() < self.proportion:
            item["caption"] = ""
        return item


def with_empty_prompts(dataset, proportion: float):
    return EmptyPrompts(dataset, proportion) if proportion > 0 else dataset
