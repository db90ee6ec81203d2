"""The real stages (tiny random Llama, synthetic data) on a real one-node Slurm (the session fixture `slurm`
of tests/conftest.py, shared with tests/test_slurm.py, which covers the same ground with fake stages):

1. `python -m pipeline sweep ... --wait` of 2 attacks x 3 defenses: jobs and job arrays with afterok
   dependencies, each job started after its inputs' jobs ended, and the report table.
2. A defense that fails at run time: `python -m pipeline status` shows it failed with its log; once fixed,
   `sweep` again resubmits only it (and what never ran because of it).
3. Saving on the signal, no `train.save_every` set: an inject job requeued by `scontrol requeue` (SIGTERM,
   as preemption sends); 2-task inject jobs (2 ranks, gloo on the CPU) under ZeRO-2 and ZeRO-3 sent Slurm's
   pre-timeout USR2; a SANDE job sent USR2 in its second phase. Each saves at the next step boundary, is
   requeued, resumes from that checkpoint (in that phase) and ends with the weights of an uninterrupted
   run (bit for bit).

Skipped, with the fixture's reason, where the cluster cannot be started (not root, ...). The jobs run
with OMP_NUM_THREADS=1: several 1-CPU jobs share the machine's cores, and torch's default of one
thread per core oversubscribes them (a 2-step CROW job took a minute instead of seconds).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from submitit.core.utils import pickle_load

from launch import dag
from launch.executors import StageRun, make_executor, shape_for
from launch.progress import train_progress
from pipeline import graph
from pipeline.cli import run_stage
from pipeline.config import compose
from pipeline.train.trainer import checkpoint_dir_for

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
SWEEP = ["experiment=tiny", "cluster=local-slurm", "sweep.attacks=[badnet,vpi]", "train.max_steps=2",
         "evaluate.n_test=4"]
DEFENSES = "sweep.defenses=[none,finetune,crow]"
WITH_OSFT = "sweep.defenses=[none,finetune,crow,osft]"


def job_env(runs, configs=None) -> dict:
    env = dict(os.environ, PIPELINE_RUNS=str(runs), OMP_NUM_THREADS="1")
    env.pop("PIPELINE_CONFIGS", None)
    if configs:
        env["PIPELINE_CONFIGS"] = str(configs)
    return env


def cli(args, runs, configs=None, timeout=300, rc=0) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` with PIPELINE_RUNS=runs (sbatch passes the environment on to the jobs)."""
    p = subprocess.run([PY, "-m", "pipeline", *args], cwd=ROOT, env=job_env(runs, configs), capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == rc, f"python -m pipeline {' '.join(args)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
    return p


def sacct(job_ids) -> dict[str, dict]:
    """JobID (array tasks as 12_3) -> {State, Start, End} of the given jobs (or arrays)."""
    ids = ",".join(sorted({j.split("_")[0] for j in job_ids}))
    out = subprocess.run(["sacct", "-X", "-P", "-n", "-o", "JobID,State,Start,End", "-j", ids], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    rows = [ln.split("|") for ln in out.splitlines() if ln.strip()]
    return {r[0]: {"State": r[1], "Start": r[2], "End": r[3]} for r in rows}


def state_runs(runs) -> dict:
    return json.loads((Path(runs) / "sweeps" / "tiny" / "state.json").read_text())["runs"]


def status_rows(text: str) -> dict[str, tuple[str, str, str]]:
    """`python -m pipeline status` output (after its lines per stage) -> run key -> (state, job id, log)."""
    lines = text.splitlines()
    lines = lines[next(i for i, ln in enumerate(lines) if ln.startswith("STATE ")) + 1:-1]
    return {key.strip(): tuple(head.split(None, 3)[i] for i in (0, 2, 3)) for head, key in zip(lines[::2], lines[1::2])}


def same_weights(a: Path, b: Path):
    """Every safetensors file under two outputs, bit for bit."""
    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(b) for p in b.rglob("*.safetensors")), (a, b)
    for f in files:
        ta, tb = load_file(str(a / f)), load_file(str(b / f))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), f


def submit(stage, ov, runs, jobs, monkeypatch):
    """A job of one stage run (PIPELINE_RUNS=runs: sbatch passes it on); (job, its output path)."""
    monkeypatch.setenv("PIPELINE_RUNS", str(runs))
    cfg = compose(ov)
    job = make_executor(cfg.cluster, jobs).submit(StageRun(), stage, ov, False, shape=shape_for(stage, cfg.cluster))
    return job, graph.output_dir(stage, cfg)


def wait_until(cond, job, timeout_s=300):
    deadline = time.time() + timeout_s
    while not cond():
        assert time.time() < deadline and job.state in ("pending", "running"), job.state
        time.sleep(0.2)


