"""The toy world's judge: what a picture shows (object, colour, scene, subject), and metric backbones that mean
something on the toy world.

    python -m ether_diffusion.toy.judge IMAGE [IMAGE ...]        # one line of answers per picture
    python -m ether_diffusion.toy.judge --paths                   # the backbone folders, for the evaluators
    python -m ether_diffusion.toy.judge --grid demo-output/samples/final.png \
        --config configs/dreambooth/demo.yaml --subject star_toy  # what `make demo` prints at its end
    python -m ether_diffusion.toy.judge --s2i_grid demo-output/s2i/samples/final.png   # what `make demo-s2i` prints

Two models, trained by `python -m ether_diffusion.toy.pretrain` (stage `judge`) and shipped in the package:

- `weights/judge/`: an image-text model in open_clip's own classes, saved as an open_clip folder
  (`open_clip_config.json` + `open_clip_model.safetensors`), trained contrastively on the world's captions, so
  `evaluate/dreambooth.py --clip` and `--dino` (which accept such a folder) give meaningful CLIP-I, CLIP-T and
  DINO-style scores here. Beside it, `judge_heads.safetensors`: small heads on its image embedding that name
  the object, colour, scene, subject (one of the subjects, "another toy" or "no toy") and a toy's parts.
  Heads answer more accurately than zero-shot prompts through the text tower on near misses (a subject
  with one detail changed), which the subject answer must get right.
- `weights/segmenter/`: a transformers `UperNetForSemanticSegmentation` with ADE20K's 150 labels (what
  `evaluate/s2i.py --segmenter` loads), trained on the world's label maps.

Both are trained on world pictures and on their VAE reconstructions (generated pictures look like those),
with subjects and near misses shown far more often than chance would (the generator never sees subjects).
"""
import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..errors import ArgumentParser, UserError, run_cli
from ..files import load_rgb, read_yaml_mapping
from . import world
from .model import CONTEXT_LENGTH
from .steps import mix, pictures, step_generator, train_steps

WEIGHTS = Path(__file__).with_name("weights")
JUDGE, SEGMENTER = WEIGHTS / "judge", WEIGHTS / "segmenter"
HEADS_FILE, HEADS_CONFIG = "judge_heads.safetensors", "judge_heads.json"

# What each head answers; toy parts are answered (and trained) on toys only.
ANSWERS = {
    "kind": list(world.KINDS),
    "colour": list(world.COLOURS),
    "scene": list(world.SCENES),
    "subject": [*world.SUBJECTS, world.ANOTHER_TOY, world.NO_TOY],
    "shape": list(world.TOY_SHAPES),
    "eyes": list(world.TOY_EYES),
    "mark": list(world.TOY_MARKS),
    "feet": list(world.TOY_FEET),
}
TOY_PARTS = ("shape", "eyes", "mark", "feet")
LOOK_PARTS = ("colour", *TOY_PARTS)  # what makes a toy's look (world.ToyLook); colour is its body's
IMAGE_MEAN, IMAGE_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # OpenAI CLIP's
SEGMENTER_MEAN, SEGMENTER_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as UperNet's processor


def truth(scene: world.Scene) -> dict:
    """The right answers for a drawn scene (toy parts are None for objects)."""
    look = scene.look
    return {"kind": scene.kind, "colour": scene.colour, "scene": scene.scene, "subject": scene.subject,
            **{part: (getattr(look, part) if look else None) for part in TOY_PARTS}}


