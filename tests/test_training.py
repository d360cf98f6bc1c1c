"""The shared trainer machinery (ether_diffusion/training.py), in-process and model-free."""
import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from ether_diffusion import AdapterConfig, inject_adapters
from ether_diffusion.adapters import adapter_state_dict
from ether_diffusion.errors import UserError
from ether_diffusion import training


# ------------------------------------------------------------------------------------------ arguments + config
def make_parser():
    p = training.ArgumentParser()
    training.add_config_arg(p)
    training.add_model_args(p, output_dir="out")
    training.add_adapter_args(p)
    training.add_training_args(p, learning_rate=1e-4, learning_rate_help="lr")
    training.add_checkpoint_args(p)
    training.add_validation_args(p)
    training.add_logging_args(p)
    return p


def write_yaml(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_config_values_are_defaults_and_the_command_line_wins(tmp_path):
    cfg = write_yaml(tmp_path, "learning_rate: 6e-3\nmax_train_steps: 1400\nmethod: oft\ngradient_checkpointing: true\n"
                               "target_modules: [to_q, to_v]\nvalidation_prompt: [a, b]\nn_blocks: 4\n")
    args = training.parse_args(make_parser(), ["--config", cfg, "--n_blocks", "2"])
    # `6e-3` without a dot is a string to YAML: it is converted like a command-line value
    assert args.learning_rate == pytest.approx(6e-3) and isinstance(args.learning_rate, float)
    assert (args.max_train_steps, args.method, args.gradient_checkpointing) == (1400, "oft", True)
    assert args.target_modules == ["to_q", "to_v"] and args.validation_prompt == ["a", "b"]
    assert args.n_blocks == 2  # command line over file
    # a repeatable flag on the command line replaces the file's list, it does not extend it
    args = training.parse_args(make_parser(), ["--config", cfg, "--validation_prompt", "c"])
    assert args.validation_prompt == ["c"]
    # without a config: the parser's own defaults
    args = training.parse_args(make_parser(), ["--target_modules", "to_k, to_out.0"])
    assert args.target_modules == ["to_k", "to_out.0"] and args.learning_rate == 1e-4 and args.validation_prompt is None


@pytest.mark.parametrize("text, message", [
    ("lerning_rate: 1.0e-3\n", "unknown key 'lerning_rate' (did you mean 'learning_rate'?)"),
    ("method: dora\n", "method: invalid choice 'dora'"),
    ("max_train_steps: 1.5\n", "max_train_steps must be an integer"),
    ("learning_rate: fast\n", "learning_rate must be a number"),
    ("center_crop_typo: 1\n", "unknown key 'center_crop_typo'"),
    ("gradient_checkpointing: 3\n", "gradient_checkpointing must be true or false"),
    ("- a\n- b\n", "must hold a mapping"),
    ("a: [\n", "is not valid YAML"),
])
def test_bad_config_files_name_the_file_and_key(tmp_path, text, message):
    cfg = write_yaml(tmp_path, text)
    with pytest.raises(UserError) as e:
        training.parse_args(make_parser(), ["--config", cfg])
    assert message in str(e.value) and cfg in str(e.value) and "\n" not in str(e.value)


def test_parser_errors_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="invalid choice: 'dora'"):
        training.parse_args(make_parser(), ["--method", "dora"])
    with pytest.raises(UserError, match="config file not found"):
        training.parse_args(make_parser(), ["--config", str(tmp_path / "missing.yaml")])
    args = training.parse_args(make_parser(), ["--resolution", "36", "--pretrained_model_name_or_path", "m"])
    with pytest.raises(UserError, match="--resolution 36 is not a positive multiple of 8"):
        training.check_common_args(args)
    args = training.parse_args(make_parser(), [])
    with pytest.raises(UserError, match="--pretrained_model_name_or_path is required"):
        training.check_common_args(args)


# ------------------------------------------------------------------------------------------ optimizer, target
class TinyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(8, 8)
        self.to_v = nn.Linear(8, 4)


