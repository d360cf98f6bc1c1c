"""evaluate/dreambooth.py end to end on the tiny SD and the offline stand-in backbones."""
import csv
import functools
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import forked
from dreambooth_photos import COPY
from user_errors import case, record
from ether_diffusion import AdapterConfig, inject_adapters, save_adapter
from ether_diffusion.errors import run_cli
from evaluate import dreambooth
from evaluate.protocol import PROMPTS_FILE
from evaluate.tiny_backbones import write_tiny_backbones

REPO = Path(__file__).resolve().parents[1]
DATASET = COPY  # the dog and cat photos of tests/data/dreambooth
SUBJECTS, PROMPTS, PER_PROMPT = ("dog", "cat"), (0, 1), 2
TOOL = "evaluate/dreambooth.py"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, _tiny_unet):
    """Stand-in backbones and one tiny ETHER+ adapter per subject (dog and cat)."""
    import copy

    root = tmp_path_factory.mktemp("db_eval")
    unet = copy.deepcopy(_tiny_unet)
    inject_adapters(unet, AdapterConfig(method="ether+", n_blocks=4))
    for subject in SUBJECTS:
        save_adapter(unet, root / "adapters" / subject / "adapter.safetensors")
    return {"root": root, "adapters": root / "adapters", "backbones": write_tiny_backbones(root / "backbones")}


def _args(setup, output_dir, dataset=DATASET, subjects=SUBJECTS, extra=()):
    b = setup["backbones"]
    return ["--dataset", str(dataset), "--model", "builtin:tiny-sd", "--output_dir", str(output_dir),
            "--subjects", ",".join(subjects), "--prompts", ",".join(map(str, PROMPTS)),
            "--images_per_prompt", str(PER_PROMPT), "--num_inference_steps", "2",
            "--dino", str(b["dino"]), "--clip", str(b["clip"]), "--lpips_net", str(b["lpips"]),
            "--lpips_resolution", "64", *extra]