# ============================================================================================ the judge
class Judge:
    """`Judge()(images)` -> one dict of answers per PIL image, e.g. {"kind": "toy", "colour": "red",
    "scene": "beach", "subject": "star_toy", "shape": "round", ...} (toy parts only where kind is toy)."""

    def __init__(self, folder=JUDGE, device="cpu", batch_size: int = 256):
        import open_clip

        folder = Path(folder)
        if not (folder / HEADS_FILE).is_file():
            raise UserError(f"{folder} is not a toy judge folder (no {HEADS_FILE})")
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}", device=device)
        self.model.eval()
        config = json.loads((folder / HEADS_CONFIG).read_text())
        self.answers = config["answers"]
        self.heads = build_heads(config["embed_dim"], self.answers)
        self.heads.load_state_dict({k: v.float() for k, v in load_file(str(folder / HEADS_FILE)).items()})
        self.heads.to(device).eval()
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def logits(self, images) -> dict[str, torch.Tensor]:
        out = {name: [] for name in self.answers}
        for start in range(0, len(images), self.batch_size):
            pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in images[start:start + self.batch_size]])
            features = self.model.encode_image(pixels.to(self.device))
            for name, head in self.heads.items():
                out[name].append(head(features).float().cpu())
        return {name: torch.cat(values) for name, values in out.items()}

    def __call__(self, images) -> list[dict]:
        logits = self.logits(list(images))
        answers = []
        for i in range(len(images)):
            answer = {name: self.answers[name][int(logits[name][i].argmax())] for name in ("kind", "colour", "scene", "subject")}
            if answer["kind"] == world.TOY:
                answer.update({part: self.answers[part][int(logits[part][i].argmax())] for part in TOY_PARTS})
            answers.append(answer)
        return answers


def build_heads(embed_dim: int, answers: dict) -> torch.nn.ModuleDict:
    return torch.nn.ModuleDict({name: torch.nn.Sequential(torch.nn.Linear(embed_dim, embed_dim), torch.nn.GELU(),
                                                          torch.nn.Linear(embed_dim, len(values)))
                                for name, values in answers.items()})


# ============================================================================================ training
def _clip_model(c: dict):
    import open_clip

    return open_clip.CLIP(**_clip_config(c))


def _clip_config(c: dict) -> dict:
    return {
        "embed_dim": c["embed_dim"],
        "vision_cfg": {"image_size": c["image_size"], "patch_size": c["patch_size"], "width": c["vision_width"],
                       "layers": c["vision_layers"], "head_width": c["head_width"]},
        "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": 49408, "width": c["text_width"], "heads": c["text_heads"],
                     "layers": c["text_layers"]},
    }


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    """[-1, 1] pictures -> a model's normalised input."""
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return ((x + 1) / 2 - mean) / std


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, seed: int, batch_size: int = 256) -> torch.Tensor:
    """VAE round trips (a posterior sample each), quantised to 8 bits like a saved picture."""
    out = []
    g = torch.Generator().manual_seed(seed)
    for start in tqdm(range(0, len(images), batch_size), desc="reconstructing"):
        z = vae.encode(images[start:start + batch_size]).latent_dist.sample(generator=g)
        out.append(vae.decode(z).sample.clamp(-1, 1))
    return (torch.cat(out) * 127.5).round() / 127.5


def _labels_tensor(values, names) -> torch.Tensor:
    return torch.tensor([names.index(v) if v is not None else -100 for v in values])


def judge_data(c: dict, seed: int, size: int, vae, count: int):
    """Pictures, their reconstructions, captions, answers and label maps of `count` judge examples."""

    examples = list(world.examples(seed, count, size, toy_fraction=c["toy_fraction"], subjects=True,
                                   near_misses=c["near_misses"]))
    images = pictures(examples)
    answers = [truth(e.scene) for e in examples]
    return {
        "images": images,
        "reconstructions": reconstruct(vae, images, seed),
        "scenes": [e.scene for e in examples],
        "targets": {name: _labels_tensor([a[name] for a in answers], values) for name, values in ANSWERS.items()},
        "labels": torch.from_numpy(np.stack([e.labels for e in examples])).long(),
    }