def test_no_weight_decay_on_ether_vectors():
    args = training.parse_args(make_parser(), ["--adam_weight_decay", "0.05"])
    for method, decay in (("ether", 0.0), ("ether+", 0.0), ("oft", 0.05), ("lora", 0.05)):
        model = TinyBlock()
        cfg = AdapterConfig(method=method, n_blocks=2 if method != "lora" else 1, target_modules=["to_q", "to_v"])
        inject_adapters(model, cfg)
        opt = training.make_optimizer(args, [training.adapter_param_group(model, cfg, args)])
        assert opt.param_groups[0]["weight_decay"] == decay, method
        assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in adapter_state_dict(model).values()}


def test_training_targets_epsilon_and_v_prediction():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert training.configure_prediction_type(sched) == "epsilon"
    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    assert torch.equal(training.diffusion_target(sched, latents, noise, t), noise)
    assert training.configure_prediction_type(sched, "v_prediction") == "v_prediction"
    a = sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(training.diffusion_target(sched, latents, noise, t), a * noise - s * latents)
    torch.manual_seed(0)
    noisy, timesteps, target = training.noisy_latents_and_target(sched, latents)
    assert timesteps.shape == (2,) and noisy.shape == latents.shape and target.shape == latents.shape


def test_evaluation_mode_restores_train_mode_and_never_casts():
    model = TinyBlock()
    inject_adapters(model, AdapterConfig(method="ether+", target_modules=["to_q"]))
    model.half()  # frozen base in fp16 ...
    for p in adapter_state_dict(model).values():
        p.data = p.data.float()  # ... adapter in fp32, as the trainer has them
    model.train()
    accelerator = SimpleNamespace(mixed_precision="bf16", device=torch.device("cpu"))
    with training.evaluation_mode(accelerator, model):
        assert not model.training and not torch.is_grad_enabled()
    assert model.training
    assert all(p.dtype == torch.float32 for p in adapter_state_dict(model).values())
    assert model.to_q.weight.dtype == torch.float16


# ------------------------------------------------------------------------------------------ data order, RNG
def test_sampler_order_is_a_function_of_seed_and_epoch_and_skips_exactly():
    s = training.ResumableSampler(7, seed=3)
    s.start_epoch(0)
    epoch0 = list(s)
    assert sorted(i for i, _ in epoch0) == list(range(7)) and len(s) == 7
    assert list(training.ResumableSampler(7, seed=3)) == epoch0  # same seed, same order
    s.start_epoch(1)
    assert list(s) != epoch0
    s.start_epoch(0, skip=3)
    assert list(s) == epoch0[3:] and len(s) == 4
    other = training.ResumableSampler(7, seed=4)
    assert list(other) != epoch0


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    torch.save(training.rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3), np.random.randn())
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    training.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(3), np.random.randn())
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2]) and got[3] == expected[3]


