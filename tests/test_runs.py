"""Nothing lost (issue 12, part A): one run per output folder, resume checks, damaged checkpoints, full disks
and diverged runs. The DreamBooth trainer runs in-process on the tiny model (32 px, a few steps); every
mistake ends in one line (exit code 2) and leaves the last good state as it was."""
import errno
import json
import logging
import os
import pathlib
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from ether_diffusion.trainers import dreambooth as dreambooth_trainer
from forked import ForkedPopen, hold_in_a_child
from trainer_helpers import REPO, TINY, fails

import user_errors
from ether_diffusion import checkpoints, divergence, dreambooth_data, run_folder, training
from ether_diffusion.errors import UserError, is_disk_full, run_cli, writing
from ether_diffusion.toy import world

TOOL = "train_dreambooth.py"


@pytest.fixture(scope="module")
def script():
    return dreambooth_trainer


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    return world.write_subject(tmp_path_factory.mktemp("subject") / "toy", world.DEMO_SUBJECT)  # 5 images


def argv(subject, out, *extra, steps=4, every=2) -> list[str]:
    """A 4-step ETHER+ run with checkpoints at 2 and 4; later flags in `extra` win."""
    return [str(a) for a in [
        "--pretrained_model_name_or_path", TINY, "--instance_data_dir", subject, "--instance_prompt",
        "a photo of qwe toy", "--resolution", 32, "--train_batch_size", 1, "--max_train_steps", steps,
        "--checkpointing_steps", every, "--learning_rate", "1e-3", "--lr_scheduler", "linear", "--lr_warmup_steps", 1,
        "--seed", 3, "--method", "ether+", "--n_blocks", 2, "--report_to", "none", "--num_validation_images", 1,
        "--validation_inference_steps", 1, "--output_dir", out, *extra]]


def train(script, subject, out, *extra, **kw):
    script.main(argv(subject, out, *extra, **kw))


