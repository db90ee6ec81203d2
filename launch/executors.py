"""Executors behind one interface: `debug` (in this process), `local` (a subprocess; torchrun for several
local GPUs) and `slurm` (submitit's AutoExecutor). All of them take `after=[job ids]` (run only once those
succeeded; under Slurm an `afterok` dependency) and report the same four states.

    ex = make_executor(cfg.cluster, folder)
    job = ex.submit(StageRun(), "poison", overrides, shape=shape_for("poison", cfg.cluster))
    jobs = ex.map_array(StageRun(), stages, overrides_lists, forces, shape=..., after=[job.job_id])
    job.state  # pending | running | done | failed (| unknown)
    job.result()  # waits; raises JobError with the job's traceback

A stage job is one `StageRun` (submitit `Checkpointable`): on the Slurm signal before the time limit (USR2,
`signal_delay_s` ahead) it runs the registered preempt hooks (launch.distributed.on_preempt) and requeues
itself; the stage resumes because its outputs and checkpoints live at deterministic paths. A training
stage holds the signal (and preemption's SIGTERM) back in every rank until the ranks have saved a
checkpoint together at an optimizer-step boundary (pipeline/train/checkpoint.py), then lets it through.
"""
from __future__ import annotations

import itertools
import os
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from submitit.core.utils import (
    DelayedSubmission,
    JobPaths,
    cloudpickle_dump,
    pickle_load,
)
from submitit.helpers import Checkpointable

from . import distributed

TERMINAL = ("done", "failed")


class JobError(Exception):
    """A job that failed, was cancelled, or never ran because a dependency failed."""


@dataclass(frozen=True)
class Shape:
    """The resources of one job. A training stage on N nodes x G GPUs: nodes=N, tasks_per_node=G."""
    name: str = "stage"
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: int | None = None
    timeout_min: int = 60


TRAINING_STAGES = ("inject", "defend")


def shape_for(stage: str, cluster) -> Shape:
    """The job shape of `stage` on `cluster` (a ClusterCfg): training stages get every node and GPU of the
    profile, one task per GPU; evaluate one GPU; poison and report none. `cluster.stages[stage]` overrides."""
    gpus = cluster.gpus_per_node
    if stage in TRAINING_STAGES:
        s = Shape(stage, cluster.nodes, max(1, gpus), gpus, cluster.cpus_per_task, cluster.mem_gb, cluster.timeout_min)
    else:
        s = Shape(stage, 1, 1, min(1, gpus) if stage == "evaluate" else 0, cluster.cpus_per_task,
                  cluster.mem_gb, cluster.timeout_min)
    extra = dict((cluster.stages or {}).get(stage) or {})
    known = {f.name for f in fields(Shape)}
    if set(extra) - known:
        raise ValueError(f"cluster.stages.{stage}: unknown fields {sorted(set(extra) - known)} (known: {sorted(known)})")
    if "gpus_per_node" in extra and "tasks_per_node" not in extra and stage in TRAINING_STAGES:
        extra["tasks_per_node"] = max(1, extra["gpus_per_node"])
    return replace(s, **extra)


class StageRun(Checkpointable):
    """The callable of a stage job: `runner(stage, overrides, force)`, by default pipeline.cli.run_stage."""

    def __init__(self, runner: Callable | None = None):
        self.runner = runner

    def __call__(self, stage: str, overrides: Sequence[str], force: bool = False):
        if distributed.detect().world_size > 1:  # one rank of a multi-task Slurm job (or of torchrun)
            distributed.setup()
        runner = self.runner
        if runner is None:
            from pipeline.cli import run_stage as runner
        out = runner(stage, list(overrides), force)
        return None if out is None else str(out)

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        distributed.run_preempt_hooks()  # rank 0 only; a training stage has saved its checkpoint already
        return super().checkpoint(*args, **kwargs)  # requeue: the same callable with the same arguments


