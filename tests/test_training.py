"""The shared trainer machinery (ether_diffusion/training.py), in-process and model-free."""
import json
from types import SimpleNamespace

import torch

from ether_diffusion import AdapterConfig, arguments, data_order, inject_adapters, training
from ether_diffusion.adapters import adapter_state_dict
from trainer_helpers import TinyBlock, make_parser


# ------------------------------------------------------------------------------------------ optimizer, target
def test_no_weight_decay_on_ether_vectors():
    args = arguments.parse_args(make_parser(), ["--adam_weight_decay", "0.05", "--learning_rate", "1e-3"])
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


# ------------------------------------------------------------------------------------------ data order, logs
def test_sampler_order_is_a_function_of_seed_and_epoch_and_skips_exactly():
    s = data_order.ResumableSampler(7, seed=3)
    s.start_epoch(0)
    epoch0 = list(s)
    assert sorted(i for i, _ in epoch0) == list(range(7)) and len(s) == 7
    assert list(data_order.ResumableSampler(7, seed=3)) == epoch0  # same seed, same order
    s.start_epoch(1)
    assert list(s) != epoch0
    s.start_epoch(0, skip=3)
    assert list(s) == epoch0[3:] and len(s) == 4
    other = data_order.ResumableSampler(7, seed=4)
    assert list(other) != epoch0


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
    loader, sampler = data_order.resumable_dataloader(IndexDataset(), seed=1, batch_size=2)
    before = torch.get_rng_state()
    batches = [b for _ in range(2) for b in loader]
    assert torch.equal(torch.get_rng_state(), before)
    assert len(batches) == 6 and sorted(int(i) for b in batches[:3] for i in b[:, 0]) == [0, 1, 2, 3, 4]
    sampler.start_epoch(0, skip=2)
    assert torch.equal(torch.cat(list(loader)), torch.cat(batches[:3])[2:])
