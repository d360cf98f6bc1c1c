"""The toy world: seeded, procedurally drawn, captioned scenes whose every pixel has a known label.

One thing stands in one of five scenes. Things are coloured objects (ball, box, tent, bottle) or **toys**:
creatures whose body colour, shape, eyes, belly mark and feet vary, so "a photo of toy" means something to a
model trained here. **Subjects** are four fixed toy looks that pretraining never shows (`sample_scene`
redraws a toy that happens to look like one); DreamBooth has to learn them from a few pictures.
`qwe toy` in the demo is the subject `star_toy`: red round body, big eyes, yellow star, blue feet.

Label maps use ADE20K label values (`ade20k_palette.csv`), so the S2I trainer, its dataset class, palette and
`evaluate/s2i.py` run on the toy world unchanged. The closest ADE20K class for each region:

    sky 3, sea 27, sand 47, grass 10, wall 1, floor 4,
    snow-covered ground -> earth;ground 14 (ADE20K's 150 classes have no snow),
    night ground -> land;ground;soil 95,
    ball 120, box 42, tent 115, bottle 99, toy (body, eyes, marks, feet) -> plaything;toy 109.

Pictures are drawn 4x larger and reduced by area averaging (smooth edges); a label map takes the label that
covers most of each output pixel, so pixels and labels agree except on anti-aliased edges.

Writers: `write_subjects` (the DreamBooth dataset layout `evaluate/protocol.py` reads) and `write_ade20k`
(the ADEChallengeData2016 layout with `metadata.jsonl` captions).
"""
import json
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..files import save_image

SIZE = 32  # the toy model's image size (see docs/toy_world.md for why)
SUPERSAMPLE = 4

COLOURS = {
    "red": (215, 35, 40), "orange": (245, 135, 20), "yellow": (245, 215, 30), "green": (30, 140, 50),
    "blue": (40, 80, 220), "purple": (135, 55, 195), "pink": (245, 125, 190), "brown": (125, 75, 35),
}
OBJECTS = ("ball", "box", "tent", "bottle")
TOY = "toy"
KINDS = OBJECTS + (TOY,)
SCENES = {"beach": "on the beach", "snow": "in the snow", "grass": "on the grass", "night": "at night",
          "room": "in a room"}

# ADE20K label values (ade20k_palette.csv) of every region the world draws.
LABELS = {"sky": 3, "sea": 27, "sand": 47, "snow": 14, "grass": 10, "night_ground": 95, "wall": 1, "floor": 4,
          "ball": 120, "box": 42, "tent": 115, "bottle": 99, "toy": 109}

# scene -> (upper region, colour), (lower region, colour); the beach has a strip of sea at the horizon.
BACKGROUNDS = {
    "beach": (("sky", (135, 200, 240)), ("sand", (225, 200, 140))),
    "snow": (("sky", (195, 210, 225)), ("snow", (248, 250, 252))),
    "grass": (("sky", (110, 170, 235)), ("grass", (120, 200, 90))),
    "night": (("sky", (15, 20, 60)), ("night_ground", (45, 50, 70))),
    "room": (("wall", (225, 215, 190)), ("floor", (150, 100, 60))),
}
SEA = (30, 100, 200)

# What varies among toys. A look is one value of each.
TOY_SHAPES = ("round", "square")
TOY_EYES = ("big", "small", "one")
TOY_MARKS = ("none", "star", "heart", "stripe")
TOY_FEET = {"blue": (40, 80, 220), "black": (25, 25, 30), "yellow": (245, 215, 30), "white": (250, 250, 250)}
EYE_WORDS = {"big": "big eyes", "small": "small eyes", "one": "one eye"}
MARK_WORDS = {"none": "no mark", "star": "a star", "heart": "a heart", "stripe": "a stripe"}


@dataclass(frozen=True)
class ToyLook:
    colour: str
    shape: str
    eyes: str
    mark: str
    feet: str

    def describe(self) -> str:
        return (f"{article(self.colour)} {self.colour} {self.shape} toy with {EYE_WORDS[self.eyes]}, {MARK_WORDS[self.mark]} "
                f"and {self.feet} feet")


