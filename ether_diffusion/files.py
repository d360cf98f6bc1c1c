"""Files, read and written one way everywhere: an unreadable image is a `UserError` naming it, and whatever
we write (an image, a built-in folder) appears complete or not at all."""
import contextlib
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
def atomic_path(path):
    """Yield a temporary file name in `path`'s folder (same suffix, so writers that go by the suffix work);
    once the block succeeds it is renamed to `path`, if it fails it is removed. An interrupted run never
    leaves a partial file that a rerun would take as done, and a concurrent reader never sees one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_image(image: Image.Image, path, **save_kwargs) -> Path:
    """Write an image atomically (`atomic_path`)."""
    with atomic_path(path) as tmp:
        image.save(tmp, **save_kwargs)
    return Path(path)


def write_text(path, text: str) -> Path:
    """Write a text file (UTF-8) atomically (`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def replace_folder(src, dst):
    """Rename the finished folder `src` to `dst`; an older `dst` is swapped out first and then deleted, so
    `dst` is always either the old folder or the new one, complete."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        old = dst.with_name(dst.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def write_folder(target, build) -> Path:
    """`build(folder)` in a temporary folder beside `target`, then put in place with `replace_folder`
    (replacing an older `target`): a failed or interrupted build leaves `target` as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{target.name}-"))
    try:
        build(tmp)
        replace_folder(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


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