# ------------------------------------------------------------------------------------------- jobs
class Job:
    """A handle on one submitted job (also rebuilt from a job id recorded by an earlier process)."""

    def __init__(self, executor: Executor, job_id: str, log: Path | None = None):
        self.executor, self.job_id, self.log = executor, job_id, log

    @property
    def state(self) -> str:
        return self.executor.states([self.job_id])[self.job_id]

    def done(self) -> bool:
        return self.state in TERMINAL

    def wait(self, timeout_s: float | None = None, poll_s: float = 0.5, unknown_s: float = 60) -> str:
        """Until the job is done or failed (or unknown to the scheduler for `unknown_s`); its last state."""
        start = time.time()
        unknown_since = None
        while (state := self.state) not in TERMINAL:
            now = time.time()
            unknown_since = (unknown_since or now) if state == "unknown" else None
            if unknown_since is not None and now - unknown_since > unknown_s:
                return state
            if timeout_s is not None and now - start > timeout_s:
                raise TimeoutError(f"job {self.job_id} still {state} after {timeout_s} s")
            time.sleep(poll_s)
        return state

    def result(self, timeout_s: float | None = None):
        state = self.wait(timeout_s)
        outcome = self.executor.outcome(self.job_id)
        if outcome is None:
            raise JobError(f"job {self.job_id} {state} without a result ({self.executor.describe(self.job_id)})")
        kind, value = outcome
        if kind != "success":
            raise JobError(f"job {self.job_id} failed (log: {self.log}):\n{value}")
        return value

    def __repr__(self):
        return f"{type(self).__name__}({self.job_id!r})"


# -------------------------------------------------------------------------------------- executors
class Executor:
    """Submits callables as jobs. `after`: ids of jobs that must succeed first."""
    kind = ""

    def __init__(self, folder, cluster=None):
        self.folder = Path(folder).absolute()  # job files and logs (created at the first submission)
        self.cluster = cluster

    @property
    def array_parallelism(self) -> int:
        return getattr(self.cluster, "array_parallelism", 16) or 16

    def submit(self, fn: Callable, *args, shape: Shape = Shape(), after: Iterable[str] = ()) -> Job:
        return self._submit([(fn, args)], shape, list(after))[0]

    def map_array(self, fn: Callable, *iterables, shape: Shape = Shape(), after: Iterable[str] = ()) -> list[Job]:
        """One job per element (an array job under Slurm), at most `cluster.array_parallelism` at once."""
        calls = [(fn, args) for args in zip(*iterables)]
        return self._submit(calls, shape, list(after)) if calls else []

    def job(self, job_id: str) -> Job:
        return Job(self, job_id, self.log_path(job_id))

    # what an executor implements
    def _submit(self, calls: list[tuple[Callable, tuple]], shape: Shape, after: list[str]) -> list[Job]:
        raise NotImplementedError

    def states(self, job_ids: Sequence[str]) -> dict[str, str]:
        raise NotImplementedError

    def outcome(self, job_id: str):
        """("success", value) or ("error", traceback) once finished, None when there is none."""
        raise NotImplementedError

    def log_path(self, job_id: str) -> Path | None:
        return None

    def describe(self, job_id: str) -> str:
        return self.states([job_id])[job_id]


class DebugExecutor(Executor):
    """Runs each job in this process at submission; a job whose dependency failed never runs."""
    kind = "debug"

    def __init__(self, folder, cluster=None):
        super().__init__(folder, cluster)
        self._outcomes: dict[str, tuple[str, Any]] = {}
        self._ids = itertools.count()

    def _submit(self, calls, shape, after):
        jobs = []
        for fn, args in calls:
            job_id = f"debug-{os.getpid()}-{next(self._ids)}"
            bad = [d for d in after if self.states([d])[d] != "done"]
            if bad:
                self._outcomes[job_id] = ("cancelled", f"dependency {', '.join(bad)} did not succeed")
            else:
                try:
                    self._outcomes[job_id] = ("success", fn(*args))
                except Exception:  # noqa: BLE001 - the job fails, the sweep goes on (as under Slurm)
                    self._outcomes[job_id] = ("error", traceback.format_exc())
            jobs.append(Job(self, job_id))
        return jobs

    def states(self, job_ids):
        return {j: ("unknown" if j not in self._outcomes else "done" if self._outcomes[j][0] == "success"
                    else "failed") for j in job_ids}

    def outcome(self, job_id):
        out = self._outcomes.get(job_id)
        return None if out is None or out[0] == "cancelled" else out

    def describe(self, job_id):
        out = self._outcomes.get(job_id)
        return out[1] if out and out[0] == "cancelled" else self.states([job_id])[job_id]


