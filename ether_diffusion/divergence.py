"""Stop a diverged run before anything of the diverged step is written.

A learning rate far too high (LoRA at 1e4 is NaN from step 3, OFT at 6e-2 from step 19) turns the loss or the
gradient into inf/NaN; the optimizer then writes NaN into the adapter, and every later checkpoint, grid and the
final adapter are NaN while the trainer still reports success. So after every optimizer step each process
checks the step's loss, its gradient norm (before clipping) and the trained parameters, the processes agree,
and all of them stop with one line naming the step, the method and the learning rate (the usual cause). The
check comes before the step's log line, checkpoint and grid, so the last checkpoint and adapter stay good.

Under fp16 mixed precision an inf gradient is the loss scaler's business (it skips that step and lowers the
scale), so there only the loss and the parameters are checked.
"""
import math

import torch

from .checkpoints import list_checkpoints
from .errors import UserError


class TrainingDiverged(UserError):
    """The loss, the gradient or the trained parameters stopped being finite numbers."""


def check_step(accelerator, args, step: int, loss: float, grad_norm, parameters):
    """Raise `TrainingDiverged` on every process if, on any, `loss` (the step's, already averaged over the
    processes), `grad_norm` (None: not known) or one of `parameters` is not finite."""
    grad_finite = (torch.isfinite(grad_norm).all() if grad_norm is not None and accelerator.scaler is None
                   else torch.tensor(True))
    params_finite = torch.stack([torch.isfinite(p).all() for p in parameters]).all()
    flags = torch.stack([torch.tensor(math.isfinite(loss)), grad_finite.cpu(), params_finite.cpu()]).float()
    if accelerator.num_processes > 1:
        flags = accelerator.gather(flags.to(accelerator.device)).view(-1, 3).amin(0).cpu()
    loss_ok, grad_ok, params_ok = (bool(f) for f in flags)
    if loss_ok and grad_ok and params_ok:
        return
    if not loss_ok:
        what = f"the loss is {loss}"
    elif not grad_ok:
        what = "the gradient is not finite" + (f" (norm {grad_norm.item()})" if grad_norm is not None else "")
    else:
        what = "the update made the trained parameters inf/NaN"
    found = list_checkpoints(args.output_dir)
    kept = f"; {found[-1][1].name} is the last checkpoint" if found else ""
    raise TrainingDiverged(f"training diverged at step {step}: {what} (--method {args.method}, --learning_rate "
                           f"{args.learning_rate:g}); nothing of this step was written{kept}: lower --learning_rate")
