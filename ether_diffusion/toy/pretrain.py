"""Pretrain the toy world's Stable Diffusion and its judge from nothing, on a CPU.

    python -m ether_diffusion.toy.pretrain --output_dir toy-pretrain [--config FILE.yaml] [--stages vae,unet,judge]
    python -m ether_diffusion.toy.pretrain --output_dir toy-pretrain --export ether_diffusion/toy/weights

Stages, in order; each one is skipped when its output folder exists, and resumes from its own checkpoint
(`OUTPUT_DIR/checkpoints/<stage>/`, written atomically every `checkpoint_every` steps) when one exists. Every
batch, noise draw and timestep is a function of (seed, stage, step), so a resumed stage continues exactly as
an uninterrupted one would.

- `vae`: diffusers `AutoencoderKL` (factor 4: 32 px pictures, 8x8x8 latents) on world pictures; the
  reconstruction loss weighs toy pixels more, because their details (eyes, marks, feet) are a few pixels.
- `unet`: `UNet2DConditionModel` (cross-attention in every level, SD-1.5's module names) and a
  `CLIPTextModel` trained jointly from scratch with SD-1.5's tokenizer (CLIP BPE from open_clip; a 32-token
  context) and scheduler configuration; captions are dropped 10% of the time (classifier-free guidance); the VAE's
  `scaling_factor` is set from the latents' standard deviation; the UNet weights saved are an EMA.
  Output: `OUTPUT_DIR/toy-sd`, a normal diffusers `StableDiffusionPipeline` folder.
- `judge`: see `judge.py` (an open_clip model with attribute heads, and a UperNet segmenter), trained on
  world pictures, subjects and near misses among them, and their VAE reconstructions.

Pretraining never shows a subject (`world.sample_scene(subjects=False)`); only the judge sees them.
`--export DIR` writes what the package ships (`ether_diffusion/toy/weights/`): fp16 weights, the text
encoder's token embedding cut to the rows the world's words use (`model.py` rebuilds the rest from its
seed), and this config.
"""
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from ..errors import ArgumentParser, UserError, run_cli
from ..files import read_yaml_mapping
from ..tiny_sd import SD_SCHEDULER, clip_tokenizer
from . import model as toy_model
from . import world
from .steps import mix, pictures, step_generator, train_steps

DEFAULT_CONFIG = Path(__file__).with_name("weights") / "pretrain.yaml"
STAGES = ("vae", "unet", "judge")


# ============================================================================================ config and files
def load_config(path) -> dict:
    config = read_yaml_mapping(path)
    for key in ("seed", "size", "vae", "unet", "text_encoder", "judge", "segmenter"):
        if key not in config:
            raise UserError(f"{path}: missing key {key!r}")
    names, fraction = config["unet"].get("named_toys", 0), config["unet"].get("named_fraction", 0)
    if bool(names) != bool(fraction):  # names never shown, or a fraction of nothing: either is a silent no-op
        raise UserError(f"{path}: unet.named_toys is {names} but unet.named_fraction is {fraction} "
                        "(set both, or neither)")
    return config


# ============================================================================================ stage: vae
def build_vae(config: dict, size: int):
    from diffusers import AutoencoderKL

    c = config["vae"]
    channels = tuple(c["block_out_channels"])
    return AutoencoderKL(
        block_out_channels=channels, down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels), latent_channels=c["latent_channels"],
        layers_per_block=c["layers_per_block"], norm_num_groups=c["norm_num_groups"], sample_size=size)


def train_vae(config: dict, output_dir: Path, log):
    c, seed, size = config["vae"], config["seed"], config["size"]
    torch.manual_seed(seed)
    vae = build_vae(config, size)
    print(f"vae: {sum(p.numel() for p in vae.parameters()):,} parameters; drawing {c['pool']} pictures")
    pool = list(world.examples(seed, c["pool"], size, toy_fraction=c["toy_fraction"]))
    images = pictures(pool)
    # Toy pixels weigh more: an eye or a star is a few pixels of a 32 px picture.
    weights = torch.from_numpy(np.stack([1 + (c["toy_weight"] - 1) * (e.labels == world.LABELS["toy"]) for e in pool]))
    weights = weights.float()[:, None]
    optimizer = torch.optim.AdamW(vae.parameters(), lr=c["lr"], weight_decay=0.0)

    def step_fn(step):
        g = step_generator(seed, "vae", step)
        index = torch.randint(0, len(images), (c["batch_size"],), generator=g)
        x, w = images[index], weights[index]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=g)).sample
        error = reconstruction - x
        recon = (w * (error.abs() + error.square())).mean() / w.mean()
        kl = posterior.kl().mean()
        (recon + c["kl_weight"] * kl).backward()
        return {"recon": recon.item(), "kl": kl.item()}

    checkpoint = train_steps("vae", output_dir, c["steps"], config["checkpoint_every"], {"vae": vae}, optimizer,
                             step_fn, c["lr"], c["warmup"], log)
    vae.save_pretrained(output_dir / "vae")
    checkpoint.remove()


