"""The seeded, resumable training loop every toy pretraining stage shares (the SD's VAE and UNet in
`pretrain`, the judge and the segmenter in `judge`): each step's randomness is a function of (seed, stage,
step) alone, and a checkpoint is replaced atomically, so a stopped stage resumes exactly."""
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm


def step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    """The random stream of one step: a function of (seed, stage, step) alone, so resuming is exact."""
    return torch.Generator().manual_seed(mix(seed, stage, step))


def mix(seed: int, stage: str, step: int) -> int:
    # Python's hash() of a str changes between processes; this does not.
    value = seed * 1_000_003 + step
    for ch in stage:
        value = (value * 31 + ord(ch)) % 2**61
    return value


def pictures(examples) -> torch.Tensor:
    """Examples -> (N, 3, H, W) float tensor in [-1, 1]."""
    array = np.stack([np.asarray(e.image) for e in examples])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1


class Checkpoint:
    """`OUTPUT_DIR/checkpoints/<stage>/`: the modules' and optimizer's state and the step, replaced atomically
    (a folder written beside it, then renamed), so a kill at any moment leaves the previous one whole."""

    def __init__(self, output_dir, stage: str):
        self.folder = Path(output_dir, "checkpoints", stage)

    def save(self, step: int, modules: dict, optimizer, extra: dict | None = None):
        tmp = self.folder.with_name(self.folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save({name: m.state_dict() for name, m in modules.items()}, tmp / "modules.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **(extra or {})}))
        old = self.folder.with_name(self.folder.name + ".old")
        if self.folder.exists():
            os.replace(self.folder, old)
        os.replace(tmp, self.folder)
        shutil.rmtree(old, ignore_errors=True)

    def load(self, modules: dict, optimizer) -> dict:
        """Restore into `modules` and `optimizer`; returns the saved state ({} when there is no checkpoint)."""
        if not (self.folder / "state.json").is_file():
            return {}
        states = torch.load(self.folder / "modules.pt", map_location="cpu", weights_only=True)
        for name, m in modules.items():
            m.load_state_dict(states[name])
        optimizer.load_state_dict(torch.load(self.folder / "optimizer.pt", map_location="cpu", weights_only=True))
        return json.loads((self.folder / "state.json").read_text())

    def remove(self):
        shutil.rmtree(self.folder, ignore_errors=True)


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10%: the multiplier of the base learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_steps(stage: str, output_dir, total: int, every: int, modules: dict, optimizer, step_fn, lr: float,
                warmup: int, log, extra_state=None, after_step=None):
    """The loop every stage shares: resume, then `step_fn(step) -> {name: float}` per step (it computes and
    backpropagates its loss), clip, step, `after_step(step)` (an EMA update), the learning-rate schedule, a
    progress bar, a checkpoint every `every` steps. `extra_state`: more modules to checkpoint (the EMA)."""
    checkpoint = Checkpoint(output_dir, stage)
    saved = {**modules, **(extra_state or {})}
    state = checkpoint.load(saved, optimizer)
    start = state.get("step", 0)
    if start:
        print(f"{stage}: resumed from {checkpoint.folder} at step {start}")
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    bar = tqdm(range(start, total), initial=start, total=total, desc=stage)
    started = time.time()
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr * cosine_lr(step, total, warmup)
        values = step_fn(step)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(step)
        bar.set_postfix({k: f"{v:.4f}" for k, v in values.items()})
        if (step + 1) % 50 == 0 or step + 1 == total:
            log({"stage": stage, "step": step + 1, "seconds": round(time.time() - started, 1),
                 "cpu_seconds": round(time.process_time(), 1), **values})
        if (step + 1) % every == 0 and step + 1 < total:
            checkpoint.save(step + 1, saved, optimizer)
    bar.close()
    return checkpoint
