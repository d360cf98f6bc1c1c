"""Independent jobs spread over the processes of a launch: which share this process takes, and how it runs
that share as plain single-process work.

A launch is `accelerate launch --num_processes N`, `torchrun --nproc_per_node N` (on one node or several), one
task of a Slurm job array, or a plain `python`. The jobs (training runs, evaluations) do not talk to each other:
there is no gradient to sync between two subjects' runs. So each process takes every `count`-th job of one
fixed list, and runs it with the distributed environment removed, pinned to its own GPU, with its share of the
CPU cores. Nothing here creates a process group that outlives `agree_on_launch_id`, so no group ever spans
two jobs.

Shard numbering: under torchrun/accelerate the process's RANK of WORLD_SIZE; in a Slurm job array each task
(its index from SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_MIN and SLURM_ARRAY_TASK_STEP, out of
SLURM_ARRAY_TASK_COUNT) holds WORLD_SIZE shards of its own (1 without a launcher), so both compose.
"""
import datetime
import os
import uuid
from dataclasses import dataclass

import torch

from ether_diffusion.errors import UserError

# What makes accelerate or torch.distributed join a process group: removed before any job runs.
DISTRIBUTED_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                         "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
                         "NODE_RANK", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP")
DISTRIBUTED_PREFIXES = ("TORCHELASTIC_", "PMI_", "OMPI_COMM_WORLD_", "MV2_COMM_WORLD_")


@dataclass(frozen=True)
class Shard:
    index: int  # this process's shard
    count: int  # shards in all (every array task's processes)
    launch_first: int  # the shards of this launch (one array task, or the whole torchrun/accelerate launch)
    launch_count: int
    local_rank: int  # this process among those on its machine: its GPU
    local_count: int
    in_array: bool  # a task of a Slurm job array (other tasks may run at other times)

    @property
    def launch_shards(self) -> range:
        return range(self.launch_first, self.launch_first + self.launch_count)

    @property
    def reports(self) -> bool:
        """The first process of the launch: it waits for the others and speaks for the launch."""
        return self.index == self.launch_first

    def mine(self, items: list) -> list:
        return items[self.index::self.count]

    def name(self) -> str:
        return f"process {self.index + 1}/{self.count}"


def _int(environ, name: str, default: int) -> int:
    value = environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def shard_from_environment(environ=os.environ) -> Shard:
    rank, world = _int(environ, "RANK", 0), _int(environ, "WORLD_SIZE", 1)
    local_rank, local_count = _int(environ, "LOCAL_RANK", 0), _int(environ, "LOCAL_WORLD_SIZE", 1)
    tasks = _int(environ, "SLURM_ARRAY_TASK_COUNT", 1)
    task = 0
    if "SLURM_ARRAY_TASK_ID" in environ:
        step = max(_int(environ, "SLURM_ARRAY_TASK_STEP", 1), 1)
        task = (_int(environ, "SLURM_ARRAY_TASK_ID", 0) - _int(environ, "SLURM_ARRAY_TASK_MIN", 0)) // step
    if not 0 <= rank < world or not 0 <= task < tasks:
        raise UserError(f"process {rank} of {world} in array task {task} of {tasks}: the launcher's environment "
                        "does not add up (RANK/WORLD_SIZE, SLURM_ARRAY_TASK_*)")
    return Shard(index=task * world + rank, count=tasks * world, launch_first=task * world, launch_count=world,
                 local_rank=local_rank, local_count=local_count, in_array=tasks > 1)


def agree_on_launch_id(shard: Shard) -> str:
    """An id shared by every process of this launch and new for every launch, so a record can say in which
    launch it was written (a failure left by an earlier launch is not taken for this launch's result).

    Several processes agree through one short-lived gloo group (the launcher's rendezvous), destroyed again
    before any job runs. A single process makes up its own."""
    launch_id = [uuid.uuid4().hex]
    if shard.launch_count > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=30))
        dist.broadcast_object_list(launch_id, src=0)
        dist.destroy_process_group()
    return launch_id[0]


def run_as_single_process(shard: Shard, environ=os.environ) -> int:
    """Make this process (and every process it starts) a plain single process: no distributed variables, its
    own GPU only (CUDA_VISIBLE_DEVICES: the launcher's list, or the local rank), and `OMP_NUM_THREADS` of its
    share of the cores unless the user set one (torchrun sets 1). Call before anything touches CUDA. Returns
    the thread count."""
    for name in list(environ):
        if name in DISTRIBUTED_VARIABLES or name.startswith(DISTRIBUTED_PREFIXES):
            del environ[name]
    if shard.local_count > 1:
        visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        if visible:
            if len(visible) < shard.local_count:
                raise UserError(f"{shard.local_count} processes on this machine but CUDA_VISIBLE_DEVICES lists "
                                f"{len(visible)} devices: one process per GPU")
            environ["CUDA_VISIBLE_DEVICES"] = visible[shard.local_rank]
        else:  # the launcher's usual layout: process i on GPU i (harmless on a machine without GPUs)
            environ["CUDA_VISIBLE_DEVICES"] = str(shard.local_rank)
    if "OMP_NUM_THREADS" not in environ:
        environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // shard.local_count))
    threads = int(environ["OMP_NUM_THREADS"])
    torch.set_num_threads(threads)
    return threads