def train(config: dict, output_dir: Path, log):
    """The `judge` stage of pretraining: the image-text judge with its heads, then the segmenter."""
    from diffusers import AutoencoderKL


    c, seed, size = config["judge"], config["seed"], config["size"]
    vae = AutoencoderKL.from_pretrained(output_dir / "vae").eval()
    data = judge_data(c, seed + 2, size, vae, c["pool"])  # a function of the seed: a resumed run draws it again
    import open_clip

    tokenizer = open_clip.SimpleTokenizer(context_length=CONTEXT_LENGTH)  # what get_tokenizer gives for the folder
    torch.manual_seed(seed)
    model, heads = _clip_model(c), build_heads(c["embed_dim"], ANSWERS)
    print(f"judge: {sum(p.numel() for p in model.parameters()):,} parameters (open_clip), heads "
          f"{sum(p.numel() for p in heads.parameters()):,}")
    optimizer = torch.optim.AdamW([*model.parameters(), *heads.parameters()], lr=c["lr"], weight_decay=c["weight_decay"])
    n = len(data["images"])

    def batch_pixels(index, g):
        # Half the pictures are VAE reconstructions, some get a little noise: generated pictures are like that.
        use_reconstruction = torch.rand(len(index), generator=g) < 0.5
        x = torch.where(use_reconstruction[:, None, None, None], data["reconstructions"][index], data["images"][index])
        noise = torch.rand(len(index), 1, 1, 1, generator=g) * c["noise"]
        return (x + noise * torch.randn(x.shape, generator=g)).clamp(-1, 1)

    def step_fn(step):
        g = step_generator(seed, "judge", step)
        index = torch.randint(0, n, (c["batch_size"],), generator=g)
        rng = random.Random(mix(seed, "judge-captions", step))
        texts = tokenizer([world.caption(data["scenes"][i], rng) for i in index.tolist()])
        image_features = model.encode_image(_normalise(batch_pixels(index, g), IMAGE_MEAN, IMAGE_STD))
        text_features = model.encode_text(texts)
        logits = model.logit_scale.exp() * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T
        # Identical captions in a batch are not negatives of each other.
        same = (texts[:, None, :] == texts[None, :, :]).all(-1).float()
        target = same / same.sum(1, keepdim=True)
        contrastive = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        head_losses = {name: F.cross_entropy(head(image_features), data["targets"][name][index], ignore_index=-100)
                       for name, head in heads.items()}
        loss = contrastive + sum(head_losses.values())
        loss.backward()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        return {"contrastive": contrastive.item(), "heads": sum(v.item() for v in head_losses.values())}

    checkpoint = train_steps("judge", output_dir, c["steps"], config["checkpoint_every"], {"clip": model, "heads": heads},
                             optimizer, step_fn, c["lr"], c["warmup"], log)
    save_judge(output_dir / "judge-tmp", model, heads, c)
    train_segmenter(config, output_dir, data, log)
    (output_dir / "judge-tmp").rename(output_dir / "judge")
    checkpoint.remove()


def save_judge(folder: Path, model, heads, c: dict):
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": _clip_config(c),
              "preprocess_cfg": {"mean": list(IMAGE_MEAN), "std": list(IMAGE_STD)}}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=1))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    save_file({k: v.contiguous() for k, v in heads.state_dict().items()}, str(folder / HEADS_FILE))
    (folder / HEADS_CONFIG).write_text(json.dumps({"embed_dim": c["embed_dim"], "answers": ANSWERS}, indent=1))


def build_segmenter(c: dict):
    from transformers import ConvNextConfig, UperNetConfig, UperNetForSemanticSegmentation

    backbone = ConvNextConfig(hidden_sizes=c["hidden_sizes"], depths=c["depths"], patch_size=c["patch_size"],
                              out_features=["stage1", "stage2", "stage3", "stage4"])
    config = UperNetConfig(backbone_config=backbone, hidden_size=c["hidden_size"], num_labels=150,
                           use_auxiliary_head=False, loss_ignore_index=255)
    return UperNetForSemanticSegmentation(config)


