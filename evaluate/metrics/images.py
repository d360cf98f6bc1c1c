"""The all-black check. Reading images is `ether_diffusion.files` (one way for the whole project)."""
import numpy as np
from PIL import Image


def is_all_black(image: Image.Image) -> bool:
    """True when every pixel is 0: what SD's safety checker returns for an image it blocks.
    Such images are skipped by the metrics and counted instead."""
    return int(np.asarray(image).max()) == 0