# The subjects: fixed looks, each differing from every other in at least three of the five attributes.
SUBJECTS = {
    "star_toy": ToyLook("red", "round", "big", "star", "blue"),
    "heart_toy": ToyLook("blue", "square", "small", "heart", "yellow"),
    "stripe_toy": ToyLook("green", "square", "one", "stripe", "white"),
    "cyclops_toy": ToyLook("purple", "round", "one", "heart", "black"),
}
DEMO_SUBJECT = "star_toy"
IDENTIFIER = "qwe"  # the subjects' DreamBooth identifier: "a photo of qwe toy"; pretraining never shows its tokens
TOY_FRACTION = 0.4  # of the pictures `sample_scene` draws, unless asked otherwise
SUBJECT_SCENES = ("room", "grass")  # where the subjects' photos are taken: beach, snow and night are new to them
ANOTHER_TOY, NO_TOY = "another toy", "no toy"


@dataclass(frozen=True)
class Scene:
    kind: str             # one of KINDS
    colour: str           # the object's colour, or the toy's body colour
    scene: str            # one of SCENES
    x: float              # centre of the thing, as a fraction of the width
    bottom: float         # where it stands, as a fraction of the height
    scale: float          # its half-width, as a fraction of the size
    horizon: float        # the horizon, as a fraction of the height
    flip: bool = False
    look: ToyLook | None = None  # toys only
    name: str | None = None      # a named toy's name (pretraining's named individuals, see `sample_scene`)

    @property
    def subject(self) -> str:
        """Which subject this picture shows: a subject's name, ANOTHER_TOY or NO_TOY."""
        if self.kind != TOY:
            return NO_TOY
        return next((name for name, look in SUBJECTS.items() if look == self.look), ANOTHER_TOY)


# ----------------------------------------------------------------------------------------------- sampling
def random_look(rng: random.Random, avoid=()) -> ToyLook:
    """A random toy look; one in `avoid` (the subjects' looks, for pretraining) is redrawn."""
    while True:
        look = ToyLook(rng.choice(list(COLOURS)), rng.choice(TOY_SHAPES), rng.choice(TOY_EYES),
                       rng.choice(TOY_MARKS), rng.choice(list(TOY_FEET)))
        if look not in avoid:
            return look


def near_miss(look: ToyLook, rng: random.Random) -> ToyLook:
    """`look` with one attribute changed: the hardest "another toy" for a judge."""
    field, values = rng.choice([("colour", list(COLOURS)), ("shape", TOY_SHAPES), ("eyes", TOY_EYES),
                                ("mark", TOY_MARKS), ("feet", list(TOY_FEET))])
    return replace(look, **{field: rng.choice([v for v in values if v != getattr(look, field)])})


def _placement(rng: random.Random, kind: str, scene: str) -> dict:
    horizon = rng.uniform(0.42, 0.6)
    scale = rng.uniform(0.28, 0.38) if kind == TOY else rng.uniform(0.16, 0.3)
    bottom = rng.uniform(max(horizon + 0.2, 0.8), 0.97)
    x = rng.uniform(scale + 0.04, 1 - scale - 0.04)
    return dict(x=x, bottom=bottom, scale=scale, horizon=horizon, flip=rng.random() < 0.5)