# ------------------------------------------------------------------------------------------ checkpoints
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
        training.save_checkpoint(acc, tmp_path, step, model, opt, sched, {"data_seed": 1}, total_limit=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-6"]
    assert sorted(p.name for p in (tmp_path / "checkpoint-6").iterdir()) == [
        "adapter.safetensors", "optimizer.pt", "rng-0.pt", "scheduler.pt", "state.json"]
    assert training.latest_checkpoint(tmp_path).name == "checkpoint-6"
    assert json.loads((tmp_path / "checkpoint-6" / "state.json").read_text()) == {"global_step": 6, "data_seed": 1}
    assert training.find_resume_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-6"
    assert training.find_resume_checkpoint(tmp_path, "checkpoint-4") == tmp_path / "checkpoint-4"
    assert training.find_resume_checkpoint(tmp_path / "empty", "latest") is None
    with pytest.raises(UserError, match="checkpoint not found: checkpoint-5"):
        training.find_resume_checkpoint(tmp_path, "checkpoint-5")


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_as_latest(tmp_path, monkeypatch):
    acc = FakeAccelerator()
    model, cfg, opt, sched = training_state()
    take_step(model, opt, sched)
    training.save_checkpoint(acc, tmp_path, 2, model, opt, sched, {}, total_limit=1)
    before = (tmp_path / "checkpoint-2" / "adapter.safetensors").read_bytes()
    take_step(model, opt, sched)
    real_save = torch.save

    def crash_on_optimizer(obj, path, *a, **k):
        if str(path).endswith("optimizer.pt"):
            raise KeyboardInterrupt("killed mid-save")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", crash_on_optimizer)
    with pytest.raises(KeyboardInterrupt):
        training.save_checkpoint(acc, tmp_path, 4, model, opt, sched, {}, total_limit=1)
    monkeypatch.setattr(torch, "save", real_save)
    # the half-written save is there but never counts, and pruning did not run
    assert (tmp_path / "checkpoint-4.tmp").is_dir() and not (tmp_path / "checkpoint-4").exists()
    assert training.latest_checkpoint(tmp_path).name == "checkpoint-2"
    assert (tmp_path / "checkpoint-2" / "adapter.safetensors").read_bytes() == before
    # the next complete save cleans up the leftover
    training.save_checkpoint(acc, tmp_path, 6, model, opt, sched, {}, total_limit=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-6"]


def test_load_checkpoint_restores_adapter_optimizer_scheduler_and_rng(tmp_path):
    acc = FakeAccelerator()
    model, cfg, opt, sched = training_state()
    take_step(model, opt, sched)
    torch.manual_seed(5)
    training.save_checkpoint(acc, tmp_path, 1, model, opt, sched, {"data_seed": 9})
    take_step(model, opt, sched)  # the uninterrupted run goes on
    expected = {k: v.detach().clone() for k, v in adapter_state_dict(model).items()}

    model2, cfg2, opt2, sched2 = training_state()
    state = training.load_checkpoint(acc, tmp_path / "checkpoint-1", model2, opt2, sched2, cfg2)
    assert state == {"global_step": 1, "data_seed": 9}
    assert sched2.last_epoch == 1 and opt2.state_dict()["state"][0]["step"] == 1
    take_step(model2, opt2, sched2)  # same RNG draws, same optimizer moments, same lr
    for k, v in adapter_state_dict(model2).items():
        assert torch.equal(v, expected[k]), k


def test_resuming_with_another_adapter_is_an_error(tmp_path):
    acc = FakeAccelerator()
    model, cfg, opt, sched = training_state("ether+")
    path = training.save_checkpoint(acc, tmp_path, 2, model, opt, sched, {})
    training.check_checkpoint_matches(path, cfg)
    with pytest.raises(UserError, match=r"trained with method='ether\+' but this run asks for method='oft'"):
        training.check_checkpoint_matches(path, AdapterConfig(method="oft", n_blocks=2, target_modules=["to_q", "to_v"]))
    with pytest.raises(UserError, match="trained with n_blocks=2 but this run asks for n_blocks=4"):
        training.check_checkpoint_matches(path, AdapterConfig(method="ether+", n_blocks=4, target_modules=["to_q", "to_v"]))


def test_train_log_drops_the_lines_after_the_resumed_step(tmp_path):
    path = tmp_path / "train_log.jsonl"
    log = training.TrainLog(path)
    for step in range(1, 6):
        log.write(step, {"loss": float(step)})
    log = training.TrainLog(path, resume_step=3)
    log.write(4, {"loss": 40.0})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(d["step"], d["loss"]) for d in lines] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    training.TrainLog(path)  # a new run starts a new log
    assert path.read_text() == ""


class IndexDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 5

    def __getitem__(self, key):
        index, seed = key
        return torch.tensor([index, seed % 1000])


def test_iterating_the_training_loader_leaves_the_global_rng_alone():
    # torch's DataLoader draws a worker base seed per iterator; from the global RNG that would shift the noise
    # of a resumed run (which creates its iterator after restoring the RNG) by one draw.
    loader, sampler = training.resumable_dataloader(IndexDataset(), seed=1, batch_size=2)
    before = torch.get_rng_state()
    batches = [b for _ in range(2) for b in loader]
    assert torch.equal(torch.get_rng_state(), before)
    assert len(batches) == 6 and sorted(int(i) for b in batches[:3] for i in b[:, 0]) == [0, 1, 2, 3, 4]
    sampler.start_epoch(0, skip=2)
    assert torch.equal(torch.cat(list(loader)), torch.cat(batches[:3])[2:])
