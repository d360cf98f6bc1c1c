"""Subject fidelity and prompt fidelity: DINO and CLIP embeddings compared by raw cosine similarity.

As in the OFT evaluation code the ETHER paper reused:
- DINO: `facebook/dino-vits16`, the CLS token of `last_hidden_state` (no pooler), the model's own image
  processor (resize to 224, ImageNet normalisation).
- CLIP-I / CLIP-T: CLIP ViT-L/14 with OpenAI's weights (here through open_clip), image and text features,
  raw cosine (no logit scale, no clipping at 0, no x100).
Every backbone comes from a hub id or a local folder; see `DinoEmbedder` and `parse_clip_spec` for the forms
accepted. `--dino` also takes an open_clip folder (e.g. the toy world's judge, which has no DINO of its own):
its DINO-style embedding is the image tower's pooled token before the projection into the image-text space,
an image-only feature like DINO's CLS token (CLIP-I compares the projected ones).
"""
import os

import torch
import torch.nn.functional as F

from ether_diffusion.errors import UserError, first_line


DEFAULT_DINO = "facebook/dino-vits16"
DEFAULT_CLIP = "ViT-L-14:openai"


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D) x (M, D) -> (N, M) raw cosine similarities."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def _batched(items, batch_size):
    for start in range(0, len(items), batch_size):
        yield items[start:start + batch_size]


class DinoEmbedder:
    """CLS embeddings of a DINO ViT loaded with transformers' `ViTModel`, or the pooled image token of an
    open_clip folder's image tower (see the module docstring)."""

    def __init__(self, name_or_path: str = DEFAULT_DINO, device="cpu", batch_size: int = 32):
        from transformers import AutoImageProcessor, ViTModel

        self.device, self.batch_size, self.name = device, batch_size, name_or_path
        self.clip = None
        if os.path.isfile(os.path.join(name_or_path, "open_clip_config.json")):
            self.clip = ClipEmbedder(name_or_path, device, batch_size)
            return
        try:
            # DINO checkpoints carry no pooler; without add_pooling_layer=False transformers would add a
            # random one (unused here, but reported as missing weights).
            self.model = ViTModel.from_pretrained(name_or_path, add_pooling_layer=False).to(device).eval()
            self.processor = AutoImageProcessor.from_pretrained(name_or_path)
        except (OSError, ValueError) as e:
            raise UserError(f"--dino {name_or_path}: cannot load a ViT model and its image processor ({first_line(e)})") from None

    @torch.no_grad()
    def images(self, images) -> torch.Tensor:
        """List of PIL images -> (N, D) CLS features (unnormalised; compare with `cosine_matrix`)."""
        if self.clip is not None:
            return self.clip.images(images, projected=False)
        features = []
        for batch in _batched(images, self.batch_size):
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            features.append(self.model(pixel_values=pixels).last_hidden_state[:, 0].float().cpu())
        return torch.cat(features) if features else torch.empty(0, self.model.config.hidden_size)


def parse_clip_spec(spec: str) -> tuple[str, str | None]:
    """`--clip` -> (open_clip model name, pretrained).

    - an existing folder: open_clip's hub layout (`open_clip_config.json` + `open_clip_model.safetensors`
      or `open_clip_pytorch_model.bin`), loaded as `local-dir:FOLDER`;
    - `hf-hub:org/repo` or `local-dir:FOLDER`: passed to open_clip unchanged;
    - `MODEL:PRETRAINED`, e.g. `ViT-L-14:openai` (a tag open_clip knows; its weights come from the HF
      cache, so offline they must be cached already) or `ViT-L-14:/path/weights.safetensors`.
    """
    if os.path.isdir(spec):
        return f"local-dir:{spec}", None
    if spec.startswith(("hf-hub:", "local-dir:")):
        return spec, None
    model, sep, pretrained = spec.partition(":")
    if not sep or not model or not pretrained:
        raise UserError(f"--clip {spec!r}: expected MODEL:PRETRAINED (e.g. ViT-L-14:openai), hf-hub:ORG/REPO "
                        f"or a local folder with open_clip_config.json")
    return model, pretrained


class ClipEmbedder:
    """Image and text features of an open_clip model."""

    def __init__(self, spec: str = DEFAULT_CLIP, device="cpu", batch_size: int = 32):
        import open_clip

        model_name, pretrained = parse_clip_spec(spec)
        # OpenAI's CLIP weights were trained with QuickGELU; open_clip only warns when the architecture's
        # default activation differs from the tag's, so ask for it explicitly.
        quick_gelu = False
        if pretrained and not os.path.isfile(pretrained):
            tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
            if not tag_cfg:
                raise UserError(f"--clip {spec!r}: open_clip knows no pretrained tag {pretrained!r} for {model_name!r} "
                                f"(known: {open_clip.list_pretrained_tags_by_model(model_name)})")
            quick_gelu = bool(tag_cfg.get("quick_gelu", False))
        try:
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, force_quick_gelu=quick_gelu, device=device)
            self.tokenizer = open_clip.get_tokenizer(model_name)
        except (OSError, RuntimeError, ValueError) as e:
            raise UserError(f"--clip {spec!r}: cannot load the open_clip model ({first_line(e)})") from None
        self.model.eval()
        self.device, self.batch_size, self.name = device, batch_size, spec

    @torch.no_grad()
    def images(self, images, projected: bool = True) -> torch.Tensor:
        """Image features; `projected=False`: the image tower's pooled token before its projection into the
        image-text space (`--dino` with an open_clip folder)."""
        visual = self.model.visual
        projection = visual.proj
        features = []
        try:
            if not projected:
                visual.proj = None  # VisionTransformer.forward skips the projection when it is None
            for batch in _batched(images, self.batch_size):
                pixels = torch.stack([self.preprocess(image) for image in batch]).to(self.device)
                features.append(self.model.encode_image(pixels).float().cpu())
        finally:
            visual.proj = projection
        return torch.cat(features) if features else torch.empty(0, 0)

    @torch.no_grad()
    def texts(self, texts) -> torch.Tensor:
        features = []
        for batch in _batched(list(texts), self.batch_size):
            features.append(self.model.encode_text(self.tokenizer(batch).to(self.device)).float().cpu())
        return torch.cat(features) if features else torch.empty(0, 0)