def _log(output_dir):
    return [json.loads(line) for line in (output_dir / dreambooth.GENERATION_LOG).read_text().splitlines()]


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def two_process_run(setup):
    """`torchrun --nproc_per_node 2` with ACCELERATE_USE_CPU=1 (its workers forked: tests/forked.py): two gloo
    processes share the jobs, both subjects' adapters in each batch (--subjects_per_batch 2)."""
    output_dir = setup["root"] / "out"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = forked.torchrun(["-m", "evaluate.dreambooth", *_args(setup, output_dir, extra=[
        "--adapters", str(setup["adapters"]), "--subjects_per_batch", "2"])], 2, env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir, result


def test_two_processes_cover_every_job_exactly_once(two_process_run, setup, tmp_path):
    output_dir, result = two_process_run
    log = _log(output_dir)
    jobs = sorted((entry["subject"], entry["prompt_index"]) for entry in log)
    assert jobs == sorted((s, p) for s in SUBJECTS for p in PROMPTS)  # every job, none twice
    assert {entry["process"] for entry in log} == {0, 1}              # both processes did work
    assert all(entry["adapter"].endswith(f"{entry['subject']}/adapter.safetensors") for entry in log)
    for subject in SUBJECTS:
        for prompt in PROMPTS:
            images = sorted((output_dir / subject / str(prompt)).iterdir())
            assert [p.name for p in images] == ["00.png", "01.png"]
            assert Image.open(images[0]).size == (32, 32)
    assert "0 of 4 jobs already done; generating 4 on 2 process(es)" in result.stdout
    # the images one subject at a time on one process gives
    dreambooth.main(_args(setup, tmp_path / "one", extra=["--adapters", str(setup["adapters"]), "--skip_metrics"]))
    _same_images(output_dir, tmp_path / "one")


def test_reports(two_process_run):
    output_dir, _ = two_process_run
    report = json.loads((output_dir / "metrics.json").read_text())
    assert set(report["metrics"]) == set(dreambooth.METRICS)
    assert report["jobs"] == 4 and report["images"] == 8 and report["black_skipped"] == 0
    assert -1 <= report["metrics"]["dino"] <= 1 and report["metrics"]["lpips"] >= 0

    per_prompt = _csv(output_dir / "per_prompt.csv")
    assert [(r["subject"], r["prompt_index"]) for r in per_prompt] == [(s, str(p)) for s in SUBJECTS for p in PROMPTS]
    assert per_prompt[0]["prompt"] == "a qwe dog in the jungle"
    per_subject = _csv(output_dir / "per_subject.csv")
    assert [(r["subject"], r["class"], r["live"], r["images"]) for r in per_subject] == [("dog", "dog", "1", "4"), ("cat", "cat", "1", "4")]
    # pooled over pairs: with equal pair counts per prompt, a subject's mean is the mean of its prompts'
    dog = [float(r["dino"]) for r in per_prompt if r["subject"] == "dog"]
    assert float(per_subject[0]["dino"]) == pytest.approx(sum(dog) / 2, abs=1e-4)

    summary = (output_dir / "summary.md").read_text()
    assert "| ours: adapters |" in summary
    # the paper's rows, as the paper prints them (Table 2)
    assert "| ETHER+ (paper Table 2) | 0.4M | 0.666 | 0.800 | 0.240 | 0.729 | |" in summary
    assert "| Real Images (paper Table 2) |  | 0.703 | 0.864 |  | 0.695 | |" in summary
    assert Image.open(output_dir / "grids" / "dog.png").size == (PER_PROMPT * 32, len(PROMPTS) * 32)


def test_rerun_generates_nothing(two_process_run, setup, capsys):
    output_dir, _ = two_process_run
    before = {p: p.stat().st_mtime_ns for p in output_dir.rglob("*.png") if "grids" not in p.parts}
    lines_before = len(_log(output_dir))
    dreambooth.main(_args(setup, output_dir, extra=["--adapters", str(setup["adapters"]), "--skip_metrics"]))
    assert "4 of 4 jobs already done; generating 0" in capsys.readouterr().out
    assert len(_log(output_dir)) == lines_before
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_black_images_are_skipped_and_counted(two_process_run, setup, tmp_path):
    output_dir = tmp_path / "out"
    shutil.copytree(two_process_run[0], output_dir)
    Image.new("RGB", (32, 32)).save(output_dir / "cat" / "1" / "01.png")
    report = dreambooth.main(_args(setup, output_dir, extra=["--skip_generation"]))
    assert report["images"] == 8 and report["black_skipped"] == 1
    cat1 = [r for r in _csv(output_dir / "per_prompt.csv") if (r["subject"], r["prompt_index"]) == ("cat", "1")][0]
    assert cat1["black_skipped"] == "1"
    assert cat1["lpips_diversity"] == ""  # one image left: no pair within the prompt


def test_manifest_gives_one_adapter_per_job(setup, tmp_path):
    manifest = tmp_path / "manifest.csv"
    rows = [f"dog,{p},{setup['adapters'] / 'dog' / 'adapter.safetensors'}" for p in PROMPTS]
    manifest.write_text("subject,prompt_index,adapter\n" + "\n".join(rows) + "\n")
    output_dir = tmp_path / "out"
    dreambooth.main(_args(setup, output_dir, subjects=["dog"], extra=["--manifest", str(manifest), "--skip_metrics"]))
    assert sorted((e["subject"], e["prompt_index"]) for e in _log(output_dir)) == [("dog", 0), ("dog", 1)]


def _run_cli(argv):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(dreambooth.main, argv)
    return exit_info.value.code


@pytest.mark.user_error("an adapter missing for one subject", tool=TOOL)
def test_missing_adapter_is_a_clear_error(setup, tmp_path, capsys):
    adapters = tmp_path / "adapters"
    shutil.copytree(setup["adapters"] / "dog", adapters / "dog")  # no cat adapter
    assert _run_cli(_args(setup, tmp_path / "out", extra=["--adapters", str(adapters)])) == 2
    err = _line(capsys)
    assert f"error: missing adapter for subject cat: {adapters / 'cat' / 'adapter.safetensors'} does not exist" in err
    assert not (tmp_path / "out" / "dog").exists()  # stopped before generating anything


@pytest.mark.user_error("a corrupt real photo in the dataset", tool=TOOL)
def test_corrupt_real_image_is_a_clear_error(setup, tmp_path, capsys):
    dataset = tmp_path / "data"
    dataset.mkdir()
    shutil.copy(DATASET / PROMPTS_FILE, dataset / PROMPTS_FILE)
    for subject in (DATASET / PROMPTS_FILE).read_text().split("subject_name,class\n")[1].split("\n\n")[0].splitlines():
        name = subject.split(",")[0]
        (dataset / name).mkdir()
        Image.new("RGB", (16, 16), "gray").save(dataset / name / "00.jpg")
    (dataset / "cat" / "01.jpg").write_bytes(b"not a jpeg")
    assert _run_cli(_args(setup, tmp_path / "out", dataset=dataset, extra=["--adapters", str(setup["adapters"])])) == 2
    err = _line(capsys)
    assert f"error: {dataset / 'cat' / '01.jpg'}: cannot read image" in err
    assert not (tmp_path / "out" / "dog").exists()


@pytest.mark.user_error("--skip_generation before the images were generated", tool=TOOL)
def test_incomplete_generation_is_a_clear_error_when_scoring(setup, tmp_path, capsys):
    assert _run_cli(_args(setup, tmp_path / "out", extra=["--skip_generation"])) == 2
    assert "generation is incomplete for dog prompt 0" in _line(capsys)


def _line(capsys) -> str:
    """The error line a failed run printed last (after any progress bars), recorded for docs/user_errors.md."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ")
    return record(last)


bad = functools.partial(case, tool=TOOL)


@pytest.mark.parametrize("extra, message", [
    bad(["--images_per_prompt", "0"], "--images_per_prompt must be at least 1, got 0", "--images_per_prompt 0"),
    bad(["--lpips_resolution", "16"], "--lpips_resolution must be at least 32, got 16",
        "--lpips_resolution below what LPIPS accepts"),
    bad(["--subjects", ","], "--subjects ',' names no subject", "--subjects that names none"),
    bad(["--prompts", ","], "--prompts ',' names no prompt index", "--prompts that names none"),
])
def test_bad_numbers_and_lists_are_one_line(setup, tmp_path, capsys, extra, message):
    argv = _args(setup, tmp_path / "out", extra=["--adapters", str(setup["adapters"]), *extra])  # the later flag wins
    assert _run_cli(argv) == 2
    assert _line(capsys) == f"error: {message}"
    assert not (tmp_path / "out").exists()


@pytest.mark.user_error("an adapter with NaN values (black images, NaN in metrics.json)", tool=TOOL)
def test_a_nan_adapter_is_refused(setup, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    good = setup["adapters"] / "dog" / "adapter.safetensors"
    with safe_open(str(good), framework="pt") as f:
        header, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    state = {k: torch.full_like(v, float("nan")) for k, v in state.items()}
    adapters = tmp_path / "adapters"
    (adapters / "dog").mkdir(parents=True)
    save_file(state, str(adapters / "dog" / "adapter.safetensors"), metadata=header)
    assert _run_cli(_args(setup, tmp_path / "out", subjects=["dog"], extra=["--adapters", str(adapters)])) == 2
    line = _line(capsys)
    assert line.startswith(f"error: {adapters / 'dog' / 'adapter.safetensors'}: tensor ") and "NaN/inf values" in line
    assert not list((tmp_path / "out").glob("dog/*/*.png"))


def _strict_json(path):
    def refuse(token):
        raise ValueError(f"{path} holds {token}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_metrics_nothing_was_scored_for_are_null_with_the_reason(two_process_run, setup, tmp_path):
    output_dir = tmp_path / "out"
    shutil.copytree(two_process_run[0], output_dir)
    for image in output_dir.glob("*/*/*.png"):
        Image.new("RGB", (32, 32)).save(image)  # every generated image all-black, as a diverged adapter draws
    dreambooth.main(_args(setup, output_dir, extra=["--skip_generation"]))
    report = _strict_json(output_dir / "metrics.json")
    assert report["metrics"] == dict.fromkeys(dreambooth.METRICS)
    assert report["not_computed"] == dict.fromkeys(dreambooth.METRICS, "all 8 generated images are all-black, so none "
                                                                       "was scored")
    assert "Not computed: dino: all 8 generated images are all-black" in (output_dir / "summary.md").read_text()


def test_a_metric_without_pairs_is_null_and_the_rest_are_numbers(two_process_run, setup, tmp_path):
    output_dir = tmp_path / "out"
    shutil.copytree(two_process_run[0], output_dir)
    report = dreambooth.main(_args(setup, output_dir, extra=["--skip_generation", "--images_per_prompt", "1"]))
    assert report["metrics"]["lpips_diversity"] is None and report["metrics"]["dino"] is not None
    assert list(report["not_computed"]) == ["lpips_diversity"]
    assert _strict_json(output_dir / "metrics.json")["not_computed"]["lpips_diversity"].startswith("no prompt has two")


# ---------------------------------------------------------------------------------------------- --subjects_per_batch
@pytest.fixture(scope="module")
def distinct_adapters(setup, _tiny_unet):
    """An ETHER+ adapter per subject, moved away from the identity differently for each (as training would)."""
    import copy

    from ether_diffusion.adapters import adapter_state_dict

    root = setup["root"] / "distinct"
    for seed, subject in enumerate(SUBJECTS):
        unet = copy.deepcopy(_tiny_unet)
        inject_adapters(unet, AdapterConfig(method="ether+", n_blocks=4))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in adapter_state_dict(unet).values():
                p.add_(torch.randn(p.shape, generator=g))
        save_adapter(unet, root / subject / "adapter.safetensors")
    return root


@pytest.fixture(scope="module")
def one_at_a_time(setup, distinct_adapters):
    output_dir = setup["root"] / "one-at-a-time"
    return output_dir, dreambooth.main(_args(setup, output_dir, extra=["--adapters", str(distinct_adapters)]))


def _pixels(path):
    import numpy as np

    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).short()


def _same_images(output_dir, reference_dir):
    """Every generated image as in the reference run, up to float rounding (at most one level of 255)."""
    images = sorted(p.relative_to(reference_dir) for p in reference_dir.glob("*/*/*.png"))
    assert len(images) == len(SUBJECTS) * len(PROMPTS) * PER_PROMPT
    assert sorted(p.relative_to(output_dir) for p in output_dir.glob("*/*/*.png")) == images
    for image in images:
        assert (_pixels(output_dir / image) - _pixels(reference_dir / image)).abs().max() <= 1, image


def test_subjects_in_one_batch_give_the_one_at_a_time_images_and_metrics(setup, distinct_adapters, one_at_a_time, tmp_path):
    reference_dir, reference = one_at_a_time
    output_dir = tmp_path / "batched"
    report = dreambooth.main(_args(setup, output_dir, extra=["--adapters", str(distinct_adapters),
                                                             "--subjects_per_batch", "2"]))
    _same_images(output_dir, reference_dir)
    assert report["metrics"] == pytest.approx(reference["metrics"], rel=1e-3, abs=1e-4)
    assert sorted((e["subject"], e["prompt_index"], e["seed"]) for e in _log(output_dir)) == sorted(
        (e["subject"], e["prompt_index"], e["seed"]) for e in _log(reference_dir))
    # the subjects do differ: the same prompt and seed through the other subject's adapter
    assert (_pixels(output_dir / "dog/0/00.png") - _pixels(output_dir / "cat/0/00.png")).abs().max() > 10

    # resumed: only the missing job is generated, into the same images
    for image in (output_dir / "dog" / "1").iterdir():
        image.unlink()
    dreambooth.main(_args(setup, output_dir, extra=["--adapters", str(distinct_adapters), "--subjects_per_batch", "2",
                                                    "--skip_metrics"]))
    log = _log(output_dir)
    assert len(log) == len(SUBJECTS) * len(PROMPTS) + 1 and (log[-1]["subject"], log[-1]["prompt_index"]) == ("dog", 1)
    _same_images(output_dir, reference_dir)


@pytest.mark.user_error("--subjects_per_batch with adapters of different methods", tool=TOOL)
def test_subjects_per_batch_refuses_adapters_that_cannot_share_a_batch(setup, distinct_adapters, tmp_path, capsys):
    adapters = tmp_path / "adapters"
    shutil.copytree(distinct_adapters / "dog", adapters / "dog")
    cat = adapters / "cat" / "adapter.safetensors"  # a LoRA adapter file: another method than dog's ETHER+
    layer = torch.nn.Module()
    layer.to_q = torch.nn.Linear(4, 4)
    inject_adapters(layer, AdapterConfig(method="lora", target_modules=["to_q"]))
    save_adapter(layer, cat)
    argv = _args(setup, tmp_path / "out", extra=["--adapters", str(adapters), "--subjects_per_batch", "2"])
    assert _run_cli(argv) == 2
    line = _line(capsys)
    assert line.startswith(f"error: {cat}: adapter has method='lora' but ") and "share the method" in line
    assert not (tmp_path / "out" / "dog").exists()


# ---------------------------------------------------------------------------------------------- stale images
def _image_bytes(output_dir) -> dict:
    return {str(p.relative_to(output_dir)): p.read_bytes() for p in sorted(output_dir.glob("*/*/*.png"))}


@pytest.mark.user_error("a rerun into the same --output_dir with another --seed or --guidance_scale", tool=TOOL)
def test_images_made_with_other_settings_are_made_again(two_process_run, setup, tmp_path, capsys):
    output_dir = tmp_path / "out"
    shutil.copytree(two_process_run[0], output_dir)
    before = _image_bytes(output_dir)
    report = dreambooth.main(_args(setup, output_dir, extra=["--adapters", str(setup["adapters"]), "--seed", "1"]))
    out = capsys.readouterr().out
    assert "were made with other settings: generating them again" in out and "0 of 4 jobs already done" in out
    after = _image_bytes(output_dir)
    assert after.keys() == before.keys() and all(after[k] != before[k] for k in before)
    assert report["settings"]["seed"] == 1
    # scoring them under a setting they were not made with is refused, naming it
    assert _run_cli(_args(setup, output_dir, extra=["--skip_generation", "--seed", "1", "--guidance_scale", "3"])) == 2
    assert _line(capsys) == (f"error: the images in {output_dir} were generated with guidance_scale=7.5, but this run asks "
                             "for guidance_scale=3.0: rerun without --skip_generation to generate them again, or give "
                             "the same settings")


@pytest.mark.user_error("a rerun into the same --output_dir with other --adapters", tool=TOOL)
def test_jobs_of_another_adapter_are_made_again_and_only_they(two_process_run, setup, tmp_path, capsys, _tiny_unet):
    import copy

    output_dir = tmp_path / "out"
    shutil.copytree(two_process_run[0], output_dir)
    before = _image_bytes(output_dir)
    adapters = shutil.copytree(setup["adapters"], tmp_path / "adapters")
    unet = copy.deepcopy(_tiny_unet)
    inject_adapters(unet, AdapterConfig(method="lora", rank=2))
    save_adapter(unet, adapters / "cat" / "adapter.safetensors")  # cat retrained; dog's file is the same
    dreambooth.main(_args(setup, output_dir, extra=["--adapters", str(adapters), "--skip_metrics"]))
    assert "2 of 4 jobs already done; generating 2" in capsys.readouterr().out
    after = _image_bytes(output_dir)
    assert {k for k in before if after[k] != before[k]} <= {k for k in before if k.startswith("cat/")}
    assert all(after[k] == before[k] for k in before if k.startswith("dog/"))
    log = _log(output_dir)[-2:]
    assert {(entry["subject"], entry["adapter"]) for entry in log} == {("cat", str(adapters / "cat" / "adapter.safetensors"))}