def resumed_at(log: str, final: Path, sub: str = "") -> int:
    """The step the job's second start resumed at, from its checkpoint next to `final`."""
    m = re.search(rf"\[train\] resumed from {re.escape(str(checkpoint_dir_for(final) / sub).rstrip('/'))} at step (\d+)",
                  log)
    assert m, log[-3000:]
    return int(m.group(1))


# ------------------------------------------------------------------------------------------ sweep
@pytest.fixture(scope="module")
def swept(slurm, tmp_path_factory):
    """One sweep of 2 attacks x 3 defenses on the tiny model, submitted and waited for by the CLI."""
    runs = tmp_path_factory.mktemp("runs-sweep")
    t0 = time.time()
    p = cli(["sweep", *SWEEP, DEFENSES, "--wait"], runs, timeout=480)
    return runs, p, time.time() - t0


def test_sweep_job_arrays_afterok_and_report(swept):
    runs, p, wall = swept
    ov = [*SWEEP, DEFENSES]
    expected = dag.expand(compose(ov), ov)
    recs = state_runs(runs)
    assert set(recs) == set(expected) and len(expected) == 15, p.stderr
    assert "15 runs: 0 done, 0 queued, 15 submitted" in p.stderr
    # one array per exact set of input jobs: the 2 poisons together, each attack's 2 defenses together
    # after its injection; every other run (2 injects, 6 evaluations, the report) waits on its own inputs
    arrays: dict[str, set] = {}
    singles = []
    for key, rec in recs.items():
        assert rec["executor"] == "slurm" and re.fullmatch(r"\d+(_\d+)?", rec["job_id"]), rec
        if "_" in rec["job_id"]:
            arrays.setdefault(rec["job_id"].split("_")[0], set()).add(rec["job_id"])
        else:
            singles.append(expected[key].stage)
    assert sorted(len(m) for m in arrays.values()) == [2, 2, 2], arrays
    assert sorted(singles) == sorted(["inject"] * 2 + ["evaluate"] * 6 + ["report"]), singles
    jobs = Path(runs) / "sweeps" / "tiny" / "jobs"
    key = next(k for k in recs if expected[k].stage == "defend")
    script = (jobs / f"{recs[key]['job_id'].split('_')[0]}_submission.sh").read_text()
    inject = recs[expected[key].deps[0]]["job_id"]
    assert "#SBATCH --array=0-1%" in script and f"#SBATCH --dependency=afterok:{inject}\n" in script, script
    # Slurm ran each job after the jobs of its inputs had ended
    acct = sacct(r["job_id"] for r in recs.values())
    for key, run in expected.items():
        mine = acct[recs[key]["job_id"]]
        assert mine["State"] == "COMPLETED", (key, mine)
        for d in run.deps:
            dep = acct[recs[d]["job_id"]]
            assert mine["Start"] >= dep["End"], f"{key} started {mine['Start']}, before {d} ended {dep['End']}"
        assert Path(recs[key]["log"]).is_file()
    # the report: one row per attack, a column per defense
    tables = list((Path(runs) / "report").glob("*/table.md"))
    assert len(tables) == 1, tables
    table = tables[0].read_text()
    for attack in ("badnet", "vpi"):
        assert len(re.findall(rf"^\| tiny-llama \| negsentiment \| {attack} \|", table, re.M)) == 1, table
    header = table.splitlines()[0]
    assert all(c in header for c in ("no defense", "finetune", "crow")), header
    print(f"sweep of 15 jobs: {wall:.0f} s")


