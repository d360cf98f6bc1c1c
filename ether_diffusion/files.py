"""Files, read and written one way everywhere: an unreadable image is a `UserError` naming it, and whatever
we write (an image, a record, a built-in folder) appears complete or not at all."""
import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from PIL import Image, ImageOps

from .errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def image_files(folder) -> tuple[list[Path], list[Path]]:
    """(image files, other files) directly in `folder`, sorted; hidden files (our temporary ones among them)
    and sub-folders are ignored."""
    images, others = [], []
    for p in sorted(Path(folder).iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        (images if p.suffix.lower() in IMAGE_EXTENSIONS else others).append(p)
    return images, others


def open_image(path, decode: bool = True) -> Image.Image:
    """The image at `path`, decoded now (a truncated file fails here, not mid-run), or with `decode=False`
    only its header read (size and mode)."""
    try:
        image = Image.open(path)
        if decode:
            image.load()
        return image
    except FileNotFoundError:
        raise UserError(f"{path}: image file does not exist") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: cannot read image ({e})") from None


def load_rgb(path) -> Image.Image:
    """The image at `path` as RGB, with its EXIF orientation applied (phone photos are stored sideways)."""
    with open_image(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


@contextlib.contextmanager
def replaced_atomically(path):
    """Yields a temporary path in `path`'s folder to write to; on success it is renamed to `path`, on any
    error removed. An interrupted write never leaves a partial file that a rerun would take as done, and a
    concurrent reader sees the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_image(image: Image.Image, path, **save_kwargs) -> Path:
    """Write an image atomically (`replaced_atomically`)."""
    with replaced_atomically(path) as tmp:
        image.save(tmp, **save_kwargs)
    return Path(path)


def save_text(text: str, path) -> Path:
    """Write a text file (a record, a report) atomically (`replaced_atomically`)."""
    with replaced_atomically(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(path)


def json_safe(value):
    """`value` with NaN and infinities (not JSON) replaced by None, in nested dicts and lists too."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def save_json(value, path) -> Path:
    """A record as JSON, atomically; NaN and infinities become null (they are not JSON)."""
    return save_text(json.dumps(json_safe(value), indent=1, allow_nan=False) + "\n", path)


def read_json(path):
    """The JSON in `path`, or None when it is missing or unreadable (a record never written)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def build_folder_once(target, build) -> Path:
    """`target`, made by `build(folder)` in a temporary folder beside it and renamed into place unless it
    exists. Processes that start together (evaluation workers, say) never see a half-built folder: one
    rename wins and the others drop their copies, which are as good."""
    target = Path(target)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{target.name}-"))
    try:
        build(tmp)
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():  # not a lost race: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
