"""Semantic fidelity for S2I: a UperNet segments the generated image, and its labels are scored against the
map the image was generated from.

Definitions (mmsegmentation's, used for ADE20K SceneParsing results):
- 150 classes, label values 1..150 in the maps; 0 ("other") is ignored: those pixels count nowhere, not
  even as false positives of the prediction;
- intersections and unions are summed over the whole set of images, then IoU per class; mIoU is the mean
  over classes whose union is not empty;
- pixel accuracy = correctly labelled pixels / labelled pixels (aAcc).
"""
import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError, first_line


NUM_CLASSES = 150
DEFAULT_SEGMENTER = "openmmlab/upernet-convnext-small"


class SegmentationScores:
    """Accumulates per-class intersection and union over label maps; `compute()` gives mIoU and accuracy."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        self.num_classes = num_classes
        self.intersection = np.zeros(num_classes, dtype=np.int64)
        self.predicted_area = np.zeros(num_classes, dtype=np.int64)
        self.target_area = np.zeros(num_classes, dtype=np.int64)

    def update(self, predicted, target):
        """`predicted` and `target`: (H, W) integer label maps with values 1..num_classes (0 in `target` is
        ignored; a 0 in `predicted` is simply wrong)."""
        predicted, target = np.asarray(predicted).astype(np.int64), np.asarray(target).astype(np.int64)
        if predicted.shape != target.shape:
            raise ValueError(f"prediction {predicted.shape} and label map {target.shape} differ in size")
        labelled = target > 0
        predicted, target = predicted[labelled] - 1, target[labelled] - 1  # class index 0..C-1
        hits = target[predicted == target]
        self.intersection += np.bincount(hits, minlength=self.num_classes)
        in_range = (predicted >= 0) & (predicted < self.num_classes)
        self.predicted_area += np.bincount(predicted[in_range], minlength=self.num_classes)
        self.target_area += np.bincount(target, minlength=self.num_classes)

    def compute(self) -> dict:
        union = self.predicted_area + self.target_area - self.intersection
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, self.intersection / np.maximum(union, 1), np.nan)
        labelled = int(self.target_area.sum())
        return {
            "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
            "accuracy": float(self.intersection.sum() / labelled) if labelled else float("nan"),
            "per_class_iou": [None if np.isnan(v) else float(v) for v in iou],
            "labelled_pixels": labelled,
        }


class UperNetSegmenter:
    """transformers' `UperNetForSemanticSegmentation` (hub id or local folder) with its image processor.
    Returns label maps with values 1..150 (class index + 1, the ADE20K annotation convention)."""

    def __init__(self, name_or_path: str = DEFAULT_SEGMENTER, device="cpu", batch_size: int = 8):
        from transformers import AutoImageProcessor, UperNetForSemanticSegmentation

        try:
            self.model = UperNetForSemanticSegmentation.from_pretrained(name_or_path).to(device).eval()
            self.processor = AutoImageProcessor.from_pretrained(name_or_path)
        except (OSError, ValueError) as e:
            raise UserError(f"--segmenter {name_or_path}: cannot load a UperNet model and its image processor ({first_line(e)})") from None
        if self.model.config.num_labels != NUM_CLASSES:
            raise UserError(f"--segmenter {name_or_path}: has {self.model.config.num_labels} classes, "
                            f"ADE20K needs {NUM_CLASSES}")
        self.device, self.batch_size, self.name = device, batch_size, name_or_path

    @torch.no_grad()
    def __call__(self, images) -> list[np.ndarray]:
        """PIL images -> (H, W) uint8 label maps at each image's own size."""
        maps = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start:start + self.batch_size]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            logits = self.model(pixel_values=pixels).logits.float()
            for image, image_logits in zip(batch, logits):
                size = (image.height, image.width)
                image_logits = F.interpolate(image_logits[None], size=size, mode="bilinear", align_corners=False)[0]
                maps.append((image_logits.argmax(0) + 1).to(torch.uint8).cpu().numpy())
        return maps
