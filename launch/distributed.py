"""The distributed environment of one process: from torchrun, from Slurm (through submitit), or a single process.

`setup()` sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT (the `env://`
variables DeepSpeed and torch.distributed read); the stage job callable (launch.executors.StageRun) calls it
in every rank of a multi-task job, before the trainer starts DeepSpeed. Under Slurm a training stage on
N nodes x G GPUs is one job of N*G tasks, one rank per task: submitit's SlurmJobEnvironment gives the
ranks and the node list (master: the job's first node), and the port is seeded by the job id, as in
submitit's TorchDistributedEnvironment. Under torchrun the variables are already there and are kept.

`on_preempt(fn)` registers a callback run when the job is signalled before its time limit, just before it
requeues itself. submitit runs it on rank 0 only, so it must not be a collective operation (a multi-rank
DeepSpeed save would hang). The trainer does not use it: every rank catches the signal itself, and the
ranks save together at the next optimizer step before the signal reaches submitit
(pipeline/train/checkpoint.py).
"""
from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable
from dataclasses import dataclass

VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # torchrun | slurm | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def as_env(self) -> dict[str, str]:
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank),
                "LOCAL_WORLD_SIZE": str(self.local_world_size), "MASTER_ADDR": self.master_addr,
                "MASTER_PORT": str(self.master_port)}


def _slurm() -> DistEnv:
    """A task of an `srun` step: submitit's reading of the Slurm variables (node list, ranks), and its
    port rule (MASTER_PORT if set, else a port seeded by the job id, the same in every task)."""
    from submitit.slurm.slurm import SlurmJobEnvironment
    job = SlurmJobEnvironment()
    port = os.environ.get("MASTER_PORT") or random.Random(job.job_id).randint(20000, 60000)
    return DistEnv(job.global_rank, job.num_tasks, job.local_rank, job.num_tasks // job.num_nodes,
                   job.hostnames[0], int(port), "slurm")


def detect() -> DistEnv:
    """This process's place in the job, read from the environment; changes nothing."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (or a launcher that already exported them)
        world = int(env["WORLD_SIZE"])
        return DistEnv(int(env["RANK"]), world, int(env.get("LOCAL_RANK", 0)),
                       int(env.get("LOCAL_WORLD_SIZE", world)), env.get("MASTER_ADDR", "127.0.0.1"),
                       int(env.get("MASTER_PORT", 29500)), "torchrun")
    # SLURM_STEP_ID: set in the tasks of an srun step, not in the batch script itself (whose SLURM_NTASKS
    # counts the tasks of the allocation, not the processes running)
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        return _slurm()
    port = env.get("MASTER_PORT") or random.Random(os.getpid()).randint(20000, 60000)
    return DistEnv(0, 1, 0, 1, "127.0.0.1", int(port), "single")


def job_environ() -> dict[str, str]:
    """This process's environment without its own place in a world (VARS): what a job it submits or starts
    inherits. A job's ranks come from its launcher (Slurm, torchrun); inherited, a submitting process's
    RANK=0 / WORLD_SIZE=1 (which any in-process trainer sets) would make every task of a multi-task job
    think it is a single rank 0, each training alone and writing the same checkpoints."""
    return {k: v for k, v in os.environ.items() if k not in VARS}


@contextlib.contextmanager
def without_rank_env(keep: tuple[str, ...] = ()):
    """`os.environ` without VARS (less `keep`) for the duration (sbatch, called by submitit, copies os.environ).
    The Slurm executor keeps MASTER_PORT: one set in the submitting shell is the user's choice (a port an
    in-process trainer picked itself is never left in the environment), and `_slurm()` honours it."""
    saved = {k: os.environ.pop(k) for k in VARS if k in os.environ and k not in keep}
    try:
        yield
    finally:
        os.environ.update(saved)


def setup() -> DistEnv:
    """Detect the environment and export RANK ... MASTER_PORT into os.environ; idempotent.

    Every rank sees all of its node's GPUs (as under torchrun) and picks `cuda:LOCAL_RANK`."""
    dist = detect()
    os.environ.update(dist.as_env())
    return dist


# ------------------------------------------------------------------------------------ preemption
_preempt_hooks: list[Callable[[], None]] = []


def on_preempt(fn: Callable[[], None]) -> Callable[[], None]:
    """Register `fn` to run (on rank 0, not collective) when the job is about to be requeued."""
    _preempt_hooks.append(fn)
    return fn


def run_preempt_hooks():
    for fn in _preempt_hooks:
        fn()
