"""Metric backbones and scores. Each backbone loads from a hub id or a local path; nothing downloads in tests
(`evaluate.tiny_backbones.write_tiny_backbones` writes offline stand-ins in the same formats)."""
from .fid import DEFAULT_INCEPTION, load_fid_features, make_fid
from .images import is_all_black
from .perceptual import DEFAULT_LPIPS, LpipsDistance, load_lpips, save_lpips
from ether_diffusion.segmentation import DEFAULT_SEGMENTER, SegmentationScores, UperNetSegmenter
from .similarity import DEFAULT_CLIP, DEFAULT_DINO, ClipEmbedder, DinoEmbedder, cosine_matrix
