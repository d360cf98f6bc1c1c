"""The toy world: seeded, label maps that agree with the pixels, subjects never drawn for pretraining, and
writers whose folders the project's own readers (DreamBooth protocol, ADE20K dataset) accept unchanged."""
import random

import numpy as np
import pytest

from ether_diffusion.ade20k import ADE20KDataset, load_palette
from ether_diffusion.errors import UserError
from ether_diffusion.toy import world
from evaluate.protocol import load_protocol


def test_examples_are_a_function_of_the_seed_and_index():
    a = list(world.examples(3, 6))
    b = list(world.examples(3, 4))
    assert [e.image.tobytes() for e in a[:4]] == [e.image.tobytes() for e in b]
    assert [e.caption for e in a[:4]] == [e.caption for e in b]
    assert all(np.array_equal(x.labels, y.labels) for x, y in zip(a, b))
    c = list(world.examples(4, 4))
    assert [e.image.tobytes() for e in c] != [e.image.tobytes() for e in b]
    assert all(e.image.size == (32, 32) and e.labels.shape == (32, 32) for e in a)


def test_region_labels_are_the_closest_ade20k_classes():
    _, names = load_palette()
    expected = {"sky": "sky", "sea": "sea", "sand": "sand", "snow": "earth", "grass": "grass",
                "night_ground": "land", "wall": "wall", "floor": "floor", "ball": "ball", "box": "box",
                "tent": "tent", "bottle": "bottle", "toy": "plaything"}
    assert {region: names[label] for region, label in world.LABELS.items()} == expected


def _median_colour(example, label):
    pixels = np.asarray(example.image)[example.labels == label]
    return np.median(pixels, axis=0)


def test_label_maps_agree_with_the_pixels():
    for example in world.examples(0, 200):
        scene = example.scene
        present = set(np.unique(example.labels).tolist())
        (top, top_colour), (ground, ground_colour) = world.BACKGROUNDS[scene.scene]
        thing = world.LABELS[scene.kind]
        assert present <= {world.LABELS[top], world.LABELS[ground], world.LABELS["sea"], thing}
        assert thing in present and world.LABELS[top] in present
        # Each region's typical colour is the colour it was drawn with (+- the small jitter).
        assert np.abs(_median_colour(example, world.LABELS[top]) - top_colour).max() <= 16
        if world.LABELS[ground] in present and (example.labels == world.LABELS[ground]).sum() > 20:
            assert np.abs(_median_colour(example, world.LABELS[ground]) - ground_colour).max() <= 16
        # A thing's own colour (a toy's body) covers most of its region.
        assert np.abs(_median_colour(example, thing) - world.COLOURS[scene.colour]).max() <= 40, example.caption
        # ...and is nowhere outside it but for anti-aliased edges.
        outside = np.asarray(example.image)[example.labels != thing].astype(int)
        near = (np.abs(outside - world.COLOURS[scene.colour]).max(-1) <= 8).mean()
        if scene.colour not in ("blue", "yellow"):  # toy feet and marks come in those colours
            assert near < 0.02, example.caption


def test_captions_name_what_is_drawn():
    rng = random.Random(0)
    for example in world.examples(1, 300):
        scene, text = example.scene, example.caption
        assert scene.kind in text
        for other in world.OBJECTS:
            assert (other in text) == (other == scene.kind)
        for name, phrase in world.SCENES.items():
            assert (phrase in text) <= (name == scene.scene)
        colours = [c for c in world.COLOURS if f"{c} {scene.kind}" in text or f"{c} round" in text
                   or f"{c} square" in text]
        assert colours in ([], [scene.colour]), text
    assert world.caption(world.subject_scene("star_toy", rng), random.Random(5)).split()[-1] in (
        "toy", "feet", "eyes", "eye", "star", "mark", "stripe", "heart", "beach", "snow", "grass", "night", "room")
    words = " ".join(e.caption for e in world.examples(2, 2000)).replace(",", " , ").split()
    assert set(words) == set(world.vocabulary())