def sample_scene(rng: random.Random, toy_fraction: float = TOY_FRACTION, subjects: bool = False,
                 near_misses: float = 0.0, named: dict | None = None, named_fraction: float = 0.0) -> Scene:
    """A random scene. Pretraining (`subjects=False`) never gets a subject's look: such a draw is redrawn.
    A judge may ask for `subjects` (a quarter of the toys are subjects) and `near_misses` (that fraction of
    the other toys is a subject with one attribute changed). `named` ({name: look}, never a subject's look)
    makes `named_fraction` of the toys named individuals, captioned by their name alone."""
    scene = rng.choice(list(SCENES))
    if rng.random() >= toy_fraction:
        kind = rng.choice(OBJECTS)
        return Scene(kind, rng.choice(list(COLOURS)), scene, **_placement(rng, kind, scene))
    if named and rng.random() < named_fraction:  # no draw without names: other callers' streams stay as they were
        name = rng.choice(list(named))  # insertion order: a function of the seed, like the names
        return Scene(TOY, named[name].colour, scene, look=named[name], name=name, **_placement(rng, TOY, scene))
    if subjects and rng.random() < 0.25:
        look = SUBJECTS[rng.choice(list(SUBJECTS))]
    elif rng.random() < near_misses:
        look = near_miss(SUBJECTS[rng.choice(list(SUBJECTS))], rng)
    else:  # a near miss differs from its subject in one part and from the others in two or more: never a subject
        look = random_look(rng, avoid=() if subjects else SUBJECTS.values())
    return Scene(TOY, look.colour, scene, look=look, **_placement(rng, TOY, scene))


def subject_scene(name: str, rng: random.Random, scenes=SUBJECT_SCENES) -> Scene:
    look = SUBJECTS[name]
    return Scene(TOY, look.colour, rng.choice(scenes), look=look, **_placement(rng, TOY, "room"))


def caption(scene: Scene, rng: random.Random, full_look: float = 0.0) -> str:
    """A caption in the words prompts use; parts are left out at random, so "a photo of toy" or "a ball on
    the beach" mean every toy or every colour of ball. `full_look`: the fraction of toy captions that name
    all five parts (`ToyLook.describe`); a named toy is called by its name only, as a subject is."""
    where = f" {SCENES[scene.scene]}" if rng.random() < 0.85 else ""
    if scene.kind != TOY:
        words = f"{scene.colour} {scene.kind}" if rng.random() < 0.85 else scene.kind
        return f"{rng.choice(['a photo of ', ''])}{article(words)} {words}{where}"
    if scene.name:
        return rng.choice([f"a photo of {scene.name} {TOY}", f"a {scene.name} {TOY}", f"a photo of a {scene.name} {TOY}"]) + where
    look = scene.look
    if full_look and rng.random() < full_look:
        return rng.choice(["a photo of ", ""]) + look.describe() + where
    front = [w for w, p in ((look.colour, 0.6), (look.shape, 0.4)) if rng.random() < p]
    details = [d for d, p in ((EYE_WORDS[look.eyes], 0.4), (MARK_WORDS[look.mark], 0.4), (f"{look.feet} feet", 0.4))
               if rng.random() < p]
    if front or details:
        text = article(front[0] if front else TOY) + " " + " ".join(front + [TOY])
    else:
        text = rng.choice(["a photo of toy", "a photo of a toy", "a toy"])
    if details:
        text += " with " + (", ".join(details[:-1]) + " and " + details[-1] if len(details) > 1 else details[0])
    return text + where


def vocabulary() -> list[str]:
    """Every word a caption can use (prompts add only the identifier, which the world never shows)."""
    words = [",", "a", "an", "photo", "of", "with", "and", TOY, "feet", *COLOURS, *OBJECTS, *TOY_SHAPES, *TOY_FEET]
    for phrase in (*SCENES.values(), *EYE_WORDS.values(), *MARK_WORDS.values()):
        words += phrase.split()
    return sorted(set(words))


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# ----------------------------------------------------------------------------------------------- drawing
def _jitter(colour, rng, amount=12):
    return tuple(int(min(255, max(0, c + rng.randint(-amount, amount)))) for c in colour)


def _darker(colour, factor=0.55):
    return tuple(int(c * factor) for c in colour)


def _star(cx, cy, r_out, r_in, points=5):
    return [(cx + (r_out if i % 2 == 0 else r_in) * math.cos(-math.pi / 2 + i * math.pi / points),
             cy + (r_out if i % 2 == 0 else r_in) * math.sin(-math.pi / 2 + i * math.pi / points))
            for i in range(2 * points)]


