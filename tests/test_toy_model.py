"""The shipped toy world models: `builtin:toy-sd` loads like SD-1.5, follows prompts by the judge, and learns a
subject with ETHER+ DreamBooth; the judge is right on fresh world pictures. Thresholds here are looser than
the issue's (docs/toy_world.md has the full measurements): few samples, so a test fails on a real regression,
not on chance."""
import json
import random

import pytest
import torch
from PIL import Image
from trainer_helpers import train

from ether_diffusion.errors import UserError
from ether_diffusion.grids import image_grid
from ether_diffusion.pipelines import load_pipeline
from ether_diffusion.sample import use_dpm_solver
from ether_diffusion.builtin import resolve_model_path
from ether_diffusion.tiny_sd import SD_SCHEDULER
from ether_diffusion.toy import judge as toy_judge
from ether_diffusion.toy import model as toy_model
from ether_diffusion.toy import world
from ether_diffusion.trainers import dreambooth


STEPS = 30
SUBJECT = "heart_toy"
PARTS_GAIN = 0.2  # of the subject's five parts, on 8 pictures (measured: 0.22 -> 0.75 in 30 steps)


@pytest.fixture(scope="module")
def judge():
    return toy_judge.Judge()


def test_shipped_weights_fit_the_budget():
    sizes = [p.stat().st_size for p in toy_model.WEIGHTS.rglob("*.safetensors")]
    assert len(sizes) >= 6 and sum(sizes) <= 32 * 2**20


def test_builtin_toy_sd_loads_through_from_pretrained():
    from diffusers import StableDiffusionPipeline

    path = resolve_model_path("builtin:toy-sd")
    assert resolve_model_path("builtin:toy-sd") == path  # assembled once
    pipe = StableDiffusionPipeline.from_pretrained(path)
    names = {n for n, _ in pipe.unet.named_modules()}
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k" in names
    assert "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0" in names
    assert pipe.unet.dtype == torch.float32
    assert pipe.tokenizer("a photo of qwe toy").input_ids == [49406, 320, 1125, 539, 80, 649, 5988, 49407]
    assert {k: pipe.scheduler.config[k] for k in SD_SCHEDULER} == SD_SCHEDULER


def test_judge_is_right_on_fresh_world_pictures(judge):
    examples = list(world.examples(987_654, 300, subjects=True, near_misses=0.5, toy_fraction=0.6))
    accuracy = toy_judge.accuracy(judge, [e.image for e in examples], [e.scene for e in examples])
    for name in ("kind", "colour", "scene"):
        assert accuracy[name] >= 0.95, accuracy
    assert accuracy["subject"] >= 0.85, accuracy


def test_judge_reads_a_trainer_grid(judge, tmp_path):
    rng = random.Random(0)
    rows = [[world.render(world.subject_scene("star_toy", rng, scenes=(scene,)), seed=i)[0] for i in range(3)]
            for scene in ("beach", "room")]
    grid = image_grid([im for row in rows for im in row], rows=2, cols=3)
    line = toy_judge.judge_grid(judge, grid, ["a qwe toy on the beach", "a photo of qwe toy"], "star_toy")
    assert line == ("the judge saw: subject star_toy found in 6 of 6 samples (its look's parts right: 100%), "
                    "scenes right in 3 of 3")



def test_judge_reads_an_s2i_grid_map_generated_real(tmp_path):
    """Rows map | two "generated" pictures | real picture: real pictures in both generated columns score as the
    real column does; the maps' own colours in their place score far lower."""
    from ether_diffusion.ade20k import colorize

    examples = list(world.examples(5, 4))
    maps = [Image.fromarray(colorize(e.labels)) for e in examples]
    grid = image_grid([im for e, m in zip(examples, maps) for im in (m, e.image, e.image, e.image)], rows=4, cols=4)
    line = toy_judge.judge_s2i_grid(grid, world.SIZE)
    generated, real = [float(v.rstrip("%")) for v in line.split() if v.endswith("%")][::2]
    assert "8 generated pictures of 4 validation maps" in line and generated == real > 80, line
    wrong = image_grid([im for e, m in zip(examples, maps) for im in (m, m, m, e.image)], rows=4, cols=4)
    assert float(toy_judge.judge_s2i_grid(wrong, world.SIZE).split("mIoU ")[1].split("%")[0]) < generated / 2
    for side in (0, 100, 24):  # no tiles, tiles larger than the grid, a size the grid is no multiple of
        with pytest.raises(UserError, match="grid"):
            toy_judge.judge_s2i_grid(grid, side)
    black = Image.new("RGB", (3 * world.SIZE, world.SIZE))  # no map in its map column: no mIoU to give
    with pytest.raises(UserError, match="map column holds no labelled pixel"):
        toy_judge.judge_s2i_grid(black, world.SIZE)

