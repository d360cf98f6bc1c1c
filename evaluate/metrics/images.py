"""Reading images for evaluation (one clear error per unreadable file), the all-black check, and error text."""
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ether_diffusion.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def load_rgb(path) -> Image.Image:
    """The image at `path` as RGB; a missing, truncated or non-image file is a UserError naming it."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not later inside a metric
            return image.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"{path}: image file does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: cannot read image ({e})") from None


def list_images(folder) -> list[Path]:
    """Image files directly inside `folder`, sorted by name."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def is_all_black(image: Image.Image) -> bool:
    """True when every pixel is 0: what SD's safety checker returns for an image it blocks.
    Such images are skipped by the metrics and counted instead."""
    return int(np.asarray(image).max()) == 0


def first_line(error) -> str:
    """Library errors often span lines (hub hints, tracebacks of causes); a CLI error is one line."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