def _heart(draw, cx, cy, r, fill):
    draw.ellipse([cx - r, cy - 0.75 * r, cx, cy + 0.2 * r], fill=fill)
    draw.ellipse([cx, cy - 0.75 * r, cx + r, cy + 0.2 * r], fill=fill)
    draw.polygon([(cx - 0.97 * r, cy - 0.1 * r), (cx + 0.97 * r, cy - 0.1 * r), (cx, cy + r)], fill=fill)


class _Canvas:
    """An RGB picture and its label map, drawn together at SUPERSAMPLE x the output size."""

    def __init__(self, size: int):
        self.s = size * SUPERSAMPLE
        self.image = Image.new("RGB", (self.s, self.s))
        self.labels = Image.new("L", (self.s, self.s))
        self.draw, self.label_draw = ImageDraw.Draw(self.image), ImageDraw.Draw(self.labels)

    def shape(self, method: str, xy, fill, label: int, **kw):
        getattr(self.draw, method)(xy, fill=fill, **kw)
        kw.pop("width", None)
        getattr(self.label_draw, method)(xy, fill=label, **{k: v for k, v in kw.items() if k != "outline"})


def _background(canvas: _Canvas, scene: Scene, rng: random.Random):
    s = canvas.s
    (top_name, top_colour), (ground_name, ground_colour) = BACKGROUNDS[scene.scene]
    horizon = int(scene.horizon * s)
    canvas.shape("rectangle", [0, 0, s, horizon], _jitter(top_colour, rng), LABELS[top_name])
    canvas.shape("rectangle", [0, horizon, s, s], _jitter(ground_colour, rng), LABELS[ground_name])
    if scene.scene == "beach":
        canvas.shape("rectangle", [0, horizon, s, horizon + 0.08 * s], _jitter(SEA, rng), LABELS["sea"])


