"""Adapter-only checkpoints and RNG state (ether_diffusion/checkpoints.py), in-process and model-free."""
import json
import random

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


def test_checkpoints_are_pruned_and_latest_is_the_newest_complete_one(tmp_path):
    acc = FakeAccelerator()
    model, cfg, opt, sched = training_state()
    for step in (2, 4, 6):
        take_step(model, opt, sched)
        checkpoints.save_checkpoint(acc, tmp_path, step, model, opt, sched, {"data_seed": 1}, total_limit=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-6"]
    assert sorted(p.name for p in (tmp_path / "checkpoint-6").iterdir()) == [
        "adapter.safetensors", "optimizer.pt", "rng-0.pt", "scheduler.pt", "state.json"]
    assert checkpoints.latest_checkpoint(tmp_path).name == "checkpoint-6"
    assert json.loads((tmp_path / "checkpoint-6" / "state.json").read_text()) == {"global_step": 6, "data_seed": 1}
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

    def crash_on_optimizer(obj, path, *a, **k):
        if str(path).endswith("optimizer.pt"):
            raise KeyboardInterrupt("killed mid-save")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", crash_on_optimizer)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(acc, tmp_path, 4, model, opt, sched, {}, total_limit=1)
    monkeypatch.setattr(torch, "save", real_save)
    # the half-written save is there but never counts, and pruning did not run
    assert (tmp_path / "checkpoint-4.tmp").is_dir() and not (tmp_path / "checkpoint-4").exists()
    assert checkpoints.latest_checkpoint(tmp_path).name == "checkpoint-2"
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
    assert state == {"global_step": 1, "data_seed": 9}
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