def train_segmenter(config: dict, output_dir: Path, data: dict, log):
    """UperNet on the world's label maps: class index = label - 1, label 0 ("other") ignored."""
    from transformers import SegformerImageProcessor


    c, seed, size = config["segmenter"], config["seed"], config["size"]
    torch.manual_seed(seed)
    model = build_segmenter(c)
    print(f"segmenter: {sum(p.numel() for p in model.parameters()):,} parameters")
    optimizer = torch.optim.AdamW(model.parameters(), lr=c["lr"], weight_decay=c["weight_decay"])
    targets = torch.where(data["labels"] > 0, data["labels"] - 1, torch.full_like(data["labels"], 255))
    n = len(targets)

    def step_fn(step):
        g = step_generator(seed, "segmenter", step)
        index = torch.randint(0, n, (c["batch_size"],), generator=g)
        use_reconstruction = torch.rand(len(index), generator=g) < 0.5
        x = torch.where(use_reconstruction[:, None, None, None], data["reconstructions"][index], data["images"][index])
        loss = model(pixel_values=_normalise(x, SEGMENTER_MEAN, SEGMENTER_STD), labels=targets[index]).loss
        loss.backward()
        return {"loss": loss.item()}

    checkpoint = train_steps("segmenter", output_dir, c["steps"], config["checkpoint_every"], {"segmenter": model},
                             optimizer, step_fn, c["lr"], c["warmup"], log)
    model.save_pretrained(output_dir / "judge-tmp" / "segmenter")
    SegformerImageProcessor(size={"height": size, "width": size}, do_reduce_labels=False).save_pretrained(
        output_dir / "judge-tmp" / "segmenter")
    checkpoint.remove()


# ============================================================================================ accuracy
def accuracy(judge: Judge, images, scenes) -> dict[str, float]:
    """Per answer, the fraction right (toy parts over toys only)."""
    answers = judge(images)
    right = {name: [] for name in ANSWERS}
    for answer, scene in zip(answers, scenes):
        expected = truth(scene)
        for name in ANSWERS:
            if expected[name] is not None:
                right[name].append(answer.get(name) == expected[name])
    return {name: float(np.mean(values)) for name, values in right.items() if values}


# ============================================================================================ export, CLI
def export(output_dir: Path, target: Path):
    """Ship the judge (fp16 image-text model and heads) and the segmenter (float32: it is small)."""
    import shutil

    source = Path(output_dir) / "judge"
    if not source.is_dir():
        return
    for name in ("judge", "segmenter"):
        shutil.rmtree(Path(target) / name, ignore_errors=True)
    shutil.copytree(source / "segmenter", Path(target) / "segmenter")
    out = Path(target) / "judge"
    out.mkdir(parents=True)
    for name in ("open_clip_config.json", HEADS_CONFIG):
        shutil.copy(source / name, out / name)
    for name in ("open_clip_model.safetensors", HEADS_FILE):
        tensors = load_file(str(source / name))
        save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, str(out / name))


def parts_right(answer: dict, subject: str) -> float:
    """How much of the subject's look a picture has: the fraction of its five parts (body colour, shape, eyes,
    mark, feet) the judge sees as the subject's; 0 for a picture without a toy. Partial learning shows here
    before the subject itself is found."""
    if answer["kind"] != world.TOY:
        return 0.0
    look = world.SUBJECTS[subject]
    return sum(answer[part] == getattr(look, part) for part in LOOK_PARTS) / len(LOOK_PARTS)


def grid_tiles(grid, rows: int, cols: int) -> list[list]:
    """A trainer's sample grid (rows: prompts, columns: images) cut back into its pictures."""
    width, height = grid.width // cols, grid.height // rows
    if width * cols != grid.width or height * rows != grid.height:
        raise UserError(f"a {grid.width}x{grid.height} grid does not split into {rows} rows x {cols} columns")
    return [[grid.crop((c * width, r * height, (c + 1) * width, (r + 1) * height)) for c in range(cols)]
            for r in range(rows)]