def _object(canvas: _Canvas, scene: Scene, rng: random.Random):
    s, label = canvas.s, LABELS[scene.kind]
    colour = _jitter(COLOURS[scene.colour], rng)
    outline, width = _darker(colour), max(2, s // 48)
    r, cx, bottom = scene.scale * s, scene.x * s, scene.bottom * s
    if scene.kind == "ball":
        canvas.shape("ellipse", [cx - r, bottom - 2 * r, cx + r, bottom], colour, label, outline=outline, width=width)
    elif scene.kind == "box":
        canvas.shape("rectangle", [cx - r, bottom - 1.7 * r, cx + r, bottom], colour, label, outline=outline, width=width)
        canvas.draw.line([cx - r, bottom - 1.2 * r, cx + r, bottom - 1.2 * r], fill=outline, width=width)
    elif scene.kind == "tent":
        canvas.shape("polygon", [(cx - r, bottom), (cx + r, bottom), (cx, bottom - 1.8 * r)], colour, label,
                     outline=outline, width=width)
        canvas.draw.polygon([(cx - 0.25 * r, bottom), (cx + 0.25 * r, bottom), (cx, bottom - 0.7 * r)], fill=outline)
    else:  # bottle: a body and a neck
        w = 0.55 * r
        canvas.shape("rounded_rectangle", [cx - w, bottom - 1.5 * r, cx + w, bottom], colour, label,
                     outline=outline, width=width, radius=0.2 * r)
        canvas.shape("rectangle", [cx - 0.22 * r, bottom - 2.2 * r, cx + 0.22 * r, bottom - 1.4 * r], colour, label,
                     outline=outline, width=width)


def _toy(canvas: _Canvas, scene: Scene, rng: random.Random):
    """Feet, body, belly mark, eyes; every part is labelled toy."""
    s, label, look = canvas.s, LABELS[TOY], scene.look
    body = _jitter(COLOURS[look.colour], rng, 8)
    outline, width = _darker(body), max(2, s // 48)
    r, cx = scene.scale * s, scene.x * s
    cy = scene.bottom * s - 1.15 * r  # the feet reach `bottom`
    feet = TOY_FEET[look.feet]
    for fx in (-0.45, 0.45):
        canvas.shape("ellipse", [cx + fx * r - 0.32 * r, cy + 0.78 * r, cx + fx * r + 0.32 * r, cy + 1.15 * r], feet,
                     label, outline=_darker(feet, 0.5), width=width)
    box = [cx - r, cy - r, cx + r, cy + r]
    if look.shape == "round":
        canvas.shape("ellipse", box, body, label, outline=outline, width=width)
    else:
        canvas.shape("rounded_rectangle", [cx - 0.92 * r, cy - 0.92 * r, cx + 0.92 * r, cy + 0.92 * r], body, label,
                     outline=outline, width=width, radius=0.25 * r)
    mark = (250, 250, 250) if look.colour in ("yellow", "orange") else (250, 210, 30)
    my = cy + 0.4 * r
    if look.mark == "star":
        canvas.draw.polygon(_star(cx, my, 0.46 * r, 0.2 * r), fill=mark)
    elif look.mark == "heart":
        _heart(canvas.draw, cx, my - 0.05 * r, 0.36 * r, mark)
    elif look.mark == "stripe":
        half = 0.8 * r if look.shape == "round" else 0.88 * r
        canvas.draw.rectangle([cx - half, cy + 0.22 * r, cx + half, cy + 0.5 * r], fill=mark)
    look_x = rng.uniform(-0.06, 0.06) * r
    if look.eyes == "big":
        for ex in (-0.38, 0.38):
            x, y = cx + ex * r, cy - 0.28 * r
            canvas.draw.ellipse([x - 0.26 * r, y - 0.26 * r, x + 0.26 * r, y + 0.26 * r], fill=(255, 255, 255))
            canvas.draw.ellipse([x + look_x - 0.12 * r, y - 0.12 * r, x + look_x + 0.12 * r, y + 0.12 * r], fill=(0, 0, 0))
    elif look.eyes == "small":
        for ex in (-0.34, 0.34):
            x, y = cx + ex * r, cy - 0.28 * r
            canvas.draw.ellipse([x - 0.14 * r, y - 0.14 * r, x + 0.14 * r, y + 0.14 * r], fill=(0, 0, 0))
    else:
        x, y = cx, cy - 0.3 * r
        canvas.draw.ellipse([x - 0.36 * r, y - 0.36 * r, x + 0.36 * r, y + 0.36 * r], fill=(255, 255, 255))
        canvas.draw.ellipse([x + look_x - 0.17 * r, y - 0.17 * r, x + look_x + 0.17 * r, y + 0.17 * r], fill=(0, 0, 0))


def _majority(labels: np.ndarray, factor: int) -> np.ndarray:
    """(S, S) labels -> (S/f, S/f): the label covering most of each f x f block (ties: the lower value)."""
    n = labels.shape[0] // factor
    blocks = labels.reshape(n, factor, n, factor).transpose(0, 2, 1, 3).reshape(n, n, factor * factor)
    values = np.unique(blocks)
    counts = np.stack([(blocks == v).sum(-1) for v in values], axis=-1)
    return values[counts.argmax(-1)].astype(np.uint8)


def render(scene: Scene, size: int = SIZE, seed: int = 0) -> tuple[Image.Image, np.ndarray]:
    """The picture (RGB, size x size) and its ADE20K label map ((size, size) uint8). `seed` sets the small
    colour variations; everything else is in `scene`."""
    rng = random.Random(seed)
    canvas = _Canvas(size)
    _background(canvas, scene, rng)
    (_toy if scene.kind == TOY else _object)(canvas, scene, rng)
    image, labels = canvas.image, np.asarray(canvas.labels)
    if scene.flip:
        image, labels = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), labels[:, ::-1]
    image = image.resize((size, size), Image.Resampling.BOX)
    return image, _majority(np.ascontiguousarray(labels), SUPERSAMPLE)


@dataclass
class Example:
    image: Image.Image
    labels: np.ndarray
    caption: str
    scene: Scene


def examples(seed: int, count: int, size: int = SIZE, full_look: float = 0.0, **sample_kw):
    """`count` examples, a function of `seed` alone: example i is the same whatever `count` is."""
    for i in range(count):
        rng = random.Random(f"{seed}/{i}")
        scene = sample_scene(rng, **sample_kw)
        image, labels = render(scene, size, seed=rng.randrange(2**31))
        yield Example(image, labels, caption(scene, rng, full_look), scene)


def subject_examples(name: str, count: int = 5, size: int = SIZE, seed: int = 0, scenes=SUBJECT_SCENES):
    """The subject's photos: the same look at different places, sizes and backgrounds."""
    if name not in SUBJECTS:
        from ..errors import UserError

        raise UserError(f"unknown toy subject {name!r}; the toy world has {', '.join(SUBJECTS)}")
    for i in range(count):
        rng = random.Random(f"subject/{name}/{seed}/{i}")
        scene = subject_scene(name, rng, scenes)
        image, labels = render(scene, size, seed=rng.randrange(2**31))
        yield Example(image, labels, f"a photo of {IDENTIFIER} {TOY}", scene)


# ----------------------------------------------------------------------------------------------- writers
# The toy protocol's prompts ("{0}" = identifier, "{1}" = class), in evaluate/protocol.py's file format.
PROMPT_TEMPLATES = (
    "a photo of {0} {1}", "a {0} {1}", "a {0} {1} on the beach", "a {0} {1} in the snow", "a {0} {1} on the grass",
    "a {0} {1} at night", "a {0} {1} in a room", "a photo of a {0} {1} on the beach", "a photo of a {0} {1} in the snow",
    "a photo of a {0} {1} at night",
)


def prompts_file_text(subject_names) -> str:
    templates = "\n".join(f"'{t}'.format(unique_token, class_token)," for t in PROMPT_TEMPLATES)
    classes = "\n".join(f"{name},{TOY}" for name in subject_names)
    return (f"Classes\nsubject_name,class\n{classes}\n\nPrompts\n\nObject Prompts\n{templates}\n\n"
            f"Live Subject Prompts\n{templates}\n")


def write_subject(folder, name: str, count: int = 5, size: int = SIZE, seed: int = 0) -> Path:
    """The subject's photos as `folder/NN.png` (files already there are kept)."""
    folder = Path(folder)
    for i, example in enumerate(subject_examples(name, count, size, seed)):
        path = folder / f"{i:02d}.png"
        if not path.is_file():
            save_image(example.image, path)
    return folder


def write_subjects(folder, names=tuple(SUBJECTS), count: int = 5, size: int = SIZE, seed: int = 0) -> Path:
    """A DreamBooth-layout dataset: `folder/<subject>/NN.png` and `prompts_and_classes.txt` (class "toy";
    the object and live prompt lists are the toy protocol's)."""
    folder = Path(folder)
    for name in names:
        write_subject(folder / name, name, count, size, seed)
    prompts = folder / "prompts_and_classes.txt"
    if not prompts.is_file():
        prompts.write_text(prompts_file_text(names))
    return folder


def write_ade20k(root, n_train: int = 512, n_val: int = 64, size: int = SIZE, seed: int = 0) -> Path:
    """`root/ADEChallengeData2016`: images/{training,validation}/*.png, annotations/.../*.png (ADE20K label
    values) and `metadata.jsonl` captions. Returns the ADEChallengeData2016 folder."""
    dataset = Path(root) / "ADEChallengeData2016"
    entries = []
    for split, prefix, count, split_seed in (("training", "toy_train", n_train, seed),
                                             ("validation", "toy_val", n_val, seed + 1_000_003)):
        for i, example in enumerate(examples(split_seed, count, size)):
            name = f"{prefix}_{i:06d}"
            save_image(example.image, dataset / "images" / split / f"{name}.png")
            save_image(Image.fromarray(example.labels), dataset / "annotations" / split / f"{name}.png")
            entries.append({"file_name": f"{name}.png", "text": example.caption})
    (dataset / "metadata.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    return dataset