# ============================================================================================ stage: unet
def build_unet(config: dict):
    from diffusers import UNet2DConditionModel

    c = config["unet"]
    levels = len(c["block_out_channels"])
    return UNet2DConditionModel(
        sample_size=config["size"] // 2 ** (len(config["vae"]["block_out_channels"]) - 1),
        in_channels=config["vae"]["latent_channels"], out_channels=config["vae"]["latent_channels"],
        block_out_channels=tuple(c["block_out_channels"]), layers_per_block=c["layers_per_block"],
        down_block_types=("CrossAttnDownBlock2D",) * levels, up_block_types=("CrossAttnUpBlock2D",) * levels,
        cross_attention_dim=config["text_encoder"]["hidden_size"], attention_head_dim=c["attention_head_dim"],
        norm_num_groups=c["norm_num_groups"])


def build_text_encoder(config: dict):
    """A CLIP text encoder from scratch; its token embedding starts as `model.initial_token_embedding`, the
    same rows `model.py` fills in for the words the world never uses."""
    from transformers import CLIPTextConfig, CLIPTextModel

    text_config = CLIPTextConfig(**toy_model.text_encoder_config(config["text_encoder"]))
    text_encoder = CLIPTextModel(text_config)
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight.copy_(toy_model.initial_token_embedding(text_config))
    return text_encoder


def named_toys(tokenizer, count: int, seed: int) -> dict:
    """Pretraining's named individuals: `count` made-up names (three letters, one or two BPE tokens), each bound
    to one fixed look that is no subject's. DreamBooth leans on SD-1.5's prior that a rare word before the class
    noun names one individual, in any scene; these names give the toy model that prior. Their tokens are never
    trained (the rows keep the seeded start, as every word outside the world does), so what the model learns is
    to read an individual from an untrained token, which is what the identifier `qwe` is. No name shares a token
    with the world's words or with the identifier."""
    if not count:
        return {}
    reserved = set(toy_model.world_token_ids(tokenizer)) | set(tokenizer(world.IDENTIFIER).input_ids)
    consonants, vowels = "bcdfghjklmnprstvz", "aeiou"
    candidates = [a + b + c for a in consonants for b in vowels for c in consonants]
    rng = random.Random(f"{seed}/named toys")
    rng.shuffle(candidates)
    names = {}
    for name in candidates:
        ids = tokenizer(name).input_ids[1:-1]
        if len(ids) <= 2 and not reserved.intersection(ids):
            names[name] = world.random_look(rng, avoid=world.SUBJECTS.values())
            if len(names) == count:
                return names
    raise UserError(f"unet.named_toys: {count} names asked, only {len(names)} three-letter names are free")


