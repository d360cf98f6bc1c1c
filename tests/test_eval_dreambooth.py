"""evaluate/dreambooth.py end to end on the tiny SD and the offline stand-in backbones."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from ether_diffusion import AdapterConfig, inject_adapters, save_adapter
from ether_diffusion.errors import run_cli
from evaluate import dreambooth
from evaluate.protocol import PROMPTS_FILE
from evaluate.tiny_backbones import write_tiny_backbones

REPO = Path(__file__).resolve().parents[1]
DATASET = REPO.parent / "shared" / "datasets" / "dreambooth"
SUBJECTS, PROMPTS, PER_PROMPT = ("dog", "cat"), (0, 1), 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory, _tiny_unet):
    """Stand-in backbones and one tiny ETHER+ adapter per subject (dog and cat)."""
    import copy

    root = tmp_path_factory.mktemp("db_eval")
    unet = copy.deepcopy(_tiny_unet)
    inject_adapters(unet, AdapterConfig(method="ether+", n_blocks=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
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
    """`torchrun --nproc_per_node 2` with ACCELERATE_USE_CPU=1: two gloo processes share the jobs."""
    output_dir = setup["root"] / "out"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "evaluate" / "dreambooth.py"), *_args(setup, output_dir, extra=["--adapters", str(setup["adapters"])])]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir, result


def test_two_processes_cover_every_job_exactly_once(two_process_run):
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


def test_missing_adapter_is_a_clear_error(setup, tmp_path, capsys):
    adapters = tmp_path / "adapters"
    shutil.copytree(setup["adapters"] / "dog", adapters / "dog")  # no cat adapter
    assert _run_cli(_args(setup, tmp_path / "out", extra=["--adapters", str(adapters)])) == 2
    err = capsys.readouterr().err
    assert f"error: missing adapter for subject cat: {adapters / 'cat' / 'adapter.safetensors'} does not exist" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "dog").exists()  # stopped before generating anything


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
    err = capsys.readouterr().err
    assert f"error: {dataset / 'cat' / '01.jpg'}: cannot read image" in err
    assert not (tmp_path / "out" / "dog").exists()


def test_incomplete_generation_is_a_clear_error_when_scoring(setup, tmp_path, capsys):
    assert _run_cli(_args(setup, tmp_path / "out", extra=["--skip_generation"])) == 2
    assert "generation is incomplete for dog prompt 0" in capsys.readouterr().err
