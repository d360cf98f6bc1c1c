"""Export an adapter as a LoRA that every Stable Diffusion tool loads, or as a merged model.

    python -m ether_diffusion.export runs/dog/adapter.safetensors --format kohya dog-etherplus.safetensors
    python -m ether_diffusion.export runs/dog/adapter.safetensors --format diffusers runs/dog/
    python -m ether_diffusion.export runs/dog/adapter.safetensors --format merged runs/dog-merged

`kohya` is the file AUTOMATIC1111, ComfyUI and diffusers' `load_lora_weights` read
(`lora_unet_<module path, dots as underscores>.lora_down.weight` / `.lora_up.weight` / `.alpha`);
`diffusers` is the PEFT-style file diffusers itself writes (`unet.<module>.lora_A.weight`, with the
`LoraConfig` in the `lora_adapter_metadata` header); `merged` is a stock diffusers pipeline folder. An adapter
trained with --train_text_encoder carries its text-encoder part into each: `lora_te_text_model_<module path>.*`
(kohya, SD-1's single text encoder) and `text_encoder.text_model.<module>.lora_A.weight` (diffusers) keys, and a
merged folder with that adapter folded into its text encoder too.

Why a LoRA holds the adapter exactly: every update `W' - W` of these methods is low rank (the bias is
untouched): each method's `update_rank` and `exact_factors` in `adapters.methods` (ETHER: `-2 W U U^T`, rank
<= n; ETHER+: rank <= 4n; HRA with r reflections: rank <= r; LoRA: its own rank). OFT and Naive change W at
full rank, so only `merged` carries them.

Why the factors are formed in float64 and balanced: formed naively, ETHER+'s factors nearly cancel when
v is close to u (as training leaves it), and fp16 rounding of the large factors swamps the small update.
A QR of both factors and an SVD of the small core give factors whose components carry equal weight on
both sides, so fp16 storage costs about what storing W itself in fp16 costs.

Why every layer has the same rank and alpha = rank: the tools scale each layer by alpha / rank, and
diffusers gives every layer of a kohya file the most common alpha, which mis-scales files whose ranks or
alphas differ between layers. So every layer is padded with zero components to one rank r, alpha = r,
and a kohya file holds no tensor of another name (diffusers reads a file as kohya only when every key
starts with `lora_unet_` / `lora_te_`).

A single-file checkpoint in the original (A1111) layout is not offered: no installed library converts a
diffusers pipeline to that layout (diffusers ships it as scripts/convert_diffusers_to_original_stable_diffusion.py
in its repository, not in the package); run that script on the merged folder if you need one.
"""
import hashlib
import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .adapter_file import (TEXT_ENCODER_PREFIX, config_from_metadata, load_adapter, read_adapter_metadata,
                           text_encoder_config_from_metadata)
from .adapters import AdapterConfig, adapter_modules
from .adapters.methods import METHODS, method_of
from .builtin import resolve_model_path
from .checkpoints import same_folder
from .control import IMAGE_CONDITIONING
from .devices import TORCH_DTYPES
from .errors import ArgumentParser, UserError, run_cli
from .files import (atomic_path, check_file_output, check_not_an_input, check_output_folder, write_folder,
                    write_text)
from .pipelines import load_pipeline, model_load_errors

FORMATS = ("kohya", "diffusers", "merged")
LORA_FORMATS = ("kohya", "diffusers")
# The names the trainers' --export_lora writes beside adapter.safetensors. The diffusers one is diffusers' own
# default weight name, so `pipe.load_lora_weights(output_dir)` finds it without a weight_name.
EXPORT_FILE_NAMES = {"kohya": "lora_kohya.safetensors", "diffusers": "pytorch_lora_weights.safetensors"}
MODEL_CARD = "README.md"


