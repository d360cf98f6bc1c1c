"""`builtin:toy-sd`: the toy world's Stable Diffusion, shipped in the package and assembled once into a normal
diffusers folder.

The package holds `weights/toy-sd/` (fp16 UNet, VAE and text encoder, configs, scheduler) written by
`python -m ether_diffusion.toy.pretrain --export`. Two things are left out to stay small, and rebuilt here,
exactly, into a cached float32 folder (`builtin.build_in_cache`, like `builtin:tiny-sd`):
- the tokenizer files: SD-1.5's CLIP BPE, written from open_clip's packaged vocabulary;
- the text encoder's token embedding outside the ~70 rows the world's words use: 49,408 x 128 values that
  pretraining never changed. They are the seeded start `initial_token_embedding`, so the shipped file holds
  only the trained rows (`token_embedding.ids` / `.rows`).
"""
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..files import read_yaml_mapping
from ..tiny_sd import clip_tokenizer, without_tokenizer_json
from . import world

BUILTIN_TOY = "builtin:toy-sd"
WEIGHTS = Path(__file__).with_name("weights")
SHIPPED = WEIGHTS / "toy-sd"
EMBEDDING = "embeddings.token_embedding.weight"  # the key ends so (transformers 5 writes no "text_model." prefix)
SHIPPED_IDS, SHIPPED_ROWS = "embeddings.token_embedding.ids", "embeddings.token_embedding.rows"
EMBEDDING_SEED = 1234


# Captions here are at most ~20 tokens; a 32-token context (SD-1.5: 77) makes the text encoder 2.4x cheaper to
# train and the UNet's cross-attention shorter. The pipeline pads to the tokenizer's model_max_length, so
# training and sampling see the same 32 positions.
CONTEXT_LENGTH = 32


def text_encoder_config(sizes: dict) -> dict:
    """A CLIPTextConfig's arguments: SD-1.5's vocabulary and special tokens, the toy's sizes and context."""
    return dict(vocab_size=49408, max_position_embeddings=CONTEXT_LENGTH, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=49407, hidden_act="quick_gelu", **sizes)


def initial_token_embedding(config) -> torch.Tensor:
    """The text encoder's token embedding before training: normal(0, initializer_range) from a fixed seed."""
    g = torch.Generator().manual_seed(EMBEDDING_SEED)
    return torch.randn(config.vocab_size, config.hidden_size, generator=g) * config.initializer_range


def world_token_ids(tokenizer) -> list[int]:
    """Every token id the world's captions and prompts can contain (the special tokens included)."""
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id}
    for word in world.vocabulary():  # one by one: together they are longer than the context
        ids.update(tokenizer(word).input_ids)
    return sorted(ids)


# ----------------------------------------------------------------------------------------------- export
def export(output_dir: Path, target: Path, config: dict):
    """Write `target/toy-sd` from a pretraining run's `output_dir/toy-sd`: fp16 weights, configs, the trained
    embedding rows only."""
    from safetensors import safe_open

    source, out = Path(output_dir) / "toy-sd", Path(target) / "toy-sd"
    if not source.is_dir():
        from ..errors import UserError

        raise UserError(f"{source} does not exist: run the unet stage first")
    shutil.rmtree(out, ignore_errors=True)
    for part, weights in (("unet", "diffusion_pytorch_model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors"),
                          ("text_encoder", "model.safetensors")):
        (out / part).mkdir(parents=True)
        shutil.copy(source / part / "config.json", out / part / "config.json")
        tensors = load_file(str(source / part / weights))
        if part == "text_encoder":
            ids = torch.tensor(trained_rows(source), dtype=torch.int64)
            tensors[SHIPPED_IDS] = ids
            tensors[SHIPPED_ROWS] = tensors.pop(embedding_key(tensors))[ids]
        with safe_open(str(source / part / weights), framework="pt") as f:
            metadata = f.metadata()
        save_file({k: (v.half() if v.is_floating_point() else v) for k, v in tensors.items()},
                  str(out / part / weights), metadata=metadata)
    (out / "scheduler").mkdir()
    shutil.copy(source / "scheduler" / "scheduler_config.json", out / "scheduler" / "scheduler_config.json")
    shutil.copy(source / "model_index.json", out / "model_index.json")
    # The committed config keeps its comments: it is replaced only when the run's config says something else.
    run_config, shipped_config = Path(output_dir) / "pretrain.yaml", Path(target) / "pretrain.yaml"
    if not shipped_config.is_file() or read_yaml_mapping(shipped_config) != read_yaml_mapping(run_config):
        shutil.copy(run_config, shipped_config)


def embedding_key(tensors: dict) -> str:
    return next(k for k in tensors if k.endswith(EMBEDDING))


def trained_rows(pipeline_folder: Path) -> list[int]:
    """The rows that differ from the seeded start: exactly the world's words (checked, not assumed)."""
    from transformers import CLIPTextConfig

    config = CLIPTextConfig.from_pretrained(pipeline_folder / "text_encoder")
    tensors = load_file(str(pipeline_folder / "text_encoder" / "model.safetensors"))
    weight = tensors[embedding_key(tensors)]
    changed = (weight != initial_token_embedding(config)).any(dim=1)
    return torch.nonzero(changed).flatten().tolist()


# ----------------------------------------------------------------------------------------------- assembly
def assemble(folder: Path, shipped: Path = SHIPPED):
    """A normal float32 diffusers folder at `folder` from the shipped weights (see the module docstring)."""
    from transformers import CLIPTextConfig

    folder = Path(folder)
    shutil.copytree(shipped, folder, dirs_exist_ok=True)
    for part, weights in (("unet", "diffusion_pytorch_model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors"),
                          ("text_encoder", "model.safetensors")):
        tensors = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(shipped / part / weights)).items()}
        if part == "text_encoder":
            embedding = initial_token_embedding(CLIPTextConfig.from_pretrained(shipped / part))
            embedding[tensors.pop(SHIPPED_IDS)] = tensors.pop(SHIPPED_ROWS)
            tensors[EMBEDDING] = embedding
        save_file(tensors, str(folder / part / weights), metadata={"format": "pt"})
    clip_tokenizer(folder / "tokenizer", CONTEXT_LENGTH).save_pretrained(folder / "tokenizer")
    without_tokenizer_json(folder / "tokenizer")
    return folder


ASSEMBLY_VERSION = 2  # bump when `assemble` writes the folder otherwise, so stale caches are rebuilt


def shipped_version() -> str:
    """Changes whenever the shipped weights do, so a cache built from older weights is never used."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(SHIPPED.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(SHIPPED).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def toy_sd_path() -> Path:
    """The assembled `builtin:toy-sd` folder in the cache (built on first use)."""
    from ..builtin import build_in_cache

    if not (SHIPPED / "model_index.json").is_file():
        from ..errors import UserError

        raise UserError(f"builtin:toy-sd: the shipped weights are missing ({SHIPPED}); reinstall the package")
    return build_in_cache(f"toy-sd-{ASSEMBLY_VERSION}-{shipped_version()}", assemble)
