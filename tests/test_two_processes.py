"""Two-process training (`torchrun --nproc_per_node 2` on CPU, one thread per process, its workers forked:
tests/forked.py). Both trainers share the code that splits data and saves checkpoints (`training`,
`checkpoints`); it runs here through DreamBooth:

- the processes agree: at every checkpoint they compare their trained parameters (`checkpoints.save_checkpoint`
  stops on a difference), and one adapter, one log and one checkpoint folder per step are written;
- stop-and-resume is bit-exact with an uneven split (3 images on 2 processes), the text encoder trained too
  (DDP keeps its adapter equal on both processes; with prior preservation both prompts go through one
  text-encoder call per step);
- a diverged step stops both processes with the error, nothing of that step written;
- a two-process checkpoint is not resumed on one process.
"""
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file
from ether_diffusion.trainers import dreambooth as dreambooth_trainer
from trainer_helpers import REPO, TINY, fails, stop_and_resume, torchrun
from user_errors import record

from ether_diffusion import checkpoints
from ether_diffusion.toy import world


def dreambooth_args(subject, *extra, method=("--method", "ether+", "--n_blocks", 2)):
    return ["--pretrained_model_name_or_path", TINY, "--instance_data_dir", subject, "--instance_prompt",
            "a photo of qwe toy", "--resolution", 32, "--train_batch_size", 1, "--max_train_steps", 5,
            "--checkpointing_steps", 3, "--learning_rate", "1e-2", "--lr_scheduler", "linear", "--lr_warmup_steps", 1,
            "--seed", 3, *method, "--report_to", "none", "--num_validation_images", 1,
            "--validation_inference_steps", 1, *extra]


# the stop-and-resume runs: the text encoder trained too, with prior preservation
TEXT_ENCODER_AND_PRIOR = ("--train_text_encoder", "--with_prior_preservation", "--class_prompt", "a photo of toy",
                          "--num_class_images", 2, "--class_inference_steps", 2)


def same_tensors(a, b) -> bool:
    a, b = load_file(str(a)), load_file(str(b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    return world.write_subject(tmp_path_factory.mktemp("subject") / "toy", world.DEMO_SUBJECT, count=3)  # 2 processes: uneven


@pytest.fixture(scope="module")
def dreambooth_runs(subject, tmp_path_factory):
    """5 steps on 2 processes (2 steps per epoch), and the same run stopped after step 3 (mid-epoch) and resumed."""
    return stop_and_resume("train_dreambooth.py", dreambooth_args(subject, *TEXT_ENCODER_AND_PRIOR),
                           tmp_path_factory.mktemp("dreambooth"), stop_at=3, run=torchrun)


def test_dreambooth_on_two_processes_resumes_bit_exactly(dreambooth_runs):
    full, resumed = dreambooth_runs
    assert same_tensors(full / "adapter.safetensors", resumed / "adapter.safetensors")
    trained, before = load_file(str(full / "adapter.safetensors")), load_file(str(full / "checkpoint-3" / "adapter.safetensors"))
    for part in ("unet", "text_encoder"):  # both parts trained on from step 3
        keys = [k for k in trained if k.startswith("text_encoder.") == (part == "text_encoder")]
        assert keys and any(not torch.equal(trained[k], before[k]) for k in keys), part
    for out in (full, resumed):  # one of everything, written by the main process only
        assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
        assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter.safetensors", "checkpoint-3",
                                                          "class-images", "run_files.json", "samples", "train_log.jsonl"]
    checkpoint = full / "checkpoint-3"
    assert {"rng-0.pt", "rng-1.pt"} <= {p.name for p in checkpoint.iterdir()}  # each process's random state
    assert checkpoints.read_state(checkpoint)["settings"]["num_processes"] == 2


@pytest.mark.user_error("--resume_from_checkpoint of a two-process run on one process", tool="train_dreambooth.py")
def test_a_two_process_checkpoint_is_not_resumed_on_one_process(dreambooth_runs, subject, tmp_path, capsys):
    full, _ = dreambooth_runs
    out = tmp_path / "o"
    shutil.copytree(full / "checkpoint-3", out / "checkpoint-3")
    line = fails(dreambooth_trainer.main, dreambooth_args(
        subject, *TEXT_ENCODER_AND_PRIOR, "--output_dir", out, "--resume_from_checkpoint", "latest"), capsys)
    assert (f"{out / 'checkpoint-3'} was saved by 2 processes but this run has 1: resume with 2 (each process's random "
            "state and share of the data are in the checkpoint)") in line


@pytest.mark.user_error("a learning rate so high that training diverges (LoRA at 1e4)", tool="train_dreambooth.py")
def test_a_diverged_step_stops_both_processes_and_keeps_what_came_before(subject, tmp_path):
    out = tmp_path / "o"
    proc = torchrun("train_dreambooth.py", *dreambooth_args(subject, "--output_dir", out, "--learning_rate", "1e4",
                                                            "--checkpointing_steps", 1, "--max_train_steps", 8,
                                                            method=("--method", "lora")), check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: training diverged at step ")]
    assert errors and len(set(errors)) == 1, proc.stderr[-3000:]  # each process that printed, the same line
    line = record(errors[0])
    step = int(re.search(r"training diverged at step (\d+): ", line)[1])
    assert 1 < step < 8 and "(--method lora, --learning_rate 10000)" in line and "lower --learning_rate" in line
    assert f"checkpoint-{step - 1} is the last checkpoint" in line
    assert f'{REPO / "ether_diffusion"}' not in proc.stderr  # no traceback through our code on either process
    # nothing of the diverged step or after: no checkpoint, no log line, no adapter; the last checkpoint is finite
    assert [p.name for _, p in checkpoints.checkpoint_folders(out)] == [f"checkpoint-{s}" for s in range(1, step)]
    assert [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()] == list(range(1, step))
    assert not (out / "adapter.safetensors").exists()
    last = load_file(str(out / f"checkpoint-{step - 1}" / "adapter.safetensors"))
    assert all(torch.isfinite(t).all() for t in last.values())