def test_pretraining_never_draws_a_subject_and_the_judge_sees_them():
    rng = random.Random(0)
    drawn = [world.sample_scene(rng, toy_fraction=1.0) for _ in range(5000)]
    assert {s.subject for s in drawn} == {world.ANOTHER_TOY}
    # ...although the generic toys cover every value of every attribute, the subjects' among them.
    for field in ("colour", "shape", "eyes", "mark", "feet"):
        assert {getattr(s.look, field) for s in drawn} == {getattr(look, field) for look in _all_looks()}
    judged = [world.sample_scene(rng, toy_fraction=1.0, subjects=True, near_misses=0.5) for _ in range(2000)]
    counts = {name: sum(s.subject == name for s in judged) for name in world.SUBJECTS}
    assert all(count > 50 for count in counts.values())
    near = [s for s in judged if s.subject == world.ANOTHER_TOY and _differences_to_a_subject(s.look) == 1]
    assert len(near) > 300


def test_named_toys_are_called_by_name_alone_and_full_looks_name_every_part():
    named = {"zab": world.ToyLook("orange", "square", "big", "stripe", "black"),
             "vok": world.ToyLook("pink", "round", "one", "none", "white")}
    drawn = list(world.examples(5, 400, toy_fraction=1.0, named=named, named_fraction=0.5, full_look=0.5))
    with_names = [e for e in drawn if e.scene.name]
    assert 150 < len(with_names) < 250
    for e in with_names:  # the name, the class and at most the scene: no word of the look
        assert e.scene.look == named[e.scene.name] and e.scene.subject == world.ANOTHER_TOY
        words = set(e.caption.split()) - {"a", "photo", "of", world.TOY, e.scene.name}
        assert words <= set(" ".join(world.SCENES.values()).split()), e.caption
    full = [e for e in drawn if not e.scene.name and e.scene.look.describe() in e.caption]
    assert 70 < len(full) < 140  # half of the other toys
    # Without names or full looks, the draws are the ones every other user of the world has always had.
    assert [e.caption for e in world.examples(5, 50)] == [e.caption for e in world.examples(5, 50, named={})]


def _all_looks():
    rng = random.Random(1)
    return [world.random_look(rng) for _ in range(3000)]


def _differences_to_a_subject(look):
    return min(sum(getattr(look, f) != getattr(s, f) for f in ("colour", "shape", "eyes", "mark", "feet"))
               for s in world.SUBJECTS.values())


def test_subjects_are_far_apart_and_qwe_toy_keeps_its_look():
    looks = list(world.SUBJECTS.values())
    for i, a in enumerate(looks):
        for b in looks[i + 1:]:
            assert sum(getattr(a, f) != getattr(b, f) for f in ("colour", "shape", "eyes", "mark", "feet")) >= 3
    assert world.SUBJECTS[world.DEMO_SUBJECT] == world.ToyLook("red", "round", "big", "star", "blue")
    with pytest.raises(UserError, match="unknown toy subject 'dog'"):
        list(world.subject_examples("dog"))


def test_subject_folders_are_a_dreambooth_dataset(tmp_path):
    root = world.write_subjects(tmp_path / "subjects", count=3)
    protocol = load_protocol(root)
    assert list(protocol.subjects) == list(world.SUBJECTS)
    assert all(len(s.images) == 3 and s.class_name == "toy" and not s.live for s in protocol.subjects.values())
    jobs = protocol.jobs(["star_toy"])
    prompts = [job.prompt("qwe") for job in jobs]
    assert "a photo of qwe toy" in prompts and "a qwe toy on the beach" in prompts and "a qwe toy at night" in prompts
    assert jobs[2].prompt(None) == "a toy on the beach"
    # The photos are taken at home and in the garden: beach, snow and night are new to the subjects.
    assert {e.scene.scene for e in world.subject_examples("star_toy", 20)} == set(world.SUBJECT_SCENES)


def test_ade20k_folder_reads_with_the_s2i_dataset(tmp_path):
    root = world.write_ade20k(tmp_path, n_train=6, n_val=3)
    train = ADE20KDataset(root, "training", resolution=32, caption_file=root / "metadata.jsonl")
    val = ADE20KDataset(root, "validation", resolution=32, caption_file=root / "metadata.jsonl")
    assert (len(train), len(val)) == (6, 3)
    item = train[0]
    example = next(world.examples(0, 1))
    assert item["caption"] == example.caption
    assert np.array_equal(item["labels"].numpy(), example.labels)
    train.check_maps()
