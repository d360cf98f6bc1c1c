"""Adapter-only checkpoints and RNG state (ether_diffusion/checkpoints.py), in-process and model-free."""
import json
import random
import re

import numpy as np
import pytest
import torch

from ether_diffusion import AdapterConfig, checkpoints, inject_adapters
from ether_diffusion.adapters import adapter_state_dict
from ether_diffusion.errors import UserError
from trainer_helpers import TinyBlock


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    torch.save(checkpoints.rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3), np.random.randn())
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    checkpoints.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(3), np.random.randn())
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2]) and got[3] == expected[3]


class FakeAccelerator:
    """The parts of `accelerate.Accelerator` the checkpoint code uses, for one process."""
    is_main_process = True
    process_index = 0
    num_processes = 1
    scaler = None

    def wait_for_everyone(self):
        pass

    def unwrap_model(self, model):
        return model


def training_state(method="ether+"):
    torch.manual_seed(0)  # the same base weights every time
    model = TinyBlock()
    cfg = AdapterConfig(method=method, n_blocks=2, target_modules=["to_q", "to_v"])
    inject_adapters(model, cfg)
    params = list(adapter_state_dict(model).values())
    opt = torch.optim.AdamW(params, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    return model, cfg, opt, sched


def take_step(model, opt, sched):
    loss = model.to_q(torch.randn(3, 8)).pow(2).sum() + model.to_v(torch.randn(3, 8)).pow(2).sum()
    loss.backward()
    opt.step(), sched.step(), opt.zero_grad()


@pytest.mark.user_error("--resume_from_checkpoint naming a checkpoint that does not exist",
                        tool="train_dreambooth.py, train_controlnet_s2i.py")
def test_checkpoints_are_pruned_and_latest_is_the_newest_complete_one(tmp_path):
    acc = FakeAccelerator()
    model, cfg, opt, sched = training_state()
    for step in (2, 4, 6):
        take_step(model, opt, sched)
        checkpoints.save_checkpoint(acc, tmp_path, step, model, opt, sched, {"data_seed": 1}, total_limit=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-6"]
    assert sorted(p.name for p in (tmp_path / "checkpoint-6").iterdir()) == [
        "adapter.safetensors", "optimizer.pt", "rng-0.pt", "scheduler.pt", "state.json"]
    state = json.loads((tmp_path / "checkpoint-6" / "state.json").read_text())
    assert {k: v for k, v in state.items() if k != "files"} == {"global_step": 6, "data_seed": 1}
    # every file with its size and checksum, for checkpoint_problem to compare
    assert sorted(state["files"]) == ["adapter.safetensors", "optimizer.pt", "rng-0.pt", "scheduler.pt"]
    assert state["files"]["optimizer.pt"]["bytes"] == (tmp_path / "checkpoint-6" / "optimizer.pt").stat().st_size
    assert checkpoints.find_resume_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-6"
    assert checkpoints.find_resume_checkpoint(tmp_path, "checkpoint-4") == tmp_path / "checkpoint-4"
    assert checkpoints.find_resume_checkpoint(tmp_path / "empty", "latest") is None
    with pytest.raises(UserError, match="checkpoint not found: checkpoint-5"):
        checkpoints.find_resume_checkpoint(tmp_path, "checkpoint-5")


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_as_latest(tmp_path, monkeypatch):
    acc = FakeAccelerator()
    model, cfg, opt, sched = training_state()
    take_step(model, opt, sched)
    checkpoints.save_checkpoint(acc, tmp_path, 2, model, opt, sched, {}, total_limit=1)
    before = (tmp_path / "checkpoint-2" / "adapter.safetensors").read_bytes()
    take_step(model, opt, sched)
    real_save = torch.save

    def crash_on_optimizer(obj, f, *a, **k):
        if str(getattr(f, "name", f)).endswith("optimizer.pt"):
            raise KeyboardInterrupt("killed mid-save")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", crash_on_optimizer)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(acc, tmp_path, 4, model, opt, sched, {}, total_limit=1)
    monkeypatch.setattr(torch, "save", real_save)
    # the half-written save is there but never counts, and pruning did not run
    assert (tmp_path / "checkpoint-4.tmp").is_dir() and not (tmp_path / "checkpoint-4").exists()
    assert checkpoints.find_resume_checkpoint(tmp_path, "latest").name == "checkpoint-2"
    assert (tmp_path / "checkpoint-2" / "adapter.safetensors").read_bytes() == before
    # the next complete save cleans up the leftover
    checkpoints.save_checkpoint(acc, tmp_path, 6, model, opt, sched, {}, total_limit=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-6"]


def test_load_checkpoint_restores_adapter_optimizer_scheduler_and_rng(tmp_path):
    acc = FakeAccelerator()
    model, cfg, opt, sched = training_state()
    take_step(model, opt, sched)
    torch.manual_seed(5)
    checkpoints.save_checkpoint(acc, tmp_path, 1, model, opt, sched, {"data_seed": 9})
    take_step(model, opt, sched)  # the uninterrupted run goes on
    expected = {k: v.detach().clone() for k, v in adapter_state_dict(model).items()}

    model2, cfg2, opt2, sched2 = training_state()
    state = checkpoints.load_checkpoint(acc, tmp_path / "checkpoint-1", model2, opt2, sched2, cfg2)
    assert state["global_step"] == 1 and state["data_seed"] == 9
    assert sched2.last_epoch == 1 and opt2.state_dict()["state"][0]["step"] == 1
    take_step(model2, opt2, sched2)  # same RNG draws, same optimizer moments, same lr
    for k, v in adapter_state_dict(model2).items():
        assert torch.equal(v, expected[k]), k


def test_resuming_with_another_adapter_is_an_error(tmp_path):
    acc = FakeAccelerator()
    model, cfg, opt, sched = training_state("ether+")
    path = checkpoints.save_checkpoint(acc, tmp_path, 2, model, opt, sched, {})
    checkpoints.check_checkpoint_matches(path, cfg)
    with pytest.raises(UserError, match=r"trained with method='ether\+' but this run asks for method='oft'"):
        checkpoints.check_checkpoint_matches(path, AdapterConfig(method="oft", n_blocks=2, target_modules=["to_q", "to_v"]))
    with pytest.raises(UserError, match="trained with n_blocks=2 but this run asks for n_blocks=4"):
        checkpoints.check_checkpoint_matches(path, AdapterConfig(method="ether+", n_blocks=4, target_modules=["to_q", "to_v"]))


# ------------------------------------------------------------------------------------------ damaged checkpoints
def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the last tensor's last byte: same size, other contents (what a disk may do after a power cut)
    path.write_bytes(bytes(data))


DAMAGE = [  # (file, what is done to it, the problem named)
    ("state.json", truncate, "state.json is damaged (JSONDecodeError)"),
    ("state.json", lambda p: p.unlink(), "state.json is missing"),
    ("optimizer.pt", truncate, "optimizer.pt is truncated ("),
    ("scheduler.pt", truncate, "scheduler.pt is truncated ("),
    ("rng-0.pt", truncate, "rng-0.pt is truncated ("),
    ("rng-0.pt", lambda p: p.unlink(), "rng-0.pt is missing"),
    ("adapter.safetensors", flip_a_byte, "adapter.safetensors is damaged (its contents changed after it was saved)"),
    ("adapter.safetensors", lambda p: p.write_bytes(p.read_bytes() + b"\0"), "adapter.safetensors is longer than saved"),
]


@pytest.mark.parametrize("name, damage, problem", DAMAGE, ids=[f"{n}-{p.split()[-1]}" for n, _, p in DAMAGE])
def test_a_damaged_checkpoint_is_named_and_latest_falls_back(tmp_path, caplog, name, damage, problem):
    acc = FakeAccelerator()
    model, cfg, opt, sched = training_state()
    for step in (2, 4):
        take_step(model, opt, sched)
        checkpoints.save_checkpoint(acc, tmp_path, step, model, opt, sched, {"data_seed": 1})
    assert checkpoints.checkpoint_problem(tmp_path / "checkpoint-4") is None
    damage(tmp_path / "checkpoint-4" / name)
    assert checkpoints.checkpoint_problem(tmp_path / "checkpoint-4").startswith(problem)
    with caplog.at_level("WARNING"):
        assert checkpoints.find_resume_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-2"
    assert f"checkpoint-4 is damaged: {problem}" in caplog.text and "resuming from checkpoint-2 instead" in caplog.text
    with pytest.raises(UserError, match=f"checkpoint {tmp_path / 'checkpoint-4'} is damaged: {re.escape(problem)}"):
        checkpoints.find_resume_checkpoint(tmp_path, "checkpoint-4")  # asked for by name: no silent fallback
    damage(tmp_path / "checkpoint-2" / name)
    with pytest.raises(UserError, match=f"^no usable checkpoint in {tmp_path}: checkpoint-4 is damaged: "):
        checkpoints.find_resume_checkpoint(tmp_path, "latest")


def test_a_file_that_passes_its_checksum_but_does_not_load_is_still_named(tmp_path):
    # a checkpoint written by another torch version, say: load_checkpoint names the file, never a traceback
    acc = FakeAccelerator()
    model, cfg, opt, sched = training_state()
    take_step(model, opt, sched)
    path = checkpoints.save_checkpoint(acc, tmp_path, 1, model, opt, sched, {"data_seed": 1})
    (path / "scheduler.pt").write_bytes(b"not a torch file")
    model2, cfg2, opt2, sched2 = training_state()
    with pytest.raises(UserError, match=f"^{path / 'scheduler.pt'} is damaged \\("):
        checkpoints.load_checkpoint(acc, path, model2, opt2, sched2, cfg2)


def test_a_checkpoint_is_refused_when_the_processes_disagree(tmp_path, monkeypatch):
    # DDP keeps every process's copy equal; a second process whose copy drifted (simulated) is a bug to stop on
    acc = FakeAccelerator()
    model, cfg, opt, sched = training_state()
    monkeypatch.setattr(checkpoints.processes, "everywhere", lambda state, work: [work(), (0.0, 0.0)])
    with pytest.raises(RuntimeError, match="the processes' trained parameters differ at step 2"):
        checkpoints.save_checkpoint(acc, tmp_path, 2, model, opt, sched, {})
    assert list(tmp_path.iterdir()) == []  # nothing half-saved left
