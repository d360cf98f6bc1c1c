"""Files, read and written one way everywhere: an unreadable image is a `UserError` naming it, and whatever
we write (an image, a built-in folder) appears complete or not at all."""
import contextlib
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageOps

from .errors import UserError, first_line

TEMPORARY_PREFIX = ".tmp-"  # what `atomic_path` and the folder builders name their temporaries
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def image_files(folder) -> tuple[list[Path], list[Path]]:
    """(image files, other files) directly in `folder`, sorted; hidden files (our temporary ones among them)
    and sub-folders are ignored, a link to nothing is an error."""
    images, others = [], []
    for p in sorted(Path(folder).iterdir()):
        if p.is_symlink() and not p.exists():  # skipped, it would leave the set smaller without a word
            raise UserError(f"{p} is a symbolic link to {os.readlink(p)}, which does not exist")
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
    """The image at `path` as 8-bit RGB, with its EXIF orientation applied (phone photos are stored sideways)."""
    with open_image(path) as image:
        return to_rgb(ImageOps.exif_transpose(image), path)


def to_rgb(image: Image.Image, path) -> Image.Image:
    """`image` (read from `path`) as 8-bit RGB. Single-channel 16-bit and float images are scaled from their
    full range (0..65535, or 0..1 for float) to 0..255: PIL's own convert("RGB") clips them, which reads a
    16-bit PNG as almost all white and a float TIFF as black. Values outside that range (or NaN) cannot be
    read one right way, so they are refused with the file and mode named. (16-bit RGB PNGs PIL already reads
    as 8-bit RGB.)"""
    mode = image.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64)
        top = 1.0 if mode == "F" else 65535.0
        if not np.isfinite(values).all():
            raise UserError(f"{path}: a mode {mode} image with NaN or infinite values")
        if values.size and (values.min() < 0 or values.max() > top):
            raise UserError(f"{path}: a mode {mode} image with values {values.min():g}..{values.max():g}, outside "
                            f"0..{top:g}: save it as an 8-bit image")
        image = Image.fromarray(np.round(values * (255 / top)).astype(np.uint8))
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise UserError(f"{path}: cannot read a mode {mode} image as RGB ({e})") from None


def _file_in_the_way(path) -> Path | None:
    """`path` itself or the nearest existing folder above it, if that is a file (nothing can be written there)."""
    for p in [Path(path), *Path(path).parents]:
        if p.exists():
            return None if p.is_dir() else p
    return None


def _check_writable(folder, what: str):
    """`folder`, or the nearest folder above it that exists (where it would be made), can be written: checked
    before the work whose result would go there, not found out when it is written."""
    existing = next(p for p in [Path(folder), *Path(folder).parents] if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what}: {existing} is not writable (a read-only folder, or another user's?)")


def check_output_folder(path, flag: str | None = None):
    """`path` (the value of `flag`, if a command-line flag; None: not given) can be a folder that we create and
    write into."""
    if path is None:
        return
    what = f"{flag} {path}" if flag else str(path)
    blocker = _file_in_the_way(path)
    if blocker == Path(path):
        raise UserError(f"{what} is a file, not a folder")
    if blocker is not None:
        raise UserError(f"{what}: {blocker} is a file, not a folder")
    _check_writable(path, what)


def check_file_output(path, what: str):
    """The file `path` (described as `what`: a flag, "the export") can be written: no file where its folder
    should be, and the folder writable."""
    blocker = _file_in_the_way(Path(path).parent)
    if blocker is not None:
        raise UserError(f"{what} {path}: {blocker} is a file, not a folder")
    _check_writable(Path(path).parent, f"{what} {path}")


def check_not_an_input(out, what: str, inputs: dict):
    """No output overwrites an input of the same command: refuse `out` (described as `what`) when it is one of
    `inputs` ({description: path or None}) or a folder holding one (a folder output is replaced whole)."""
    out = Path(out).resolve()
    for described, path in inputs.items():
        if path is None or not Path(path).exists():
            continue
        if Path(path).resolve() == out or Path(path).resolve().is_relative_to(out):
            where = "is" if Path(path).resolve() == out else "holds"
            raise UserError(f"{what} {out} {where} {described} {path}, which this command reads: write to another path")


def check_image_output(path, flag: str):
    """`path` (the value of `flag`) can be written as an image: not a folder, an extension PIL writes, and its
    folder can be written (`check_file_output`)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give an image file name such as {path / 'grid.png'}")
    if Image.registered_extensions().get(path.suffix.lower()) not in Image.SAVE:
        raise UserError(f"{flag} {path}: {path.suffix or 'no extension'!r} is not an image format (use .png or .jpg)")
    check_file_output(path, flag)


def umask() -> int:
    """This process's umask (read without changing it where Linux tells it: setting it to read it back would
    open a moment in which another thread's files are created without it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temporary_folder(target: Path) -> Path:
    """A new temporary folder beside `target`, with the mode a plain `mkdir` gives (mkdtemp's is 0700)."""
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{TEMPORARY_PREFIX}{target.name}-"))
    os.chmod(tmp, 0o777 & ~umask())
    return tmp


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary file name in `path`'s folder (same suffix, so writers that go by the suffix work);
    once the block succeeds it is renamed to `path`, if it fails it is removed. An interrupted run never
    leaves a partial file that a rerun would take as done, and a concurrent reader never sees one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TEMPORARY_PREFIX, suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        # the mode a plain open() gives: mkstemp's 0600 (which some writers keep or set: safetensors) would
        # keep the file from everyone else on a shared disk
        os.chmod(tmp, 0o666 & ~umask())
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


def read_json(path):
    """The JSON in `path`, or None when it is missing or unreadable (a record not written yet)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_yaml_mapping(path) -> dict:
    """A YAML file that must hold a mapping ({} when empty); a missing or malformed file is a `UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a text file (a YAML config of argument names and values is expected)") from None
    except (yaml.YAMLError, ValueError) as e:  # ValueError: a date-like value that is no date (2024-13-45)
        raise UserError(f"{path} is not valid YAML: {first_line(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of argument names to values, not a {type(data).__name__}")
    return data


def replace_folder(src, dst):
    """Rename the finished folder `src` to `dst`; an older `dst` is swapped out first and then deleted, so
    `dst` is always either the old folder or the new one, complete."""
    src, dst = Path(src), Path(dst)
    old = dst.with_name(dst.name + ".old")
    shutil.rmtree(old, ignore_errors=True)  # also the one a swap that was killed halfway left
    if dst.exists():
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
    # A killed build's copy (a whole model's size, for a merged export) goes at the next build of `target`.
    # (Two builds of one target at once are not a use: the later rename would replace the other anyway.)
    for stale in target.parent.glob(f"{TEMPORARY_PREFIX}{glob.escape(target.name)}-{'?' * 8}"):  # mkdtemp's 8
        shutil.rmtree(stale, ignore_errors=True)
    tmp = temporary_folder(target)
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
    tmp = temporary_folder(target)
    try:
        build(tmp)
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():  # not a lost race: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