class LocalExecutor(Executor):
    """Each job is a subprocess on this machine (`torchrun --standalone` when it has several tasks).
    Files per job under the folder: <id>.pkl (the call), <id>.queued (the pid of the process whose queue
    holds it), <id>.log, <id>.pid, <id>.result.pkl.

    Submission never blocks: a job waits in this executor's queue (state `pending`) until each job it
    depends on is done and fewer than `cluster.array_parallelism` of this executor's jobs are running,
    then starts; a job whose dependency failed is cancelled. Of the jobs ready at once, the deepest in the
    dependency chain starts first (then submission order): a sweep evaluates each defended model as soon
    as it exists rather than after every defense. The queue moves whenever a state is asked
    for (`Job.wait` asks every half second), so the submitting process must stay alive while jobs are
    queued, as `sweep` does for the local executor."""
    kind = "local"

    def __init__(self, folder, cluster=None):
        super().__init__(folder, cluster)
        self._procs: dict[str, subprocess.Popen] = {}
        self._queue: list[tuple[str, list[str], list[str]]] = []  # (job id, command, after), in order
        self._depth: dict[str, int] = {}  # job id -> 1 + the depth of its deepest dependency
        self._ids = itertools.count()

    def _paths(self, job_id):
        return {k: self.folder / f"{job_id}.{k}" for k in ("pkl", "log", "pid", "result.pkl", "queued")}

    def log_path(self, job_id):
        return self._paths(job_id)["log"]

    def command(self, pkl: Path, shape: Shape) -> list[str]:
        if shape.nodes != 1:
            raise ValueError(f"the local executor runs on one node, not {shape.nodes}: use the slurm executor")
        if shape.tasks_per_node > 1:
            return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={shape.tasks_per_node}", "-m", "launch.executors", str(pkl)]
        return [sys.executable, "-m", "launch.executors", str(pkl)]

    def _submit(self, calls, shape, after):
        jobs = []
        self.folder.mkdir(parents=True, exist_ok=True)
        for fn, args in calls:
            job_id = f"local-{int(time.time())}-{os.getpid()}-{next(self._ids)}"
            p = self._paths(job_id)
            cmd = self.command(p["pkl"], shape)  # a bad shape fails here, at submission
            DelayedSubmission(fn, *args).dump(p["pkl"])
            p["queued"].write_text(str(os.getpid()))  # whose queue holds it (for `status` in another process)
            self._queue.append((job_id, cmd, list(after)))
            self._depth[job_id] = 1 + max((self._depth.get(d, 0) for d in after), default=0)
            jobs.append(Job(self, job_id, p["log"]))
        self._pump()
        return jobs

    def environ(self) -> dict[str, str]:
        """A job's environment. With several jobs at once, OpenMP threads sleep rather than spin while they
        wait (OMP_WAIT_POLICY=PASSIVE, unless set already): spinning, two 2-thread CPU jobs on 2 cores ran
        about 10x slower each; sleeping, two evaluations took 47 s together against 38 s each alone, two
        trainings 71 s against 48 s, with the same outputs bit for bit (BENCHMARKS.md §1q). Each job keeps all
        the machine's threads, so a job running alone is as fast as before."""
        env = distributed.job_environ()
        if self.array_parallelism > 1:
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        return env

    def _pump(self):
        """Start (or cancel) the queued jobs whose dependencies have ended: the deepest first, then in order."""
        running = sum(proc.poll() is None for proc in self._procs.values())
        waiting = []
        order = sorted(range(len(self._queue)), key=lambda i: (-self._depth[self._queue[i][0]], i))
        for job_id, cmd, after in (self._queue[i] for i in order):
            deps = self._states(after)
            bad = [d for d, st in deps.items() if st in ("failed", "unknown")]
            p = self._paths(job_id)
            if bad:
                cloudpickle_dump(("cancelled", f"dependency {', '.join(bad)} did not succeed"), p["result.pkl"])
            elif all(st == "done" for st in deps.values()) and running < self.array_parallelism:
                with open(p["log"], "w") as log:
                    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self.environ())
                self._procs[job_id] = proc
                p["pid"].write_text(str(proc.pid))
                running += 1
            else:
                waiting.append((job_id, cmd, after))
        still = {q[0] for q in waiting}
        self._queue = [q for q in self._queue if q[0] in still]  # submission order

    def states(self, job_ids):
        self._pump()
        return self._states(job_ids)

    def _states(self, job_ids):
        queued = {q[0] for q in self._queue}
        out = {}
        for job_id in job_ids:
            p = self._paths(job_id)
            proc = self._procs.get(job_id)
            alive = proc.poll() is None if proc else p["pid"].exists() and _pid_alive(int(p["pid"].read_text()))
            if p["result.pkl"].exists():
                out[job_id] = "done" if pickle_load(p["result.pkl"])[0] == "success" else "failed"
            elif job_id in queued or (not p["pid"].exists() and p["queued"].exists()
                                      and _pid_alive(int(p["queued"].read_text()))):
                out[job_id] = "pending"  # in this queue, or in the queue of a live process
            elif alive:
                out[job_id] = "running"
            else:  # ended without a result (killed), or unknown here
                out[job_id] = "failed" if p["pid"].exists() else "unknown"
        return out

    def outcome(self, job_id):
        path = self._paths(job_id)["result.pkl"]
        out = pickle_load(path) if path.exists() else None
        return None if out is None or out[0] == "cancelled" else out

    def describe(self, job_id):
        path = self._paths(job_id)["result.pkl"]
        out = pickle_load(path) if path.exists() else None
        return out[1] if out and out[0] == "cancelled" else self.states([job_id])[job_id]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# Slurm job states -> ours; anything else that is finished counts as failed