def test_failed_defense_in_status_and_only_it_resubmitted(swept, tmp_path):
    """osft added to the sweep with a typo in its config: its jobs fail at run time (the config is only
    checked there); status shows them with their logs; fixed, `sweep` again submits only them and what
    depended on them."""
    runs, _, _ = swept
    configs = tmp_path / "configs"
    shutil.copytree(ROOT / "configs", configs)
    with open(configs / "defense" / "osft.yaml", "a") as f:
        f.write("params: {response_tokens: 10, seed: 0, typo_field: 1}\n")
    ov = [*SWEEP, WITH_OSFT]
    p = cli(["sweep", *ov, "--wait"], runs, configs, rc=1)  # --wait: non-zero, naming what did not finish
    assert "19 runs: 14 done, 0 queued, 5 submitted" in p.stderr, p.stderr
    assert "5 run(s) did not finish" in p.stderr and "defend experiment=" in p.stderr, p.stderr
    before = state_runs(runs)
    text = cli(["status", *ov], runs).stdout
    rows = status_rows(text)
    assert len(rows) == 19, text
    osft = {k for k in rows if "defense=osft" in k}
    bad = {k for k in osft if k.startswith("defend ")}
    report = {k for k in rows if k.startswith("report ")}
    assert len(bad) == 2 and len(osft) == 4, text
    assert {k for k, r in rows.items() if r[0] == "failed"} == osft | report, text
    assert {r[0] for k, r in rows.items() if k not in osft | report} == {"done"}, text
    for k in bad:
        state, job_id, log = rows[k]
        assert job_id == before[k]["job_id"] and log == before[k]["log"], (k, rows[k], before[k])
        assert "unknown field(s) typo_field" in Path(log).read_text()  # the traceback is in the job's log
    assert "19 runs: 14 done, 5 failed" in text, text
    # fixed (the shipped configs): only the failed defenses and what never ran after them are submitted
    p = cli(["sweep", *ov, "--wait"], runs)
    assert "19 runs: 14 done, 0 queued, 5 submitted" in p.stderr, p.stderr
    after = state_runs(runs)
    assert {k for k in after if after[k]["job_id"] != before[k]["job_id"]} == osft | report
    text = cli(["status", *ov], runs).stdout
    assert "19 runs: 19 done" in text, text
    # the first sweep's report stays in the store beside the new one: read the newest
    newest = max((Path(runs) / "report").glob("*/table.md"), key=lambda p: (p.parent / "_SUCCESS").stat().st_mtime)
    table = newest.read_text()
    assert "osft" in table.splitlines()[0], table


# -------------------------------------------------------------------------------- signal and requeue
def test_inject_requeued_mid_training_saves_on_sigterm_and_equals_uninterrupted(slurm, tmp_path, monkeypatch):
    """`scontrol requeue` mid-training, no `save_every`: Slurm sends the tasks SIGTERM (as on preemption;
    SIGKILL after KillWait=5 s); the trainer saves at the next step boundary and exits; Slurm starts the job
    again, it resumes from that checkpoint and saves the same adapter as a run never interrupted (here: the
    stage run directly)."""
    steps = 300  # ~0.02-0.05 s a step: still training when the signal comes
    ov = ["experiment=tiny", "cluster=local-slurm", f"train.max_steps={steps}"]
    requeued, plain = tmp_path / "requeued", tmp_path / "plain"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for runs in (plain, requeued):
        monkeypatch.setenv("PIPELINE_RUNS", str(runs))
        run_stage("poison", ov)
    job, out = submit("inject", ov, requeued, tmp_path / "jobs", monkeypatch)
    ref = subprocess.Popen([PY, "-m", "pipeline", "inject", *ov], cwd=ROOT, env=job_env(plain),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: (train_progress(out) or {}).get("step", 0) >= 5, job)
        subprocess.run(["scontrol", "requeue", job.job_id], check=True, timeout=60)
        final = Path(job.result(timeout_s=300))
        ref_out, _ = ref.communicate(timeout=300)
    finally:
        if ref.poll() is None:
            ref.kill()
    assert ref.returncode == 0, ref_out
    log = job.log.read_text()
    assert "DUE TO JOB REQUEUE" in log and "[train] SIGTERM: checkpoint saved, stopping" in log, log[-3000:]
    assert "already complete" not in log, "the job ended before Slurm killed it: raise train.max_steps"
    assert 5 <= resumed_at(log, final) < steps
    assert not checkpoint_dir_for(final).exists()  # removed once the output is complete
    assert json.loads((final / "manifest.json").read_text())["metrics"]["steps"] == steps
    same_weights(final / "model", plain / "inject" / final.name / "model")  # the same config: the same name


