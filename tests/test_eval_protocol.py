"""The DreamBooth protocol as read from the dataset: subjects, classes, prompts, jobs and adapter lookup."""
import pytest
from PIL import Image

from dreambooth_photos import COPY
from user_errors import refused
from ether_diffusion.errors import UserError
from evaluate.harness import item_seed
from evaluate.protocol import PROMPTS_FILE, adapters_from_dir, adapters_from_manifest, load_protocol

# What the whole dataset holds, and what the copy in tests/data/dreambooth keeps of it.
WHOLE = {"subjects": 30, "live": {"cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"}, "photos": 158}
SMALL = {"subjects": 3, "live": {"cat", "dog"}, "photos": 7}


@pytest.fixture
def protocol(whole_dreambooth):
    return load_protocol(whole_dreambooth)


def facts(protocol):
    return SMALL if protocol.root == COPY else WHOLE


def test_real_dataset_subjects_and_classes(protocol):
    expected = facts(protocol)
    assert len(protocol.subjects) == expected["subjects"]
    assert {name for name, s in protocol.subjects.items() if s.live} == expected["live"]
    assert sum(not s.live for s in protocol.subjects.values()) == expected["subjects"] - len(expected["live"])
    assert protocol.subjects["bear_plushie"].class_name == "stuffed animal"
    assert protocol.subjects["dog"].class_name == "dog"
    assert all(s.images and all(p.suffix == ".jpg" for p in s.images) for s in protocol.subjects.values())
    assert sum(len(s.images) for s in protocol.subjects.values()) == expected["photos"]


def test_real_dataset_prompt_lists(protocol):
    assert len(protocol.object_prompts) == len(protocol.live_prompts) == 25
    # the first ten and the last five are shared; 10..19 differ (accessories/outfits vs. backgrounds)
    assert protocol.object_prompts[:10] == protocol.live_prompts[:10]
    assert protocol.object_prompts[20:] == protocol.live_prompts[20:]
    dog, bear = protocol.jobs(["dog"]), protocol.jobs(["bear_plushie"])
    assert dog[10].prompt("qwe") == "a qwe dog wearing a red hat"
    assert dog[19].prompt("qwe") == "a qwe dog in a purple wizard outfit"
    assert bear[10].prompt("qwe") == "a qwe stuffed animal with a wheat field in the background"
    assert bear[24].prompt("qwe") == "a cube shaped qwe stuffed animal"
    # without the identifier (CLIP-T's default): no double space left behind
    assert dog[0].prompt(None) == "a dog in the jungle"
    assert bear[22].prompt("") == "a shiny stuffed animal"


def test_real_dataset_has_25_distinct_jobs_per_subject(protocol):
    jobs = protocol.jobs()
    assert len(jobs) == 25 * facts(protocol)["subjects"]  # 750 on the whole dataset
    assert len({(j.subject, j.prompt_index) for j in jobs}) == len(jobs)
    for name in protocol.subjects:  # each subject's 25 prompts differ (subjects of one class share them)
        assert len({j.prompt("qwe") for j in jobs if j.subject == name}) == 25


def test_job_subsets_and_bad_selections(protocol):
    jobs = protocol.jobs(["cat", "bear_plushie"], [0, 24])
    assert [(j.subject, j.prompt_index) for j in jobs] == [("cat", 0), ("cat", 24), ("bear_plushie", 0), ("bear_plushie", 24)]
    with pytest.raises(UserError, match="unknown subject 'cats'"):
        protocol.jobs(["cats"])
    with pytest.raises(UserError, match="prompt index 25 is out of range"):
        protocol.jobs(["cat"], [25])


def test_job_seed_depends_only_on_the_job(protocol):
    full = {(j.subject, j.prompt_index): item_seed(7, j.key) for j in protocol.jobs()}
    subset = protocol.jobs(["dog"], [3])
    assert item_seed(7, subset[0].key) == full[("dog", 3)]
    assert len(set(full.values())) == len(full)
    assert item_seed(8, subset[0].key) != item_seed(7, subset[0].key)


# ------------------------------------------------------------------------------------------- bad datasets
def _write_dataset(root, classes="subject_name,class\ndog,dog\nbackpack,backpack\n", drop_section=None):
    text = (COPY / PROMPTS_FILE).read_text()
    head, rest = text.split("Prompts\n", 1)
    text = "Classes\n\n" + classes + "\nPrompts\n" + rest
    if drop_section:
        text = text.replace(drop_section, "Something else")
    root.mkdir(parents=True, exist_ok=True)
    (root / PROMPTS_FILE).write_text(text)
    for name in ("dog", "backpack"):
        (root / name).mkdir(exist_ok=True)
        Image.new("RGB", (16, 16), "red").save(root / name / "00.jpg")
    return root