_SLURM = {**dict.fromkeys(("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESV_DEL_HOLD"),
                          "pending"),
          **dict.fromkeys(("RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "SUSPENDED", "STOPPED", "RESIZING"),
                          "running"),
          "COMPLETED": "done", "UNKNOWN": "unknown"}


class SlurmExecutor(Executor):
    """submitit's AutoExecutor with the cluster profile's partition, account, qos, constraint, container."""
    kind = "slurm"

    def __init__(self, folder, cluster):
        super().__init__(folder, cluster)
        if cluster.slurm_conf:  # sbatch, squeue, sacct (and so submitit) read it
            os.environ["SLURM_CONF"] = os.path.expanduser(cluster.slurm_conf)
        self._raw: dict[str, str] = {}

    def _auto_executor(self, shape: Shape, after: list[str]):
        import submitit
        c = self.cluster
        python, srun_args = c.python, []
        cwd = os.getcwd()
        if c.container and c.container_runtime == "pyxis":
            srun_args = [f"--container-image={c.container}", f"--container-mounts={cwd}:{cwd}",
                         f"--container-workdir={cwd}"]
            python = python or "python"
        elif c.container and c.container_runtime == "apptainer":
            python = python or f"apptainer exec --nv --bind {shlex.quote(cwd)} {shlex.quote(c.container)} python"
        elif c.container:
            raise ValueError(f"cluster '{c.name}': container_runtime must be apptainer or pyxis, "
                             f"not {c.container_runtime!r}")
        ex = submitit.AutoExecutor(folder=self.folder, cluster="slurm", slurm_python=python)
        extra = {"requeue": True, **(c.extra or {})}  # requeueable even where JobRequeue=0 (extra: requeue: false)
        extra = {k: v for k, v in extra.items() if v is not None and v is not False}
        if after:
            extra.update({"dependency": "afterok:" + ":".join(after), "kill-on-invalid-dep": "yes"})
        params = {"name": shape.name, "nodes": shape.nodes, "tasks_per_node": shape.tasks_per_node,
                  "cpus_per_task": shape.cpus_per_task, "timeout_min": shape.timeout_min, "stderr_to_stdout": True,
                  "slurm_partition": c.partition, "slurm_account": c.account, "slurm_qos": c.qos,
                  "slurm_constraint": c.constraint, "slurm_array_parallelism": self.array_parallelism,
                  "slurm_signal_delay_s": c.signal_delay_s, "slurm_additional_parameters": extra,
                  # one thread per allocated CPU: torch would start one per core of the node and oversubscribe it
                  "slurm_setup": [f"export OMP_NUM_THREADS={shape.cpus_per_task}", *(c.setup or [])],
                  "slurm_srun_args": srun_args or None}
        if shape.gpus_per_node:
            params["gpus_per_node"] = shape.gpus_per_node
        if shape.mem_gb is not None:  # 0: all of the node's memory
            params["mem_gb"] = shape.mem_gb
        ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
        return ex

    def script(self, shape: Shape, after: Sequence[str] = ()) -> str:
        """The sbatch script a job of this shape would get (to review a profile; submits nothing). Needs no
        Slurm here: submitit's executor refuses to start where `srun` is not on PATH, which a preview on a
        laptop (or before a test has installed Slurm) must not."""
        from unittest import mock

        from submitit.slurm import slurm
        with mock.patch.object(slurm.SlurmExecutor, "affinity", classmethod(lambda cls: 1)):
            ex = self._auto_executor(shape, list(after))._executor
        return ex._make_submission_file_text(ex._submitit_command_str, "preview")

    def _submit(self, calls, shape, after):
        from submitit.core.utils import FailedJobError
        ex = self._auto_executor(shape, after)
        try:
            with distributed.without_rank_env(keep=("MASTER_PORT",)), ex.batch():  # one call: a plain job; several: one array job
                sjobs = [ex.submit(fn, *args) for fn, args in calls]
        except FailedJobError as e:  # sbatch refused (no controller, bad partition, ...)
            raise JobError(f"submitting {len(calls)} {shape.name} job(s) failed: {str(e).strip()}") from None
        return [Job(self, j.job_id, Path(j.paths.stdout)) for j in sjobs]

    def log_path(self, job_id):
        return JobPaths(self.folder, job_id=job_id, task_id=0).stdout

    def states(self, job_ids):
        """squeue for live jobs, then sacct (needs accounting) for finished ones."""
        ids = list(job_ids)
        raw: dict[str, str] = {}
        if ids:
            q = subprocess.run(["squeue", "-h", "-r", "--me", "-o", "%i|%T"], check=False, capture_output=True, text=True,
                               timeout=60)
            if q.returncode != 0:
                raise JobError(f"squeue failed (is SLURM_CONF right?): {q.stderr.strip()}")
            raw = {i: s for i, s in (ln.split("|", 1) for ln in q.stdout.split() if "|" in ln) if i in ids}
        rest = [i for i in ids if i not in raw]
        if rest:  # by array job id: tasks cancelled before they started only show as "12_[0-5%2]"
            from submitit.slurm.slurm import SlurmInfoWatcher
            main_ids = ",".join(dict.fromkeys(i.split("_")[0] for i in rest))
            a = subprocess.run(["sacct", "-X", "-P", "-o", "JobID,State", "-j", main_ids], check=False,
                               capture_output=True, text=True, timeout=60)
            info = SlurmInfoWatcher().read_info(a.stdout)
            raw.update({i: info[i]["State"] for i in rest if i in info})
        self._raw.update(raw)
        return {i: _SLURM.get(raw.get(i, "UNKNOWN").split()[0], "failed") for i in ids}

    def outcome(self, job_id):
        path = JobPaths(self.folder, job_id=job_id).result_pickle
        return pickle_load(path) if path.exists() else None

    def describe(self, job_id):
        self.states([job_id])
        return self._raw.get(job_id, "UNKNOWN").lower()


EXECUTORS = {"debug": DebugExecutor, "local": LocalExecutor, "slurm": SlurmExecutor}


def make_executor(cluster, folder) -> Executor:
    return EXECUTORS[cluster.executor](folder, cluster)


def _main(pkl: str) -> int:
    """`python -m launch.executors <call.pkl>`: a local job (or one torchrun rank). Rank 0 writes the result."""
    call = DelayedSubmission.load(pkl)
    rank = int(os.environ.get("RANK", "0"))
    try:
        outcome, code = ("success", call.result()), 0
    except Exception:  # noqa: BLE001 - any error is the job's outcome
        outcome, code = ("error", traceback.format_exc()), 1
        print(outcome[1], file=sys.stderr)
    if rank == 0:
        result = Path(str(pkl)[: -len(".pkl")] + ".result.pkl")
        cloudpickle_dump(outcome, str(result) + ".tmp")
        os.replace(str(result) + ".tmp", result)
    return code


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1]))
