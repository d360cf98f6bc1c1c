"""The order the trainers read their data in: a function of (seed, epoch) alone, so a resumed run reads on from
exactly where it stopped, on any number of processes."""
import math
import random

import torch
from accelerate.utils import broadcast_object_list


class ResumableSampler(torch.utils.data.Sampler):
    """A shuffled order that is a function of (seed, epoch) only, with a per-sample augmentation seed.

    Yields `(index, sample_seed)`: datasets take that key and draw their random crops from
    `torch.Generator().manual_seed(sample_seed)`, never from the global RNG, so neither skipping batches on
    resume nor data-loader workers change what a sample looks like. `start_epoch(epoch, skip)` drops the
    first `skip` samples of the epoch without loading them. (Not named `set_epoch`: accelerate's prepared
    loaders call `sampler.set_epoch(<their own iteration count>)`, which would undo both on resume.)

    With `pad_to` (batch size x processes, for several processes) an epoch is the order followed by its own
    first samples again, up to a multiple of `pad_to`: every process then gets whole batches, the same number
    of them. accelerate would otherwise even out the split itself by wrapping around to the start of what it
    is given, which on resume is the rest of the epoch, not its start: 3 images on 2 processes resumed 1e-3 off.
    """

    def __init__(self, num_samples: int, seed: int, pad_to: int = 1):
        self.num_samples = num_samples
        self.seed = seed
        self.pad_to = pad_to
        self.epoch = 0
        self.skip = 0

    def start_epoch(self, epoch: int, skip: int = 0):
        self.epoch, self.skip = epoch, skip

    def epoch_length(self) -> int:
        return math.ceil(self.num_samples / self.pad_to) * self.pad_to

    def _order(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g).tolist()
        sample_seeds = torch.randint(0, 2**62, (self.num_samples,), generator=g).tolist()
        keys = list(zip(order, sample_seeds))
        return (keys * math.ceil(self.epoch_length() / self.num_samples))[: self.epoch_length()]

    def __iter__(self):
        return iter(self._order()[self.skip:])

    def __len__(self):
        return max(self.epoch_length() - self.skip, 0)


def resumable_dataloader(dataset, seed: int, batch_size: int, num_workers: int = 0, collate_fn=None,
                         num_processes: int = 1):
    """A DataLoader over a `ResumableSampler` (padded for `num_processes` > 1); returns (dataloader, sampler).

    The loader gets its own generator: torch draws a base seed for workers from it each time an iterator is
    created (once per epoch), which would otherwise come from the global RNG, and a resumed run, which
    creates its iterator after restoring the RNG, would then draw its noise one step out of line.
    """
    sampler = ResumableSampler(len(dataset), seed, pad_to=batch_size * num_processes if num_processes > 1 else 1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                         collate_fn=collate_fn, generator=torch.Generator().manual_seed(seed))
    return loader, sampler


def shared_seed(accelerator, seed) -> int:
    """`seed`, or one random seed agreed by all processes (the data order must be the same everywhere)."""
    if seed is not None:
        return int(seed)
    value = [random.SystemRandom().randrange(2**31)]
    if accelerator.num_processes > 1:
        broadcast_object_list(value)
    return value[0]