# ------------------------------------------------------------------------------------------------- the math
def lora_rank(cfg: AdapterConfig) -> int:
    """The rank every layer's update fits in (the method's `update_rank`: n for ETHER, 4n for ETHER+, r for
    LoRA and HRA)."""
    check_low_rank(cfg.method)
    return METHODS[cfg.method].update_rank(cfg)


def check_low_rank(method: str, what: str = "a LoRA export"):
    if METHODS[method].update_rank is None:
        raise UserError(f"{what}: {METHODS[method].title} changes every weight at full rank and no LoRA file holds "
                        "that; export a merged model (a diffusers pipeline folder) with --format merged instead")


def balance(up: torch.Tensor, down: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same product `up @ down` as `rank` components, each weighted equally on both sides (the square
    root of its singular value), padded with zero components: QR of both factors, SVD of the small core."""
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    root = s.sqrt()
    up, down = (q_up @ u) * root, root[:, None] * (vh @ q_down.T)
    pad = rank - s.numel()
    assert pad >= 0, f"an update of rank {s.numel()} does not fit rank {rank}"
    return torch.cat([up, up.new_zeros(up.shape[0], pad)], 1), torch.cat([down, down.new_zeros(pad, down.shape[1])])


@torch.no_grad()
def lora_factors(unet, rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer name: (up (out x rank), down (rank x in))}, float64, balanced, for every adapter layer."""
    return {name: balance(*method_of(module).exact_factors(module), rank) for name, module in adapter_modules(unet)}


# ------------------------------------------------------------------------------------------------- the files
def peft_state_dict(factors: dict, dtype: torch.dtype, component: str = "unet") -> dict[str, torch.Tensor]:
    """diffusers' PEFT-style keys: `<component>.<module>.lora_A.weight` (down) and `.lora_B.weight` (up)."""
    state = {}
    for name, (up, down) in factors.items():
        state[f"{component}.{name}.lora_A.weight"] = down.to(dtype).contiguous()
        state[f"{component}.{name}.lora_B.weight"] = up.to(dtype).contiguous()
    return state


def text_model_name(name: str) -> str:
    """A text-encoder layer's name as SD-1 LoRA files spell it: under `text_model.`, which transformers >= 5
    flattens away (diffusers strips it again where the model has none)."""
    return name if name.startswith("text_model.") else f"text_model.{name}"


# diffusers' converter names SDXL's first text encoder `lora_te1_`; SD-1 has one, which kohya names `lora_te_`
# (diffusers reads both).
KOHYA_TEXT_ENCODER = ("lora_te1_", "lora_te_")


def kohya_state_dict(peft_state: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The kohya names, by diffusers' own converter (`convert_state_dict_to_kohya`: lora_A -> lora_down,
    dots -> underscores in the module path, an `alpha` = rank per layer), with alpha in the file's dtype
    as kohya's trainer writes it."""
    from diffusers.utils import convert_state_dict_to_kohya

    state = convert_state_dict_to_kohya(peft_state)
    return {k.replace(*KOHYA_TEXT_ENCODER, 1) if k.startswith(KOHYA_TEXT_ENCODER[0]) else k:
            v.to(dtype) if k.endswith(".alpha") else v for k, v in state.items()}


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def base_model_of(meta: dict, model: str | None, adapter, allow_other_base: bool = False) -> str:
    """`--model` if given, else the base model the trainer recorded in the adapter file. A `--model` other than
    the recorded one is refused unless `allow_other_base`: every method here but LoRA changes W by an update
    that depends on W (a reflection of other weights is another update), so the export would not be what was
    trained, and a LoRA's on another base is another model too."""
    recorded = meta.get("base_model")
    if model:
        resolve_model_path(model)  # a --model folder that does not exist is said so first
    if model and recorded and not allow_other_base and not same_model(model, recorded):
        raise UserError(f"{adapter} was trained on {recorded}, not on --model {model}: pass --allow_other_base to "
                        "export it on that model anyway")
    model = model or recorded
    if not model:
        raise UserError(f"{adapter} does not name its base model: pass --model (hub id, folder or builtin:tiny-sd)")
    return model


def same_model(a: str, b: str) -> bool:
    """Whether two model names name one model: the same hub id or name, or one local folder however written
    (absolute or relative, a trailing /, a built-in name or its cache folder)."""
    def folder(name):
        return resolve_model_path(name) if name.startswith("builtin:") else name

    return a.rstrip("/") == b.rstrip("/") or same_folder(folder(a), folder(b))


def load_adapted_models(model: str, adapter, meta: dict):
    """The base model's UNet and, if the adapter file holds a text-encoder part, text encoder (else None),
    float32, with the adapter loaded: only they carry adapters, so the rest of the pipeline is not loaded."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    path = resolve_model_path(model)
    with model_load_errors(model):
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").eval()
        text_encoder = (CLIPTextModel.from_pretrained(path, subfolder="text_encoder").eval()
                        if text_encoder_config_from_metadata(meta) is not None else None)
    load_adapter(unet, adapter, text_encoder=text_encoder)
    return unet, text_encoder


def lora_file_path(out, fmt: str) -> Path:
    """`out`, or `out/<the format's file name>` when `out` is a folder (or written as one, `new/`: created)."""
    as_folder = str(out).endswith(("/", os.sep))
    out = Path(out)
    return out / EXPORT_FILE_NAMES[fmt] if out.is_dir() or as_folder else out


def check_export_target(out, adapter, model: str | None):
    """The export `out` is neither the adapter file it reads nor the local base model folder (nor holds them)."""
    check_not_an_input(out, "the export", {"the adapter": adapter,
                                           "the base model": model if model and Path(model).is_dir() else None})


def export_lora(adapter, fmt: str, out, model: str | None = None, dtype: torch.dtype = torch.float16,
                allow_other_base: bool = False) -> Path:
    """Write the adapter file `adapter` as a `kohya` or `diffusers` LoRA file at `out` (atomically); returns
    its path. `model` (the base model) defaults to the one the adapter file names (`base_model_of`)."""
    if fmt not in LORA_FORMATS:
        raise UserError(f"unknown LoRA format {fmt!r}; choose one of {', '.join(LORA_FORMATS)}")
    meta = read_adapter_metadata(adapter)
    cfg = config_from_metadata(meta)
    check_low_rank(cfg.method, what=f"{adapter}: --format {fmt}")  # before any model is loaded
    rank = lora_rank(cfg)
    model = base_model_of(meta, model, adapter, allow_other_base)
    path = lora_file_path(out, fmt)
    check_file_output(path, "the export")
    check_export_target(path, adapter, model)
    unet, text_encoder = load_adapted_models(model, adapter, meta)
    state = peft_state_dict(lora_factors(unet, rank), dtype)
    layers = {"unet": sorted(name for name, _ in adapter_modules(unet))}
    if text_encoder is not None:
        factors = {text_model_name(name): f for name, f in lora_factors(text_encoder, rank).items()}
        state.update(peft_state_dict(factors, dtype, component="text_encoder"))
        layers["text_encoder"] = sorted(name for name, _ in adapter_modules(text_encoder))

    header = {
        "format": "pt",
        "ether_method": cfg.method,
        "ether_n_blocks": str(cfg.n_blocks),
        "ether_source_sha256": file_sha256(adapter),
        "ether_base_model": model,
    }
    if "rank" in METHODS[cfg.method].settings:
        header["ether_rank"] = str(cfg.rank)
    if meta.get("instance_prompt"):
        header["ether_instance_prompt"] = meta["instance_prompt"]
    if fmt == "kohya":
        state = kohya_state_dict(state, dtype)
        # The keys kohya's sd-scripts writes and A1111 / ComfyUI read: networks.lora, dim = alpha = rank, SD-1.
        header.update(ss_network_module="networks.lora", ss_network_dim=str(rank), ss_network_alpha=str(rank),
                      ss_base_model_version="sd_v1", ss_sd_model_name=model)
    else:
        header.update(diffusers_lora_metadata(layers, rank))
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=header)
    return path


def diffusers_lora_metadata(layers: dict[str, list[str]], rank: int) -> dict[str, str]:
    """The header diffusers' `save_lora_weights` writes and `load_lora_weights` reads back: each component's
    `LoraConfig` (`layers`: {component: its adapted layer names}) as JSON under `lora_adapter_metadata`, keys
    prefixed with the component (`unet.`, `text_encoder.`). The text encoder's layers are named as the model
    names them: PEFT matches a name as a suffix, so they match with and without `text_model.`."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from peft import LoraConfig

    config = {}
    for component, names in layers.items():
        component_config = LoraConfig(r=rank, lora_alpha=rank, target_modules=names).to_dict()
        config.update({f"{component}.{k}": sorted(v) if isinstance(v, set) else v for k, v in component_config.items()})
    return {LORA_ADAPTER_METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}


def export_merged(adapter, out, model: str | None = None, dtype: torch.dtype = torch.float32,
                  allow_other_base: bool = False) -> Path:
    """A stock diffusers pipeline folder at `out` with the adapter folded into the UNet weights (any method),
    and into the text encoder's where the adapter has a text-encoder part.
    An older export at `out` is replaced; any other existing folder is refused."""
    check_merged_target(out)
    meta = read_adapter_metadata(adapter)
    model = base_model_of(meta, model, adapter, allow_other_base)
    check_export_target(out, adapter, model)
    pipe = load_pipeline(model, adapter=adapter, merge=True)
    pipe.to(dtype=dtype)
    return write_folder(out, lambda folder: pipe.save_pretrained(folder, safe_serialization=True))


def check_merged_target(out, flag: str | None = None):
    """`out` (the value of `flag`, if a command-line flag) can take a merged pipeline: new, or an older export."""
    check_output_folder(out, flag)  # a file where the folder, or a folder above it, should be
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not (out / "model_index.json").is_file():
        raise UserError(f"{out} exists and is not a diffusers pipeline folder: choose a new folder for the merged model")


def export(adapter, fmt: str, out, model: str | None = None, dtype: torch.dtype | None = None,
           allow_other_base: bool = False) -> Path:
    """One entry for every format; `dtype` defaults to fp16 for the LoRA files (what the tools ship) and
    fp32 for a merged folder (what the trainers' --export_merged writes)."""
    if fmt == "merged":
        return export_merged(adapter, out, model, dtype or torch.float32, allow_other_base)
    return export_lora(adapter, fmt, out, model, dtype or torch.float16, allow_other_base)


# ------------------------------------------------------------------------------------------ trainers' side
def add_export_args(parser):
    parser.add_argument("--export_lora", choices=LORA_FORMATS, default=None,
                        help="At the end of the run also write the adapter as an exact LoRA file beside "
                             f"adapter.safetensors ({EXPORT_FILE_NAMES['kohya']} for kohya: A1111 / ComfyUI / "
                             f"diffusers; {EXPORT_FILE_NAMES['diffusers']} for diffusers). ETHER, ETHER+, LoRA, HRA.")


def check_export_args(args):
    """Refuse what the exports at the end of a run would refuse, before training starts rather than after."""
    if args.export_lora:
        check_low_rank(args.method, what=f"--export_lora {args.export_lora}")
    if getattr(args, "export_merged", None):
        check_merged_target(args.export_merged, "--export_merged")
        if Path(args.output_dir).resolve().is_relative_to(Path(args.export_merged).resolve()):  # replaced whole
            raise UserError(f"--export_merged {args.export_merged} would replace the run's --output_dir "
                            f"{args.output_dir}: choose another folder for the merged model")


def finish_run(output_dir, adapter_file, lora_format: str | None = None, grid=None) -> list[Path]:
    """What a trainer writes after its adapter: the LoRA export (`lora_format`, if any; fp16, as kohya's trainer
    saves by default) beside it, and the model card. Returns the paths written."""
    exports = {}
    if lora_format:
        exports[lora_format] = export_lora(adapter_file, lora_format, Path(output_dir, EXPORT_FILE_NAMES[lora_format]))
    for fmt, name in EXPORT_FILE_NAMES.items():  # an export of an older state (a run resumed without it): the
        if fmt != lora_format:                     # folder is this run's (run_folder.claim), so the file is ours
            Path(output_dir, name).unlink(missing_ok=True)
    return [*exports.values(), write_model_card(output_dir, adapter_file, exports, grid)]


# -------------------------------------------------------------------------------------------- model card
def adapter_summary(meta: dict) -> str:
    cfg, text_cfg = config_from_metadata(meta), text_encoder_config_from_metadata(meta)
    method = METHODS[cfg.method]
    shapes = json.loads(meta["shapes"])

    def parameters(text_encoder: bool) -> int:
        return sum(math.prod(shape) for name, shape in shapes.items()
                   if name.startswith(TEXT_ENCODER_PREFIX) == text_encoder)

    summary = (f"{method.title} ({method.shape(cfg)}, {parameters(False):,} trainable parameters) on "
               f"{', '.join(cfg.target_modules)}")
    if text_cfg is not None:
        summary += (f"; the text encoder was trained too: {method.title} ({parameters(True):,} trainable parameters) "
                    f"on its {', '.join(text_cfg.target_modules)}")
    return summary


def write_model_card(output_dir, adapter_file, exports: dict[str, Path] | None = None, grid=None) -> Path:
    """`README.md` in the output folder, as diffusers' training examples write one: YAML card data (base
    model, instance prompt, tags) and how to use the adapter and its exports in diffusers, ComfyUI and A1111.
    Everything it says is read from the adapter file's header."""
    from huggingface_hub import ModelCardData

    output_dir, adapter_name, exports = Path(output_dir), Path(adapter_file).name, exports or {}
    meta = read_adapter_metadata(adapter_file)
    method, title = meta["method"], METHODS[meta["method"]].title
    base = meta.get("base_model") or "the base model"
    builtin = base.startswith("builtin:")  # our offline models: not on the hub, loaded by ether_diffusion
    prompt = meta.get("instance_prompt") or None
    s2i = meta.get("task") == "s2i"
    data = ModelCardData(base_model=None if builtin or not meta.get("base_model") else base, instance_prompt=prompt,
                         library_name="diffusers",
                         tags=["stable-diffusion", "text-to-image", "diffusers", "diffusers-training", "ether-diffusion",
                               method.replace("+", "-plus"), *(["lora"] if exports else [])])
    if not s2i:
        task = "DreamBooth"
    elif meta.get("conditioning") == IMAGE_CONDITIONING:
        task = "Conditioning image to image (ControlNet-style data) with a signal encoder"
    else:
        task = "Semantic map to image (ADE20K) with a ControlNet-style signal encoder"
    lines = ["---", data.to_yaml(), "---", "", f"# {title} adapter for {base}", "",
             f"{task}, trained with ether-diffusion for {meta.get('steps', '?')} steps: {adapter_summary(meta)}.", ""]
    if prompt:
        lines += [f"Trigger prompt: `{prompt}`.", ""]
    if grid is not None and Path(grid).is_file():
        lines += [f"![samples at the last step]({Path(os.path.relpath(grid, output_dir)).as_posix()})", ""]

    lines += ["## Files", "", f"- `{adapter_name}`: the adapter (ether-diffusion's format: `ether_diffusion.load_adapter`, "
              "`python -m ether_diffusion.sample --adapter`)."]
    if s2i:
        lines.append("- `control_encoder.safetensors` + `.json`: the signal encoder that reads the map "
                     "(`ether_diffusion.control.S2IPipeline.from_output`). A LoRA file carries the UNet's adapter only.")
    for fmt, path in exports.items():
        lines.append(f"- `{Path(path).name}`: the same adapter as an exact rank-{lora_rank(config_from_metadata(meta))} "
                     f"LoRA ({fmt} format): every layer's update W' - W is low rank, so nothing is approximated.")

    lines += ["", "## Use it in diffusers", "", "```python"]
    if builtin:
        lines += ["from ether_diffusion.pipelines import load_pipeline", "",
                  f'pipe = load_pipeline("{base}")  # a stock StableDiffusionPipeline']
    else:
        lines += ["import torch", "from diffusers import StableDiffusionPipeline", "",
                  f'pipe = StableDiffusionPipeline.from_pretrained("{base}", torch_dtype=torch.float16).to("cuda")']
    if exports:
        name = Path(next(iter(exports.values()))).name
        lines.append(f'pipe.load_lora_weights("{output_dir.name}", weight_name="{name}")  # this folder')
    else:
        text_encoder = ", text_encoder=pipe.text_encoder" if text_encoder_config_from_metadata(meta) else ""
        lines += ["from ether_diffusion import load_adapter", "",
                  f'load_adapter(pipe.unet, "{output_dir.name}/{adapter_name}"{text_encoder})']
    lines += [f'image = pipe("{prompt or "a photo"}").images[0]', "```", "", "## Use it in ComfyUI / AUTOMATIC1111", ""]
    if "kohya" in exports:
        name = Path(exports["kohya"]).name
        lines.append(f"`{name}` is a kohya-format LoRA, the form both read. ComfyUI: copy it to `ComfyUI/models/loras/` "
                     "and add a *Load LoRA* node after the checkpoint loader (strength 1.0). AUTOMATIC1111: copy it to "
                     f"`models/Lora/` and write `<lora:{Path(name).stem}:1>` in the prompt.")
    elif METHODS[method].update_rank is None:
        lines.append(f"A {title} update is full rank: no LoRA file holds it. Export a merged pipeline folder with "
                     f"`python -m ether_diffusion.export {adapter_name} --format merged OUT`.")
    else:
        lines.append("Export the adapter as an exact kohya-format LoRA, the form both read: "
                     f"`python -m ether_diffusion.export {adapter_name} --format kohya {EXPORT_FILE_NAMES['kohya']}` "
                     "(or train with `--export_lora kohya`).")
    return write_text(output_dir / MODEL_CARD, "\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------- command line
def parse_args(argv=None):
    p = ArgumentParser(prog="python -m ether_diffusion.export", description=__doc__.split("\n")[0])
    p.add_argument("adapter", help="An adapter file (adapter.safetensors) written by a trainer or save_adapter.")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="kohya: one LoRA file for A1111 / ComfyUI / diffusers; diffusers: the PEFT-style LoRA file "
                        "diffusers writes; merged: a diffusers pipeline folder with the adapter folded in (any method).")
    p.add_argument("out", help="The file to write (a folder: the file goes inside it, as "
                               f"{EXPORT_FILE_NAMES['kohya']} / {EXPORT_FILE_NAMES['diffusers']}), or for merged the folder.")
    p.add_argument("--dtype", choices=["fp16", "fp32"], default=None,
                   help="Precision of the written tensors (default: fp16 for LoRA files, fp32 for merged).")
    p.add_argument("--model", default=None,
                   help="The base model (hub id, folder or builtin:tiny-sd); default: the one the adapter file names. "
                        "Another model than that one is refused (see --allow_other_base).")
    p.add_argument("--allow_other_base", action="store_true",
                   help="Accept a --model other than the one the adapter file names (the same model in another place, "
                        "or a deliberate transfer to another base: the update then differs from the trained one).")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    path = export(args.adapter, args.format, args.out, model=args.model,
                  dtype=TORCH_DTYPES[args.dtype] if args.dtype else None, allow_other_base=args.allow_other_base)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    run_cli(main)