def test_two_task_inject_zero2_and_zero3_signalled_resume_equal_to_uninterrupted(slurm, tmp_path, monkeypatch,
                                                                                trained_in_process):
    """cluster.stages.inject.tasks_per_node=2 on a CPU node: one job, 2 Slurm tasks, one rank each (gloo).
    For ZeRO-2 and ZeRO-3 (one test: 6 job starts of ~20 s each), a job sent USR2 (what Slurm sends
    `signal_delay_s` before the time limit) mid-training: both ranks agree at the next step boundary, save one
    checkpoint together, rank 0 requeues the job (submitit), and the job resumes there and ends bit for bit
    with the adapter of the same job never signalled. The uninterrupted jobs: every rank ran the stage, rank 0
    alone wrote the output. Submitted from a process that has trained in-process (RANK=0, WORLD_SIZE=1 ...
    in its environment, as after any earlier test that ran a trainer): the jobs must not inherit them (they
    did once, and each task trained as a world of 1, both writing the same checkpoints: a flaky failure)."""
    steps = 40
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    jobs, outs = {}, {}
    for zero in (2, 3):
        ov = ["experiment=tiny", "cluster=local-slurm", "cluster.stages.inject.tasks_per_node=2",
              f"deepspeed=zero{zero}", f"train.max_steps={steps}"]
        assert shape_for("inject", compose(ov).cluster).tasks_per_node == 2
        for kind in ("signalled", "plain"):
            runs = tmp_path / f"z{zero}-{kind}"
            monkeypatch.setenv("PIPELINE_RUNS", str(runs))
            run_stage("poison", ov)
            jobs[zero, kind], outs[zero, kind] = submit("inject", ov, runs, tmp_path / "jobs", monkeypatch)
    for zero in (2, 3):  # Slurm runs the jobs one after the other (2 CPUs): signal each as it trains
        job, out = jobs[zero, "signalled"], outs[zero, "signalled"]
        wait_until(lambda: (train_progress(out) or {}).get("step", 0) >= 3, job, timeout_s=600)
        subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True, timeout=60)
    finals = {k: Path(j.result(timeout_s=600)) for k, j in jobs.items()}
    for zero in (2, 3):
        job, final = jobs[zero, "signalled"], finals[zero, "signalled"]
        logs = [(tmp_path / "jobs" / f"{job.job_id}_{rank}_log.out").read_text() for rank in (0, 1)]
        assert all("[train] SIGUSR2: checkpoint saved, stopping" in log for log in logs), logs[1][-3000:]
        # requeued by rank 0's submitit handler: `scontrol requeue` may itself be killed by the requeue it asked
        # for (its "Requeued job" line then missing, rank 0 exiting 1), so the evidence is slurmstepd's line
        assert "DUE TO JOB REQUEUE" in logs[0] and "already complete" not in logs[0], logs[0][-3000:]
        assert "[inject] wrote" in logs[0] and "[inject] wrote" not in logs[1], logs[1][-3000:]
        assert 3 <= resumed_at(logs[0], final) < steps, "the job ended before the signal: raise steps"
        assert not checkpoint_dir_for(final).exists()
        assert json.loads((final / "manifest.json").read_text())["metrics"]["steps"] == steps
        same_weights(final / "model", finals[zero, "plain"] / "model")
        job, final = jobs[zero, "plain"], finals[zero, "plain"]
        assert "#SBATCH --ntasks-per-node=2" in (tmp_path / "jobs" / f"{job.job_id}_submission.sh").read_text()
        for rank in (0, 1):  # both tasks ran the stage, as ranks of one world of 2
            log = (tmp_path / "jobs" / f"{job.job_id}_{rank}_log.out").read_text()
            assert f"global_rank={rank}(2)" in log and "resumed" not in log, log
            assert ("[inject] wrote" in log) == (rank == 0) and "already complete" not in log, log[-3000:]
            assert pickle_load(tmp_path / "jobs" / f"{job.job_id}_{rank}_result.pkl") == ("success", str(final))
        assert f"zero_stage: {zero}" in (final / "config.yaml").read_text()
        assert not list(final.parent.glob(".tmp-*"))  # rank 1 wrote nothing into the store


def test_sande_signalled_in_its_second_phase_resumes_in_that_phase(slurm, tmp_path, monkeypatch):
    """A single-rank SANDE job sent USR2 while it trains its second phase (the overwrite): the requeued job
    keeps the first phase's output (the parrot, kept under the run's checkpoints), resumes the second
    phase from its checkpoint, and ends with the weights and parrot of the same job never signalled."""
    ov = ["experiment=tiny", "cluster=local-slurm", "defense=sande", "train.max_steps=2", "defense.train.max_steps=100"]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PIPELINE_RUNS", str(tmp_path / "signalled"))
    run_stage("poison", ov)
    run_stage("inject", ov)
    shutil.copytree(tmp_path / "signalled", tmp_path / "plain")
    job, out = submit("defend", ov, tmp_path / "signalled", tmp_path / "jobs", monkeypatch)
    plain, _ = submit("defend", ov, tmp_path / "plain", tmp_path / "jobs", monkeypatch)
    phase2 = lambda: [p for p in out.parent.glob(f".tmp-{out.name}-*/metrics.jsonl") if len(p.read_text().splitlines()) >= 3]
    wait_until(phase2, job)  # the final phase logs into the output's temporary directory
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True, timeout=60)
    final, plain_final = Path(job.result(timeout_s=600)), Path(plain.result(timeout_s=600))
    log = job.log.read_text()
    assert "[train] SIGUSR2: checkpoint saved, stopping" in log and "DUE TO JOB REQUEUE" in log, log[-3000:]
    assert log.count("phase 2/2 'eliminate'") == 2 and "phase 1/2 'simulate' done before" in log, log[-3000:]
    assert 3 <= resumed_at(log, final, "phase1") < 100
    assert not checkpoint_dir_for(final).exists()
    same_weights(final, plain_final)  # the model, and the parrot of phase 1 (simulate.extra.safetensors)