@pytest.fixture(scope="module")
def finished(script, subject, tmp_path_factory):
    """A finished 4-step run: checkpoint-2, checkpoint-4, the adapter, samples and the log."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(script, subject, out)
    return out


def copy_of(run, tmp_path, *only) -> pathlib.Path:
    """A copy of `run` (or of only the named entries of it, with the run's record of its files) in a fresh
    output folder."""
    out = tmp_path / "o"
    if not only:
        shutil.copytree(run, out)
    for name in only:
        shutil.copytree(run / name, out / name)
    if only:
        shutil.copy(run / run_folder.RECORD_FILE, out)
    return out


def tensors(path):
    return load_file(str(path))


def log_steps(out):
    return [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def snapshot(out) -> dict:
    """Every file under `out` with its bytes: what a refused run must leave alone. (Not `run.lock`: a run
    refused after it took the folder holds it until its process ends, which in-process is the test's.)"""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != "run.lock"}


# ------------------------------------------------------------------------------------------ diverged runs
# A whole diverged run (both processes stop, what came before is kept): test_two_processes.py.
class FakeAccelerator(SimpleNamespace):
    num_processes = 1
    scaler = None


@pytest.mark.parametrize("loss, grad_norm, param, scaler, expected", [
    (float("nan"), 1.0, 0.0, None, "the loss is nan"),
    (0.5, float("inf"), 0.0, None, "the gradient is not finite (norm inf)"),
    (0.5, 1.0, float("nan"), None, "the update made the trained parameters inf/NaN"),
    (0.5, float("inf"), 0.0, "fp16 scaler", None),  # the loss scaler skips that step itself
    (0.5, 1.0, 0.0, None, None),
])
def test_check_step_names_what_diverged(tmp_path, loss, grad_norm, param, scaler, expected):
    args = SimpleNamespace(method="oft", learning_rate=6e-2, output_dir=str(tmp_path))
    params = [torch.zeros(3), torch.full((2,), param)]
    check = lambda: divergence.check_step(FakeAccelerator(scaler=scaler), args, 19, loss, torch.tensor(grad_norm), params)  # noqa: E731
    if expected is None:
        check()
        return
    with pytest.raises(divergence.TrainingDiverged) as e:
        check()
    assert str(e.value) == (f"training diverged at step 19: {expected} (--method oft, --learning_rate 0.06); nothing "
                            "of this step was written: lower --learning_rate")


# ------------------------------------------------------------------------------------------ one run per folder
@pytest.mark.user_error("a second trainer on the --output_dir of a running one", tool=TOOL)
def test_a_second_trainer_on_a_folder_in_use_is_refused_naming_the_holder(script, subject, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    with hold_in_a_child(run_folder.lock_output_dir, out) as holder:
        line = fails(script.main, argv(subject, out), capsys)
    assert (f"{out} is in use by another training run (pid {holder.pid} on host {socket.gethostname()}, started "
            in line) and line.endswith("wait for it to finish, stop it, or use another --output_dir")
    assert sorted(p.name for p in out.iterdir()) == ["run.lock"]  # the holder's, untouched


@pytest.mark.user_error("the lock file of a trainer that was killed (kill -9) left in --output_dir", tool=TOOL)
def test_the_lock_of_a_killed_run_is_taken_over(script, subject, tmp_path, caplog):
    out = tmp_path / "o"
    out.mkdir()
    with hold_in_a_child(run_folder.lock_output_dir, out) as holder:
        pass  # then SIGKILL: no clean-up ran; the file stays, the kernel dropped the lock
    assert json.loads((out / "run.lock").read_text())["pid"] == holder.pid
    with caplog.at_level(logging.WARNING, logger="ether_diffusion.run_folder"):
        train(script, subject, out, steps=2)
    warning = next(r.getMessage() for r in caplog.records if "taking over" in r.getMessage())
    assert f"from a run that is no longer running (pid {holder.pid} on host {socket.gethostname()}" in warning
    user_errors.record(warning)
    assert (out / "adapter.safetensors").is_file() and not (out / "run.lock").exists()  # released at the end


@pytest.mark.user_error("a new run in an --output_dir that holds another run's checkpoints and adapter", tool=TOOL)
def test_a_new_run_in_a_used_folder_needs_resume_or_overwrite(script, subject, finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    line = fails(script.main, argv(subject, out), capsys)
    assert (f"{out} holds another run (checkpoint-2, checkpoint-4, adapter.safetensors): pass --resume_from_checkpoint "
            "latest to continue it, --overwrite_output_dir to replace it, or use another --output_dir") in line
    assert snapshot(out) == before  # not a byte changed


@pytest.mark.user_error("--resume_from_checkpoint and --overwrite_output_dir together", tool=TOOL)
def test_resume_and_overwrite_together_is_an_error(script, subject, finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    line = fails(script.main, argv(subject, out, "--overwrite_output_dir", "--resume_from_checkpoint", "latest"), capsys)
    assert "--overwrite_output_dir deletes the run that --resume_from_checkpoint would continue: give one of them" in line
    assert snapshot(out) == before


@pytest.mark.user_error("--resume_from_checkpoint latest in a finished run's folder that kept no checkpoint", tool=TOOL)
def test_a_finished_adapter_without_checkpoints_is_not_retrained_silently(script, subject, finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path, "samples")
    shutil.copy(finished / "adapter.safetensors", out)
    line = fails(script.main, argv(subject, out, "--resume_from_checkpoint", "latest"), capsys)
    assert (f"{out} holds another run (adapter.safetensors): it has no checkpoint to resume from: pass "
            "--overwrite_output_dir to train again, or use another --output_dir") in line


def test_overwrite_deletes_the_previous_runs_outputs_first(script, subject, finished, tmp_path, caplog):
    out = copy_of(finished, tmp_path)
    (out / "notes.txt").write_text("mine")  # not a run's output: kept
    (out / "checkpoint-6.tmp").mkdir()  # a save that never finished
    with caplog.at_level(logging.INFO, logger="ether_diffusion.run_folder"):
        train(script, subject, out, "--overwrite_output_dir", steps=3, every=3)
    removed = {r.getMessage() for r in caplog.records if r.getMessage().startswith("removed ")}
    assert removed == {f"removed {out / name} (a previous run's)" for name in (
        "checkpoint-2", "checkpoint-4", "checkpoint-6.tmp", "adapter.safetensors", "train_log.jsonl", "samples",
        "README.md")}
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter.safetensors", "checkpoint-3", "notes.txt",
                                                      "run_files.json", "samples", "train_log.jsonl"]
    assert (out / "notes.txt").read_text() == "mine"
    assert log_steps(out) == [1, 2, 3] and sorted(p.name for p in (out / "samples").iterdir()) == ["final.png"]


def test_a_run_that_stopped_before_its_first_checkpoint_is_replaced(script, subject, finished, tmp_path):
    out = copy_of(finished, tmp_path, "samples")  # with the run's record of its files
    (out / "samples" / "step-000100.png").write_bytes(b"a grid of the earlier run")
    (out / "train_log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    train(script, subject, out, steps=2)  # nothing to resume and nothing finished: no flag needed
    assert log_steps(out) == [1, 2] and not (out / "samples" / "step-000100.png").exists()


def users_folder(tmp_path) -> pathlib.Path:
    """A folder no run of ours made: the user's README and notes (issue 25, case 1)."""
    out = tmp_path / "o"
    (out / "logs").mkdir(parents=True)
    (out / "README.md").write_text("mine")
    (out / "logs" / "notes.txt").write_text("x")
    return out


@pytest.mark.user_error("an --output_dir that holds the user's own files (README.md, logs/)", tool=TOOL)
def test_a_folder_with_files_no_run_wrote_is_refused_naming_them(script, subject, tmp_path, capsys):
    out = users_folder(tmp_path)
    before = snapshot(out)
    line = fails(script.main, argv(subject, out), capsys)
    assert (f"{out} holds files that no run of ether-diffusion wrote (README.md, logs): use a new or empty "
            "--output_dir, or pass --overwrite_output_dir to write beside them") in line
    assert snapshot(out) == before and not (out / "run.lock").exists()


@pytest.mark.user_error("--overwrite_output_dir in a folder with a file of the user where a run writes (README.md)",
                        tool=TOOL)
def test_overwrite_never_writes_over_a_file_no_run_wrote(script, subject, tmp_path, capsys):
    out = users_folder(tmp_path)
    before = snapshot(out)
    line = fails(script.main, argv(subject, out, "--overwrite_output_dir"), capsys)
    assert (f"{out / 'README.md'} was not written by a run of ether-diffusion (no run_files.json names it), and this "
            "run would write there: move it away or use another --output_dir") in line
    assert snapshot(out) == before


@pytest.mark.user_error("--output_dir . in a clone of the repository (with and without --overwrite_output_dir)",
                        tool=TOOL)
def test_a_clone_of_the_repository_is_never_a_run_folder(script, subject, tmp_path, capsys, monkeypatch):
    clone = tmp_path / "clone"
    for name in (".git", "ether_diffusion", "logs", "tests"):
        (clone / name).mkdir(parents=True)
    for name in ("README.md", "Makefile", "pyproject.toml", "train_dreambooth.py"):
        (clone / name).write_text(f"the repository's {name}")
    before = snapshot(clone)
    monkeypatch.chdir(clone)
    line = fails(script.main, argv(subject, ".", "--report_to", "tensorboard"), capsys)
    assert "holds files that no run of ether-diffusion wrote (.git, Makefile, README.md, ether_diffusion, logs, " \
           "pyproject.toml and 2 more)" in line
    line = fails(script.main, argv(subject, ".", "--report_to", "tensorboard", "--overwrite_output_dir"), capsys)
    assert "README.md was not written by a run of ether-diffusion" in line
    assert snapshot(clone) == before


def test_overwrite_writes_beside_the_users_files_and_deletes_only_recorded_ones(script, subject, finished, tmp_path):
    out = copy_of(finished, tmp_path)
    (out / "logs").mkdir()
    (out / "logs" / "notes.txt").write_text("x")  # not a run's (no tensorboard in these runs): kept
    (out / "samples" / "mine.png").write_bytes(b"inside a run's folder: that run's, as the record says")
    train(script, subject, out, "--overwrite_output_dir", steps=2)
    assert (out / "logs" / "notes.txt").read_text() == "x" and not (out / "samples" / "mine.png").exists()
    record = json.loads((out / "run_files.json").read_text())
    assert "logs" not in record["outputs"] and {"adapter.safetensors", "samples", "README.md"} <= set(record["outputs"])


# ------------------------------------------------------------------------------------------ resume checks
RESUME_CHANGES = [  # (mistake, changed flags, the difference named)
    ("another --resolution", ["--resolution", 64], "resolution=32 but this run asks for resolution=64"),
    ("another --train_batch_size", ["--train_batch_size", 2], "train_batch_size=1 but this run asks for train_batch_size=2"),
    ("another --gradient_accumulation_steps", ["--gradient_accumulation_steps", 2],
     "gradient_accumulation_steps=1 but this run asks for gradient_accumulation_steps=2"),
    ("another --learning_rate", ["--learning_rate", "2e-3"], "learning_rate=0.001 but this run asks for learning_rate=0.002"),
    ("another --lr_scheduler", ["--lr_scheduler", "cosine"], "lr_scheduler='linear' but this run asks for lr_scheduler='cosine'"),
    ("another --n_blocks", ["--n_blocks", 4], "n_blocks=2 but this run asks for n_blocks=4"),
    ("other --target_modules", ["--target_modules", "to_q,to_v"], "target_modules=['to_q', 'to_k', 'to_v', 'to_out.0'] "
     "but this run asks for target_modules=['to_q', 'to_v']"),
    ("another --method", ["--method", "oft"], "method='ether+' but this run asks for method='oft'"),
    ("another --instance_prompt", ["--instance_prompt", "a photo of sks toy"],
     "instance_prompt='a photo of qwe toy' but this run asks for instance_prompt='a photo of sks toy'"),
]


@pytest.mark.parametrize("changed, named", [
    pytest.param(flags, named, id=mistake.split()[-1].lstrip("-"), marks=pytest.mark.user_error(
        f"--resume_from_checkpoint with {mistake} than the checkpoint's", tool=TOOL))
    for mistake, flags, named in RESUME_CHANGES])
def test_resuming_with_another_setting_is_refused_naming_it(script, subject, finished, tmp_path, capsys, changed, named):
    out = copy_of(finished, tmp_path, "checkpoint-2")
    before = snapshot(out)
    line = fails(script.main, argv(subject, out, "--resume_from_checkpoint", "latest", *changed), capsys)
    assert f"{out / 'checkpoint-2'} was trained with {named}; resume with the same setting or use another --output_dir" in line
    assert snapshot(out) == before


@pytest.mark.user_error("--resume_from_checkpoint with an instance folder that has another number of images", tool=TOOL)
def test_resuming_on_another_dataset_size_is_refused(script, subject, finished, tmp_path, capsys):
    fewer = shutil.copytree(subject, tmp_path / "fewer")
    next(iter(sorted(fewer.iterdir()))).unlink()
    out = copy_of(finished, tmp_path, "checkpoint-2")
    line = fails(script.main, argv(fewer, out, "--resume_from_checkpoint", "latest"), capsys)
    assert f"{out / 'checkpoint-2'} was trained on 5 examples but this run has 4: resume with the same data" in line


def test_resuming_may_change_what_does_not_change_the_result(script, subject, finished, tmp_path):
    # another output folder, seed, checkpoint cadence, validation and logging: the same adapter, bit for bit
    out = copy_of(finished, tmp_path, "checkpoint-2")
    train(script, subject, out, "--resume_from_checkpoint", "latest", "--seed", 99, "--checkpointing_steps", 1,
          "--checkpoints_total_limit", 1, "--validation_prompt", "a qwe toy", "--validation_steps", 1,
          "--num_validation_images", 2, "--validation_inference_steps", 2, "--distance_logging_steps", 1)
    a, b = tensors(finished / "adapter.safetensors"), tensors(out / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.user_error("resuming with the model folder written another way (absolute, trailing /) or without "
                        "--export_lora", tool=TOOL)
def test_resuming_accepts_the_same_model_written_otherwise_and_another_export(script, subject, tiny_sd_path, tmp_path,
                                                                              monkeypatch):
    model = shutil.copytree(tiny_sd_path, tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "o"
    train(script, subject, out, "--pretrained_model_name_or_path", "model", "--export_lora", "kohya", steps=2)
    assert (out / "lora_kohya.safetensors").is_file()
    train(script, subject, out, "--pretrained_model_name_or_path", f"{model}/", "--resume_from_checkpoint", "latest")
    assert log_steps(out) == [1, 2, 3, 4]
    assert not (out / "lora_kohya.safetensors").exists()  # of step 2: not left beside the adapter of step 4


@pytest.mark.user_error("--max_train_steps below the step of the checkpoint resumed", tool=TOOL)
def test_resuming_past_max_train_steps_is_refused(script, subject, finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path, "checkpoint-4")
    line = fails(script.main, argv(subject, out, "--resume_from_checkpoint", "latest", steps=2), capsys)
    assert f"{out / 'checkpoint-4'} is at step 4, past --max_train_steps 2: resume with --max_train_steps 4 or more" in line


@pytest.mark.user_error("resuming an early checkpoint of a finished run with a shorter --max_train_steps", tool=TOOL)
def test_the_finished_adapter_is_never_replaced_by_an_older_state(script, subject, finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    line = fails(script.main, argv(subject, out, "--resume_from_checkpoint", "checkpoint-2", steps=3), capsys)
    assert (f"{out / 'adapter.safetensors'} was trained for 4 steps; this run would replace it with the state at step 3: "
            "use --max_train_steps 4 or more, or another --output_dir") in line
    assert snapshot(out) == before


# ------------------------------------------------------------------------------------------ class images
PRIOR_RUN = ["--with_prior_preservation", "--class_prompt", "a photo of a toy", "--num_class_images", 3,
             "--sample_batch_size", 3, "--class_inference_steps", 1]


@pytest.mark.user_error("--class_data_dir equal to --instance_data_dir", tool=TOOL)
def test_class_images_are_never_generated_among_the_subjects_photos(script, subject, tmp_path, capsys):
    photos = shutil.copytree(subject, tmp_path / "photos")
    before = snapshot(photos)
    line = fails(script.main, argv(photos, tmp_path / "o", *PRIOR_RUN, "--class_data_dir", photos), capsys)
    assert line == (f"error: --class_data_dir {photos} is the --instance_data_dir: class images are generated into it "
                    "and would be read as photos of the subject; use a folder of its own for the class images")
    assert snapshot(photos) == before


@pytest.mark.user_error("a class image deleted between a kill and --resume_from_checkpoint latest", tool=TOOL)
def test_a_class_image_lost_before_resuming_is_made_again_and_the_result_is_exact(script, subject, tmp_path):
    full = tmp_path / "full"
    train(script, subject, full, *PRIOR_RUN)
    out = copy_of(full, tmp_path, "checkpoint-2", "class-images")
    lost = sorted((out / "class-images").iterdir())[1]  # a gap: 2 of 3 left, the last one still there
    lost.unlink()
    train(script, subject, out, *PRIOR_RUN, "--resume_from_checkpoint", "latest")
    assert lost.read_bytes() == (full / "class-images" / lost.name).read_bytes()
    a, b = tensors(full / "adapter.safetensors"), tensors(out / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ damaged checkpoints
@pytest.mark.user_error("the newest checkpoint damaged (optimizer.pt truncated), --resume_from_checkpoint latest",
                        tool=TOOL)
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one_exactly(script, subject, finished, tmp_path, caplog):
    out = copy_of(finished, tmp_path, "checkpoint-2", "checkpoint-4")
    optimizer = out / "checkpoint-4" / "optimizer.pt"
    size = optimizer.stat().st_size
    optimizer.write_bytes(optimizer.read_bytes()[: size // 2])
    with caplog.at_level(logging.WARNING, logger="ether_diffusion.checkpoints"):
        train(script, subject, out, "--resume_from_checkpoint", "latest")
    warning = next(r.getMessage() for r in caplog.records if "damaged" in r.getMessage())
    assert warning == (f"checkpoint-4 is damaged: optimizer.pt is truncated ({size // 2} of {size} bytes): resuming "
                       "from checkpoint-2 instead")
    user_errors.record(warning)
    # steps 3 and 4 again: the finished run's adapter, bit for bit, and checkpoint-4 whole again
    a, b = tensors(finished / "adapter.safetensors"), tensors(out / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert checkpoints.checkpoint_problem(out / "checkpoint-4") is None


@pytest.mark.user_error("every checkpoint damaged, --resume_from_checkpoint latest", tool=TOOL)
def test_no_whole_checkpoint_is_an_error_naming_the_damaged_files(script, subject, finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path, "checkpoint-2", "checkpoint-4")
    (out / "checkpoint-4" / "rng-0.pt").unlink()
    (out / "checkpoint-2" / "state.json").write_text('{"global_step": 2, "data_se')
    line = fails(script.main, argv(subject, out, "--resume_from_checkpoint", "latest"), capsys)
    assert (f"no usable checkpoint in {out}: checkpoint-4 is damaged: rng-0.pt is missing; checkpoint-2 is damaged: "
            "state.json is damaged (JSONDecodeError)") in line


# ------------------------------------------------------------------------------------------ interrupts
@pytest.mark.parametrize("signum", [
    pytest.param(signal.SIGINT, id="SIGINT", marks=pytest.mark.user_error("Ctrl-C (SIGINT) during training", tool=TOOL)),
    pytest.param(signal.SIGTERM, id="SIGTERM", marks=pytest.mark.user_error("SIGTERM during training", tool=TOOL))])
def test_an_interrupt_is_one_line_with_the_step_and_the_command_that_resumes(subject, tmp_path, signum):
    out = tmp_path / "o"
    command = [sys.executable, "train_dreambooth.py", *argv(subject, out, steps=40, every=2)]
    # forked, the trainer has a new interpreter's Ctrl-C handling whatever this process has: a suite started in
    # the background of a non-interactive shell (`make test &`, some CI runners) ignores SIGINT, and a child
    # that inherited that would run to its end
    proc = ForkedPopen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    while not checkpoints.list_checkpoints(out) and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signum)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + signum and "Traceback" not in err, err[-3000:]
    line = user_errors.record(err.strip().splitlines()[-1])
    found = re.fullmatch(rf"interrupted \({signal.Signals(signum).name}\) at step (\d+); (\S+) is the last checkpoint: "
                         r"resume with `python (.*)`", line)
    assert found, line
    step, last = int(found[1]), pathlib.Path(found[2])
    assert last == checkpoints.list_checkpoints(out)[-1][1] and int(last.name.split("-")[1]) <= step < 40
    assert not (out / "run.lock").exists() and not list(out.glob("checkpoint-*.tmp"))
    if signum == signal.SIGTERM:  # the command it gives continues the run to its end (here in this process)
        script, *resume = shlex.split(found[3])
        assert script == "train_dreambooth.py"
        dreambooth_trainer.main(resume)
        assert log_steps(out) == list(range(1, 41)) and (out / "adapter.safetensors").is_file()


@pytest.mark.user_error("leftovers of a killed run (a temporary file, checkpoint-N.old/.tmp, the grid of a step after "
                        "the checkpoint)", tool=TOOL)
def test_leftovers_of_an_interrupted_run_are_removed_when_it_resumes(script, subject, finished, tmp_path, caplog):
    out = copy_of(finished, tmp_path, "checkpoint-2", "samples")
    (out / ".tmp-k2j4h1.safetensors").write_bytes(b"half an adapter")
    (out / "checkpoint-4.tmp").mkdir()
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-2.old")
    (out / "samples" / "step-000003.png").write_bytes(b"the grid of a step after the checkpoint")
    with caplog.at_level(logging.INFO, logger="ether_diffusion.run_folder"):
        train(script, subject, out, "--resume_from_checkpoint", "latest")
    removed = {r.getMessage() for r in caplog.records if "left by the interrupted run" in r.getMessage()}
    assert removed == {f"removed {out / name} (left by the interrupted run)" for name in (
        ".tmp-k2j4h1.safetensors", "checkpoint-4.tmp", "checkpoint-2.old", "samples/step-000003.png")}
    assert not list(out.glob(".tmp-*")) and not (out / "checkpoint-2.old").exists()
    a, b = tensors(finished / "adapter.safetensors"), tensors(out / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ full disks
def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fail_torch_save_of(name, monkeypatch):
    real_save = torch.save

    def save(obj, f, *a, **k):
        if str(getattr(f, "name", f)).endswith(name):
            disk_full()
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)


def from_call(n, real, counts=lambda *a, **k: True):
    """`real`, until its `n`-th call (of those that `counts`): from then on the disk is full."""
    calls = []

    def call(*a, **k):
        if counts(*a, **k):
            calls.append(a)
            if len(calls) >= n:
                disk_full()
        return real(*a, **k)

    return call


def break_checkpoint_4(script, monkeypatch):
    fail_torch_save_of("checkpoint-4.tmp/optimizer.pt", monkeypatch)


def break_final_adapter(script, monkeypatch):
    monkeypatch.setattr(training, "save_adapter", disk_full)  # the trainers write it through training


def break_train_log_at_step_3(script, monkeypatch):
    def appends_to_the_log(path, mode="r", *a, **k):
        return path.name == "train_log.jsonl" and "a" in mode

    monkeypatch.setattr(pathlib.Path, "open", from_call(3, pathlib.Path.open, appends_to_the_log))


def break_grid_at_step_4(script, monkeypatch):
    monkeypatch.setattr(training, "save_grid", from_call(2, training.save_grid))


def break_class_images(script, monkeypatch):
    monkeypatch.setattr(dreambooth_data, "save_image", disk_full)


VALIDATION = ["--validation_prompt", "a qwe toy", "--validation_steps", 2, "--num_validation_images", 1,
              "--validation_inference_steps", 1]
PRIOR = ["--with_prior_preservation", "--class_prompt", "a photo of a toy", "--num_class_images", 2,
         "--sample_batch_size", 2, "--class_inference_steps", 1]
DISK_FULL = [  # (where, break it, flags, the file named, the checkpoints left whole)
    ("a checkpoint", break_checkpoint_4, [], "checkpoint-4/optimizer.pt", ["checkpoint-2"]),
    ("the final adapter", break_final_adapter, [], "adapter.safetensors", ["checkpoint-2", "checkpoint-4"]),
    ("the train log", break_train_log_at_step_3, [], "train_log.jsonl", ["checkpoint-2"]),
    ("a validation grid", break_grid_at_step_4, VALIDATION, "samples/step-000004.png", ["checkpoint-2", "checkpoint-4"]),
    ("the class images", break_class_images, PRIOR, "class-images/00000-", []),
]


@pytest.mark.parametrize("break_it, flags, named, kept", [
    pytest.param(break_it, flags, named, kept, id=where.split()[-1], marks=pytest.mark.user_error(
        f"disk full while writing {where}", tool=TOOL))
    for where, break_it, flags, named, kept in DISK_FULL])
def test_a_full_disk_is_one_line_naming_the_file_and_the_last_good_state_stays(
        script, subject, tmp_path, capsys, monkeypatch, break_it, flags, named, kept):
    out = tmp_path / "o"
    break_it(script, monkeypatch)
    line = fails(script.main, argv(subject, out, *flags), capsys)
    assert line.startswith(f"error: no space left on device while writing {out / named}")
    monkeypatch.undo()
    assert [p.name for _, p in checkpoints.checkpoint_folders(out)] == kept
    assert all(checkpoints.checkpoint_problem(out / name) is None for name in kept)
    assert not list(out.glob("checkpoint-*.tmp")) and not (out / "adapter.safetensors").exists()


def test_is_disk_full_reads_the_ways_libraries_report_it(tmp_path):
    class FullFile:  # what a file on a full disk does: writes fail with ENOSPC
        name = str(tmp_path / "x.pt")

        def write(self, data):
            disk_full()

        def flush(self):
            pass

    with pytest.raises(Exception) as e:  # as it comes out of torch.save
        torch.save({"x": torch.zeros(1000)}, FullFile())
    assert is_disk_full(e.value)
    try:  # torch.save to a real file on a full disk: "unexpected pos ...", the OSError only in the chain
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        try:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        except RuntimeError as chained:
            assert is_disk_full(chained)
    assert is_disk_full(Exception("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied")) and not is_disk_full(RuntimeError("pos"))
    with pytest.raises(UserError, match="^no space left on device while writing the thing$"):
        with writing("the thing"):
            torch.save({"x": torch.zeros(1000)}, FullFile())


@pytest.mark.parametrize("error, line", [
    user_errors.case(OSError(errno.ENOSPC, "No space left on device", "/data/out/events.out.tfevents"),
                     "error: no space left on device while writing /data/out/events.out.tfevents",
                     "disk full where no file is named (the command line's last resort)", tool="every command"),
    user_errors.case(PermissionError(errno.EACCES, "Permission denied", "/data/out/run.lock"),
                     "error: /data/out/run.lock: Permission denied (a read-only folder, or another user's?)",
                     "a read-only --output_dir (or any file the command may not write)", tool="every command"),
])
def test_run_cli_turns_an_os_error_the_user_can_fix_into_one_line(capsys, error, line):
    def main(argv):
        raise error

    with pytest.raises(SystemExit) as e:
        run_cli(main, [])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert user_errors.record(err.strip()) == line