@torch.no_grad()
def encode_pool(vae, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and standard deviations of every picture (unscaled)."""
    means, stds = [], []
    for start in tqdm(range(0, len(images), batch_size), desc="encoding pictures"):
        dist = vae.encode(images[start:start + batch_size]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def train_unet(config: dict, output_dir: Path, log):
    from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler

    c, seed, size = config["unet"], config["seed"], config["size"]
    vae = AutoencoderKL.from_pretrained(output_dir / "vae").eval()
    tokenizer = clip_tokenizer(output_dir / "tokenizer-files", toy_model.CONTEXT_LENGTH)
    torch.manual_seed(seed)
    unet, text_encoder = build_unet(config), build_text_encoder(config)
    ema = build_unet(config)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    print(f"unet: {sum(p.numel() for p in unet.parameters()):,} parameters, text encoder: "
          f"{sum(p.numel() for p in text_encoder.parameters()):,}; drawing {c['pool']} pictures")

    # Only the rows of the words the world uses learn; the others keep their seeded start (model.py rebuilds
    # them). Training just those rows (not a masked 49408-row table) keeps the optimizer step small.
    embedding = text_encoder.get_input_embeddings()
    embedding.weight.requires_grad_(False)
    row_ids = torch.tensor(toy_model.world_token_ids(tokenizer))
    rows = torch.nn.ParameterDict({"rows": torch.nn.Parameter(embedding.weight[row_ids].clone())})
    hook = embedding.register_forward_hook(
        lambda module, inputs, output: F.embedding(inputs[0], module.weight.index_put((row_ids,), rows["rows"])))

    named = named_toys(tokenizer, c.get("named_toys", 0), seed)
    pool = list(world.examples(seed + 1, c["pool"], size, toy_fraction=c.get("toy_fraction", world.TOY_FRACTION), named=named,
                               named_fraction=c.get("named_fraction", 0.0)))
    scenes = [e.scene for e in pool]
    latent_file = output_dir / "checkpoints" / "unet-latents.pt"
    if latent_file.is_file():
        means, stds = torch.load(latent_file, weights_only=True).values()
    else:
        means, stds = encode_pool(vae, pictures(pool))
        latent_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"means": means, "stds": stds}, latent_file)
    # SD's scaling factor makes the latents unit-variance; measured here on a draw of every picture's latent.
    sample = means + stds * torch.randn(means.shape, generator=torch.Generator().manual_seed(seed))
    scaling_factor = float(1.0 / sample.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    print(f"unet: latents {tuple(means.shape[1:])}, scaling factor {scaling_factor:.4f}")

    # The trainers' noise schedule: DDPM read from SD-1.5's (PNDM) scheduler settings.
    scheduler = DDPMScheduler.from_config(PNDMScheduler(**SD_SCHEDULER).config)
    params = [{"params": list(unet.parameters()), "weight_decay": c["weight_decay"]},
              {"params": [p for p in text_encoder.parameters() if p.requires_grad] + [rows["rows"]],
               "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(params, lr=c["lr"], fused=True)  # 6x faster on CPU than the default
    token_cache = {}

    def tokens(texts):
        missing = [t for t in texts if t not in token_cache]
        if missing:
            ids = tokenizer(missing, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            token_cache.update(zip(missing, ids))
        return torch.stack([token_cache[t] for t in texts])

    def step_fn(step):
        g = step_generator(seed, "unet", step)
        index = torch.randint(0, len(means), (c["batch_size"],), generator=g)
        latents = (means[index] + stds[index] * torch.randn(means[index].shape, generator=g)) * scaling_factor
        rng = random.Random(mix(seed, "captions", step))
        texts = ["" if rng.random() < c["caption_dropout"] else world.caption(scenes[i], rng, c.get("full_look", 0.0))
                 for i in index.tolist()]
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=g)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, text_encoder(tokens(texts))[0]).sample
        loss = F.mse_loss(prediction, noise)
        loss.backward()
        return {"loss": loss.item()}

    @torch.no_grad()
    def update_ema(step):
        decay = min(c["ema_decay"], (1 + step) / (10 + step))  # a short memory at first: the start is noise
        for e, p in zip(ema.parameters(), unet.parameters()):
            e.lerp_(p, 1 - decay)

    checkpoint = train_steps("unet", output_dir, c["steps"], config["checkpoint_every"],
                             {"unet": unet, "text_encoder": text_encoder, "text_rows": rows}, optimizer, step_fn,
                             c["lr"], c["warmup"], log, extra_state={"ema": ema}, after_step=update_ema)
    hook.remove()
    with torch.no_grad():
        embedding.weight[row_ids] = rows["rows"]
    save_pipeline(output_dir / "toy-sd", ema, vae, text_encoder, tokenizer)
    checkpoint.remove()
    latent_file.unlink(missing_ok=True)


def save_pipeline(folder: Path, unet, vae, text_encoder, tokenizer):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler(**SD_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)


# ============================================================================================ main
def parse_args(argv=None):
    p = ArgumentParser(prog="python -m ether_diffusion.toy.pretrain", description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", required=True, help="Checkpoints and the trained folders go here.")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="Sizes, steps and seeds (YAML).")
    p.add_argument("--stages", default=",".join(STAGES), help=f"Comma-separated subset of {','.join(STAGES)}.")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's).")
    p.add_argument("--export", default=None, metavar="DIR", help="Write the shipped weights to DIR and stop.")
    args = p.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        raise UserError(f"--stages: unknown stage {unknown[0]!r} (choose from {', '.join(STAGES)})")
    return args


def main(argv=None):
    from . import judge

    args = parse_args(argv)
    config = load_config(args.config)
    if args.threads:
        torch.set_num_threads(args.threads)
    output_dir = Path(args.output_dir)
    if args.export:
        toy_model.export(output_dir, Path(args.export), config)
        judge.export(output_dir, Path(args.export))
        print(f"wrote {args.export}")
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "pretrain.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    log_file = output_dir / "pretrain_log.jsonl"

    def log(values):
        with open(log_file, "a") as f:
            f.write(json.dumps(values) + "\n")

    stages = {"vae": (output_dir / "vae", train_vae), "unet": (output_dir / "toy-sd", train_unet),
              "judge": (output_dir / "judge", judge.train)}
    for name in args.stages:
        folder, train = stages[name]
        if folder.is_dir():
            print(f"{name}: {folder} exists, skipping")
            continue
        started = time.time()
        train(config, output_dir, log)
        log({"stage": name, "done": True, "seconds": round(time.time() - started, 1)})
        print(f"{name}: done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    run_cli(main)