def _judged(pipe, judge, prompts, count=8, seed=0):
    """The judge's answers on `count` samples of each prompt, per prompt. One pipeline call for all: on this small
    UNet a call costs about the same at batch 8 and at batch 80."""
    images = pipe(prompts, num_images_per_prompt=count, generator=torch.Generator().manual_seed(seed),
                  num_inference_steps=20, height=32, width=32).images
    answers = judge(images)
    return [answers[i * count:(i + 1) * count] for i in range(len(prompts))]


def test_base_model_follows_prompts(judge):
    pipe = use_dpm_solver(load_pipeline("builtin:toy-sd"))
    right = {"kind": 0, "colour": 0, "scene": 0}
    asked = [("red", "ball", "beach"), ("blue", "box", "snow"), ("yellow", "tent", "grass"),
             ("green", "bottle", "night"), ("purple", "ball", "room")]
    prompts = [f"a photo of a {colour} {kind} {world.SCENES[scene]}" for colour, kind, scene in asked]
    *answered, toys, qwe = _judged(pipe, judge, [*prompts, "a photo of toy", "a photo of qwe toy"], count=4)
    for (colour, kind, scene), answers in zip(asked, answered):
        for answer in answers:
            right["kind"] += answer["kind"] == kind
            right["colour"] += answer["colour"] == colour
            right["scene"] += answer["scene"] == scene
    assert all(value >= 0.7 * 4 * len(asked) for value in right.values()), right  # measured: 97-100%
    assert sum(a["kind"] == "toy" for a in toys) >= 3
    assert sum(a["subject"] == "star_toy" for a in qwe) <= 1


def _parts(answers, subject):
    """How much of the subject's look the answers show, by the judge (0..1)."""
    return sum(toy_judge.parts_right(a, subject) for a in answers) / len(answers)


def test_etherplus_dreambooth_learns_a_qwe_toy(judge, tmp_path):
    # `make demo`'s protocol for the UNet (batch 8, rate 0.6, prior weight 0.5), far fewer steps and class
    # images. The subject is heart_toy, whose look ETHER+ learns most clearly here; "qwe toy" names whichever
    # subject the run learns.
    out = tmp_path / "run"
    train(dreambooth, "--config", "configs/toy/dreambooth-etherplus.yaml",
          "--instance_data_dir", f"builtin:toy-subject/{SUBJECT}", "--output_dir", out, "--num_class_images", 8,
          "--train_batch_size", 8, "--learning_rate", 0.6, "--prior_loss_weight", 0.5,
          "--max_train_steps", STEPS, "--checkpointing_steps", STEPS, "--validation_steps", STEPS,
          "--num_validation_images", 2, "--validation_inference_steps", 5)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == STEPS
    base = use_dpm_solver(load_pipeline("builtin:toy-sd"))
    pipe = use_dpm_solver(load_pipeline("builtin:toy-sd", adapter=out / "adapter.safetensors", merge=True))
    [base_answers] = _judged(base, judge, ["a photo of qwe toy"])
    answers, beach = _judged(pipe, judge, ["a photo of qwe toy", "a qwe toy on the beach"])
    before, after = _parts(base_answers, SUBJECT), _parts(answers, SUBJECT)
    print(f"subject's parts: base {before:.2f}, after {STEPS} steps {after:.2f}")
    assert after >= before + PARTS_GAIN, (before, after)
    assert sum(a["scene"] == "beach" for a in beach) >= 4  # measured: 7 and 8 of 8
    assert Image.open(out / "samples" / "final.png").size == (64, 128)


def test_the_s2i_demo_runs_on_the_toy_world_and_its_grid_is_judged(tmp_path, caplog):
    """`make demo-s2i`'s config, 2 steps: the toy label maps with the world's captions, a grid of the first 8
    validation maps (map | generated | real picture) that the segmenter reads, the real column as the real
    pictures read (docs/toy_world.md: 96.9% over the 64 maps)."""
    import logging

    from ether_diffusion.trainers import s2i

    out = tmp_path / "s2i"
    with caplog.at_level(logging.INFO):
        train(s2i, "--config", "configs/s2i/demo.yaml", "--output_dir", out, "--max_train_steps", 2,
              "--checkpointing_steps", 2, "--validation_steps", 2, "--num_validation_images", 1,
              "--validation_inference_steps", 2)
    maps = out / "toy-ade20k" / "ADEChallengeData2016" / "annotations"
    assert (len(list((maps / "training").glob("*.png"))), len(list((maps / "validation").glob("*.png")))) == (512, 64)
    assert f"captions from {out / 'toy-ade20k' / 'ADEChallengeData2016' / 'metadata.jsonl'}" in caplog.text
    grid = Image.open(out / "samples" / "final.png")
    assert grid.size == (3 * world.SIZE, 8 * world.SIZE)
    line = toy_judge.judge_s2i_grid(grid.convert("RGB"), world.SIZE)
    assert "8 generated pictures of 8 validation maps" in line
    assert float(line.split("real pictures: ")[1].split("%")[0]) > 90, line
