"""The one resize-and-crop every dataset here uses (DreamBooth subjects, ADE20K image + map pairs)."""
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode


def crop_box(width, height, size, center=True, generator=None) -> tuple[int, int, int, int]:
    """(top, left, size, size): centred, or random from `generator` (a torch.Generator; None draws from
    torch's global RNG, which a resumed run cannot replay)."""
    if center:
        return (height - size) // 2, (width - size) // 2, size, size
    top = int(torch.randint(0, height - size + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - size + 1, (1,), generator=generator))
    return top, left, size, size


def resize_and_crop(image, labels, size, center=True, generator=None, label_interpolation=InterpolationMode.NEAREST):
    """Resize the shorter side to `size` (bilinear for the image, nearest for a label map, so labels stay
    labels; bilinear for a ControlNet conditioning picture) and cut the same square from both. Either may be
    None; returns (image, labels)."""
    image = None if image is None else TF.resize(image, size, interpolation=InterpolationMode.BILINEAR)
    labels = None if labels is None else TF.resize(labels, size, interpolation=label_interpolation)
    reference = image if image is not None else labels
    box = crop_box(reference.width, reference.height, size, center, generator)
    return tuple(None if x is None else TF.crop(x, *box) for x in (image, labels))