def judge_grid(judge: Judge, grid, prompts, subject: str) -> str:
    """"subject found in N of M samples, scenes right in K of L" for a grid with one row per prompt; a row's
    scene is the one its prompt names (rows without one count for the subject only)."""
    side = grid.height // len(prompts)  # the pictures are square
    rows = grid_tiles(grid, len(prompts), grid.width // side)
    found = scenes = scene_total = 0
    parts = 0.0
    for prompt, images in zip(prompts, rows):
        expected = next((name for name, phrase in world.SCENES.items() if phrase in prompt), None)
        for answer in judge(images):
            found += answer["subject"] == subject
            parts += parts_right(answer, subject)
            if expected is not None:
                scene_total += 1
                scenes += answer["scene"] == expected
    total = sum(len(row) for row in rows)
    return (f"the judge saw: subject {subject} found in {found} of {total} samples (its look's parts right: "
            f"{100 * parts / total:.0f}%), scenes right in {scenes} of {scene_total}")


def judge_s2i_grid(grid, side: int, segmenter=SEGMENTER) -> str:
    """"mIoU and accuracy of the generated pictures, and of the real ones" for an S2I trainer's grid whose rows
    are map | generated pictures | real picture (tiles of `side` px). The map tiles are coloured in the ADE20K
    palette, so their labels are read back exactly; the segmenter is scored as evaluate/s2i.py scores it."""
    from ..ade20k import colors_to_labels
    from ..segmentation import SegmentationScores, UperNetSegmenter

    if side < 1 or grid.height < side or grid.width < 3 * side:
        raise UserError(f"a {grid.width}x{grid.height} grid is not rows of {side} px tiles map | generated | real "
                        f"picture (give --resolution)")
    rows = grid_tiles(grid, grid.height // side, grid.width // side)  # refuses a size that is no multiple
    labels = [colors_to_labels(np.asarray(row[0]), "the grid's map column") for row in rows]
    if not any((target > 0).any() for target in labels):  # all "other" (black): mIoU would be nan
        raise UserError("the grid's map column holds no labelled pixel: give an S2I trainer's grid "
                        "(rows: map | generated | real picture)")
    segment = UperNetSegmenter(str(segmenter))
    generated, real = SegmentationScores(), SegmentationScores()
    for row, target in zip(rows, labels):
        *pictures, real_picture = segment(row[1:])  # the generated pictures and the real one, in one call
        for predicted in pictures:
            generated.update(predicted, target)
        real.update(real_picture, target)
    g, r = generated.compute(), real.compute()
    return (f"the segmenter saw: mIoU {100 * g['miou']:.1f}% and accuracy {100 * g['accuracy']:.1f}% on the "
            f"{len(rows) * (len(rows[0]) - 2)} generated pictures of {len(rows)} validation maps; the maps' real "
            f"pictures: {100 * r['miou']:.1f}% and {100 * r['accuracy']:.1f}%")


def main(argv=None):
    p = ArgumentParser(prog="python -m ether_diffusion.toy.judge", description=__doc__.split("\n")[0])
    p.add_argument("images", nargs="*", help="Pictures to judge.")
    p.add_argument("--judge", default=str(JUDGE), help="A judge folder (default: the shipped one).")
    p.add_argument("--paths", action="store_true", help="Print the backbone folders for --clip/--dino/--segmenter.")
    p.add_argument("--grid", default=None, help="A trainer's sample grid (one row per validation prompt).")
    p.add_argument("--config", default=None, help="The trainer's YAML, for the grid's validation prompts.")
    p.add_argument("--subject", default=world.DEMO_SUBJECT, choices=list(world.SUBJECTS),
                   help="The subject the grid should show.")
    p.add_argument("--s2i_grid", default=None,
                   help="An S2I trainer's grid (rows: map | generated | real picture): the segmenter's mIoU.")
    p.add_argument("--resolution", type=int, default=world.SIZE, help="The --s2i_grid's tile size in pixels.")
    args = p.parse_args(argv)
    if args.s2i_grid:
        print(judge_s2i_grid(load_rgb(args.s2i_grid), args.resolution))
        return
    if args.paths:
        print(f"--clip {JUDGE} --dino {JUDGE} --segmenter {SEGMENTER}")
        return
    judge = Judge(args.judge)
    if args.grid:
        if not args.config:
            raise UserError("--grid needs --config (the YAML whose validation_prompt rows the grid has)")
        prompts = read_yaml_mapping(args.config).get("validation_prompt") or []
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise UserError(f"{args.config} has no validation_prompt")
        print(judge_grid(judge, load_rgb(args.grid), prompts, args.subject))
        return
    if not args.images:
        raise UserError("give pictures to judge (or --grid, or --paths)")
    images = [load_rgb(path) for path in args.images]
    for path, answer in zip(args.images, judge(images)):
        print(f"{path}: " + " ".join(f"{k}={v}" for k, v in answer.items()))


if __name__ == "__main__":
    run_cli(main)