def test_small_dataset_parses(tmp_path):
    protocol = load_protocol(_write_dataset(tmp_path))
    assert list(protocol.subjects) == ["dog", "backpack"]
    assert protocol.subjects["dog"].live and not protocol.subjects["backpack"].live
    assert len(protocol.jobs()) == 50


def test_dataset_errors_name_the_problem(tmp_path):
    with pytest.raises(UserError, match=f"{PROMPTS_FILE} does not exist"):
        load_protocol(tmp_path)
    root = _write_dataset(tmp_path / "b", drop_section="Live Subject Prompts")
    with pytest.raises(UserError, match="no 'Live Subject Prompts' section"):
        load_protocol(root)


# ------------------------------------------------------------------------------------------- adapters
def test_adapters_from_dir(tmp_path):
    protocol = load_protocol(_write_dataset(tmp_path / "data"))
    jobs = protocol.jobs(prompt_indices=[0, 1])
    (tmp_path / "ad" / "dog").mkdir(parents=True)
    (tmp_path / "ad" / "dog" / "adapter.safetensors").write_bytes(b"x")
    with pytest.raises(UserError, match=r"missing adapter for subject backpack: .*backpack/adapter.safetensors does not exist"):
        adapters_from_dir(tmp_path / "ad", jobs)
    adapters = adapters_from_dir(tmp_path / "ad", protocol.jobs(["dog"], [0, 1]))
    assert adapters == {("dog", 0): tmp_path / "ad" / "dog" / "adapter.safetensors",
                        ("dog", 1): tmp_path / "ad" / "dog" / "adapter.safetensors"}


def test_adapters_from_manifest(tmp_path):
    protocol = load_protocol(_write_dataset(tmp_path / "data"))
    jobs = protocol.jobs(["dog"], [0, 1])
    (tmp_path / "runs").mkdir()
    for i in (0, 1):
        (tmp_path / "runs" / f"dog-{i}.safetensors").write_bytes(b"x")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"subject,prompt_index,adapter\ndog,0,runs/dog-0.safetensors\ndog,1,{tmp_path}/runs/dog-1.safetensors\n")
    assert adapters_from_manifest(manifest, jobs) == {("dog", 0): tmp_path / "runs" / "dog-0.safetensors",
                                                      ("dog", 1): tmp_path / "runs" / "dog-1.safetensors"}

    with pytest.raises(UserError, match="has no adapter for subject dog, prompt 2"):
        adapters_from_manifest(manifest, protocol.jobs(["dog"], [0, 1, 2]))
    manifest.write_text("subject,prompt_index,adapter\ndog,0,runs/dog-0.safetensors\ndog,0,runs/dog-1.safetensors\n")
    with pytest.raises(UserError, match=r"line 3: \(dog, 0\) appears twice"):
        adapters_from_manifest(manifest, jobs)
    manifest.write_text("subject,prompt_index,adapter\ndog,0,runs/dog-0.safetensors\ndog,1,runs/gone.safetensors\n")
    with pytest.raises(UserError, match="missing adapter for subject dog, prompt 1: .*gone.safetensors does not exist"):
        adapters_from_manifest(manifest, jobs)
    manifest.write_text("subject,prompt,adapter\n")
    with pytest.raises(UserError, match="header must name the columns"):
        adapters_from_manifest(manifest, jobs)
    manifest.write_text("subject,prompt_index,adapter\ndog,first,runs/dog-0.safetensors\n")
    with pytest.raises(UserError, match="line 2: prompt_index 'first' is not an integer"):
        adapters_from_manifest(manifest, jobs)


@pytest.mark.user_error("--subjects dog when another listed subject's folder is missing", tool="evaluate/dreambooth.py")
def test_a_missing_subject_folder_stops_only_the_work_on_that_subject(tmp_path):
    protocol = load_protocol(_write_dataset(tmp_path, classes="subject_name,class\ndog,dog\nrobot,toy\n"))
    assert {job.subject for job in protocol.jobs(["dog"])} == {"dog"}
    with refused(f"{tmp_path / 'robot'}: subject robot listed in .* has no image folder or no images in it"):
        protocol.jobs()
