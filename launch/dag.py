"""`python -m pipeline sweep [experiment=NAME] [overrides] [--dry-run] [--wait]`: expand an experiment's grid
(its `sweep:` section: models x tasks x attacks x defenses) into the unique stage runs it needs and submit
them all at once.

- A run is (stage, overrides); its key keeps only the overrides its output depends on, so a poisoned set
  (task, attack) or a backdoored model (+ model) shared by several defenses is built once.
- Dependencies (pipeline/graph.py: `waits_on`): inject <- poison; post-hoc defend <- inject; training-time
  defend <- poison; evaluate <- (defend, or inject for defense family none) and poison; report <- every
  evaluate.
- Runs whose output is complete are skipped; runs whose job is still pending or running are kept and
  depended on; the rest (never ran, failed, cancelled) are submitted, stage by stage, one job array per
  (stage, job shape, exact set of input jobs), with afterok dependencies on those jobs. Slurm gives an
  array one dependency list, so grouping by the exact inputs lets every run start as soon as its own
  inputs are built (each defense's evaluation right after that defense; one cell's defenses together
  after its injection), and a failed input cancels only what needs it (kill-on-invalid-dep); `sweep`
  again resubmits what never ran.
- runs/sweeps/<experiment>/state.json maps run keys to job ids and log paths (`python -m pipeline status`).
- `--wait` (always with the local executor, whose jobs are this process's children) shows the sweep live
  until every run has ended (launch/status.py `watch`: per stage, each running run's step and ETA, then
  the slowest runs and their logs) and exits non-zero naming each failed run's log and error.
"""
from __future__ import annotations

import itertools
import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import graph, store

from .executors import Executor, JobError, StageRun, make_executor, shape_for

STAGES = graph.ORDER
AXES = ("model", "task", "attack", "defense")  # the sweep's grid: group choices
# the config groups and sections whose overrides a stage's output depends on (its identity)
SECTIONS = {s: graph.sections(s) for s in STAGES}


def section_of(override: str) -> str:
    return override.split("=", 1)[0].split(".", 1)[0].strip()


@dataclass(frozen=True)
class Run:
    stage: str
    overrides: tuple[str, ...]  # what the stage is run with
    deps: tuple[str, ...] = ()  # keys of the runs whose outputs it reads

    @property
    def key(self) -> str:
        return " ".join([self.stage, *(o for o in self.overrides if section_of(o) in SECTIONS[self.stage])])


# ----------------------------------------------------------------------------------------- stages
class PipelineStages:
    """What the DAG needs to know about the real stages (tests pass a fake with the same four members)."""
    runner: Callable | None = None  # how a job runs a stage: None = pipeline.cli.run_stage

    def output_dir(self, stage: str, overrides: Sequence[str]) -> Path | None:
        """Where the run's output goes; None when that is not known yet (an input is missing)."""
        from pipeline.config import compose
        cfg = compose(list(overrides))  # a config error stops the sweep before anything is submitted
        try:
            return graph.output_dir(stage, cfg)
        except (graph.NotBuilt, store.StoreError, FileNotFoundError):
            return None

    def defense_family(self, name: str) -> str:
        from pipeline.config import group_file, load_yaml
        return load_yaml(group_file("defense", name)).get("family", "post_hoc")

    def compatible(self, task: str, attack: str) -> bool:
        from pipeline.config import group_file, load_yaml
        attacks = load_yaml(group_file("task", task)).get("attacks") or []
        return not attacks or attack in attacks


def expand(cfg, overrides: Sequence[str], stages=None) -> dict[str, Run]:
    """The unique runs of the sweep `cfg` describes, keyed, in dependency order. `overrides` are the
    command line's; a group choice given there (model=...) replaces that axis of the grid. An experiment
    with `sweep.experiments` (the persistence ladder's `frontier`) is the union of those experiments' grids,
    each under its own recipe, with its own axes where it sets them, and one report over all of them."""
    stages = stages or PipelineStages()
    exp = cfg.choices["experiment"]
    if cfg.sweep.experiments:
        return expand_union(cfg, overrides, stages)
    cli = {section_of(o): o.split("=", 1)[1] for o in overrides if "." not in o.split("=", 1)[0]}
    base = [o for o in overrides if section_of(o) not in ("experiment", "sweep", *AXES)]
    axes = {a: [cli[a]] if a in cli else list(getattr(cfg.sweep, a + "s")) or [cfg.choices[a]] for a in AXES}
    runs: dict[str, Run] = {}

    def add(stage: str, choices: dict, deps: Iterable[str] = (), extra: Sequence[str] = ()) -> str:
        run = Run(stage, (f"experiment={exp}", *(f"{k}={v}" for k, v in choices.items()), *extra, *base),
                  tuple(dict.fromkeys(deps)))
        runs.setdefault(run.key, run)
        return run.key

    def build(stage: str, cell: dict, family: str) -> str:
        """The run of `stage` for one grid cell, after the runs it waits on (pipeline/graph.py's wiring)."""
        deps = [build(up, cell, family) for up in graph.waits_on(stage, family)]
        tuned = cfg.sweep.overrides.get(cell["defense"], []) if "defense" in SECTIONS[stage] else []
        return add(stage, {a: cell[a] for a in AXES if a in SECTIONS[stage]}, deps, tuned)

    evals = []
    for model, task, attack, defense in itertools.product(*(axes[a] for a in AXES)):
        if not stages.compatible(task, attack):
            continue
        cell = {"model": model, "task": task, "attack": attack, "defense": defense}
        evals.append(build("evaluate", cell, stages.defense_family(defense)))
    if cfg.sweep.report and evals:
        grid = [f"report.{a}s=[{','.join(map(str, axes[a]))}]" for a in AXES]
        add("report", {}, evals, extra=[f"report.experiment={exp}", *grid])
    return dict(sorted(runs.items(), key=lambda kv: STAGES.index(kv[1].stage)))


def expand_union(cfg, overrides: Sequence[str], stages) -> dict[str, Run]:
    """`sweep.experiments`: every listed experiment's runs (its grid narrowed to this experiment's axes and
    tuned by its `sweep.overrides`, where this one sets them), then one report over their evaluations."""
    import dataclasses

    from pipeline.config import compose
    # the list itself is this experiment's: a rung composed with it would expand the union again, without end
    rest = [o for o in overrides
            if section_of(o) != "experiment" and not o.split("=", 1)[0].strip().startswith("sweep.experiments")]
    runs: dict[str, Run] = {}
    for name in cfg.sweep.experiments:
        sub = compose([f"experiment={name}", *rest])
        mine = {f"{a}s": getattr(cfg.sweep, f"{a}s") for a in AXES if getattr(cfg.sweep, f"{a}s")}
        sub.sweep = dataclasses.replace(sub.sweep, **mine, report=False,
                                        overrides={**sub.sweep.overrides, **cfg.sweep.overrides})
        runs.update(expand(sub, rest, stages))
    # rungs that share a poisoned set (their recipes differ in training only) share one poison run: the others'
    # keys differ by `experiment=` alone, and parallel builds of one output would replace it under its readers
    same, first = {}, {}  # poison run key -> the kept run's key; output dir -> the kept run's key
    for key, r in runs.items():
        if r.stage == "poison":
            out = stages.output_dir("poison", r.overrides)
            same[key] = key if out is None else first.setdefault(str(out), key)
    runs = {k: Run(r.stage, r.overrides, tuple(dict.fromkeys(same.get(d, d) for d in r.deps)))
            for k, r in runs.items() if same.get(k, k) == k}
    evals = [k for k, r in runs.items() if r.stage == "evaluate"]
    if cfg.sweep.report and evals:
        exp = cfg.choices["experiment"]
        run = Run("report", (f"experiment={exp}", f"report.experiment={exp}",
                             f"report.experiments=[{','.join(cfg.sweep.experiments)}]",
                             "report.frontier=true", *(o for o in rest if section_of(o) not in ("sweep", *AXES))),
                  tuple(evals))
        runs[run.key] = run
    return dict(sorted(runs.items(), key=lambda kv: STAGES.index(kv[1].stage)))


# ------------------------------------------------------------------------------------------ state
@dataclass
class SweepState:
    """runs/sweeps/<experiment>/state.json: run key -> {stage, overrides, executor, job_id, log, submitted}."""
    path: Path
    runs: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path) -> SweepState:
        path = Path(path)
        return cls(path, json.loads(path.read_text())["runs"] if path.exists() else {})

    def record(self, run: Run, executor: Executor, job):
        self.runs[run.key] = {"stage": run.stage, "overrides": list(run.overrides), "executor": executor.kind,
                              "folder": str(executor.folder), "job_id": job.job_id,
                              "log": str(job.log) if job.log else None,
                              "submitted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def save(self):
        store.write_json_atomic(self.path, {"runs": self.runs}, indent=1, sort_keys=True)


def sweep_dir(experiment: str) -> Path:
    return store.runs_root() / "sweeps" / experiment


def done_keys(runs: dict[str, Run], stages) -> set[str]:
    """Runs whose output is complete and whose inputs are all done (a report over evaluations that are
    still to come is not done, even if a report over the finished ones exists)."""
    done: set[str] = set()
    for key, run in runs.items():  # dependency order
        out = stages.output_dir(run.stage, run.overrides)
        if out is not None and store.is_complete(out) and all(d in done for d in run.deps):
            done.add(key)
    return done


def live_states(state: SweepState, keys: Iterable[str], executor: Executor) -> dict[str, str]:
    """The recorded job's state for each key that has one (jobs of another executor kind: 'unknown')."""
    recs = {k: state.runs[k] for k in keys if k in state.runs}
    ids = [r["job_id"] for r in recs.values() if r["executor"] == executor.kind]
    live = executor.states(ids) if ids else {}
    return {k: live.get(r["job_id"], "unknown") for k, r in recs.items()}


def submit(runs: dict[str, Run], stages, executor: Executor, state: SweepState, force: bool = False,
           log=print) -> dict[str, str]:
    """Submit what is neither complete nor in flight; returns key -> action (done, queued, submitted)."""
    actions, job_of = {}, {}  # job_of: key -> job id its dependents wait for
    live = live_states(state, runs, executor)
    done = set() if force else done_keys(runs, stages)
    todo: list[Run] = []
    for key, run in runs.items():
        if key in done:
            actions[key] = "done"
        elif not force and live.get(key) in ("pending", "running"):
            actions[key], job_of[key] = "queued", state.runs[key]["job_id"]
        else:
            todo.append(run)
    for stage in STAGES:  # in stage order, so a group's inputs are submitted before it
        groups: dict[tuple, list[Run]] = {}
        for run in (r for r in todo if r.stage == stage):  # one array per exact set of input jobs
            after = tuple(sorted({job_of[d] for d in run.deps if d in job_of}))
            groups.setdefault((shape_for(stage, executor.cluster), after), []).append(run)
        for (shape, after), members in groups.items():
            jobs = executor.map_array(StageRun(stages.runner), [m.stage for m in members],
                                      [m.overrides for m in members], [force] * len(members), shape=shape,
                                      after=list(after))
            for m, job in zip(members, jobs):
                job_of[m.key], actions[m.key] = job.job_id, "submitted"
                state.record(m, executor, job)
            state.save()
            array = "[array]" if len(jobs) > 1 else ""
            log(f"[sweep] {stage}: {len(members)} run(s), job {jobs[0].job_id.split('_')[0]}{array}"
                + (f" after {','.join(after)}" if after else ""))
    state.save()
    return actions


# -------------------------------------------------------------------------------------------- CLI
def add_arguments(p):
    p.add_argument("--dry-run", action="store_true", help="print the runs and what would be submitted")
    p.add_argument("--wait", action="store_true", help="wait until every submitted job has finished")


def run(cfg, args) -> Path:
    overrides = list(getattr(args, "overrides", []) or [])
    stages = PipelineStages()
    runs = expand(cfg, overrides, stages)
    folder = sweep_dir(cfg.choices["experiment"])
    state = SweepState.load(folder / "state.json")
    executor = make_executor(cfg.cluster, folder / "jobs")
    if getattr(args, "dry_run", False):
        done = done_keys(runs, stages)
        for key, run in runs.items():
            print(f"{'done' if key in done else 'todo':5s} {key}")
            for d in run.deps if run.stage != "report" else []:
                print(f"      after {d}")
        # the job arrays a submission makes of what is to do: one per (stage, job shape, exact set of inputs)
        arrays: dict = {}
        for key, run in runs.items():
            if key not in done:
                arrays.setdefault((run.stage, shape_for(run.stage, cfg.cluster), run.deps), []).append(key)
        for (stage, shape, deps), keys in arrays.items():
            after = sorted({runs[d].stage for d in deps})
            print(f"array {stage}: {len(keys)} job(s), {shape.gpus_per_node} GPU(s) x {shape.nodes} node(s)"
                  + (f", afterok on {len(deps)} {'/'.join(after)} job(s)" if deps else ""))
        if executor.kind == "slurm":  # what a site admin wants to see: the job scripts, one per shape
            for shape in dict.fromkeys(shape_for(r.stage, cfg.cluster) for r in runs.values()):
                print(f"\n# ---- {shape}\n{executor.script(shape)}")
        return state.path
    try:  # JobError: sbatch or squeue failed
        actions = submit(runs, stages, executor, state, force=getattr(args, "force", False),
                         log=lambda m: print(m, file=sys.stderr))
    except JobError as e:  # what was submitted before is in the state file; `sweep` again goes on from there
        raise SystemExit(f"error: {e}") from None
    counts = {a: sum(v == a for v in actions.values()) for a in ("done", "queued", "submitted")}
    print(f"[sweep] {len(runs)} runs: " + ", ".join(f"{n} {a}" for a, n in counts.items()), file=sys.stderr)
    if getattr(args, "wait", False) or executor.kind == "local":  # local jobs are children of this process
        from .progress import Display
        from .status import watch
        rows = watch(runs, stages, state, executor, actions, Display(), poll_s=5 if executor.kind == "slurm" else 0.5)
        failed = [f"  {r.key} (log: {r.log or '-'}): {why(executor, r.job_id)}" for r in rows if r.state == "failed"]
        if failed:
            raise SystemExit(f"[sweep] {len(failed)} run(s) did not finish:\n" + "\n".join(failed)
                             + "\nfix the cause, then run the same sweep again: complete outputs are reused")
    return state.path


def why(executor: Executor, job_id: str | None) -> str:
    """A failed job's reason in one line: its error's last line, else what the executor says of it."""
    out = executor.outcome(job_id) if job_id else None
    if out and out[0] != "success" and str(out[1]).strip():
        return str(out[1]).strip().splitlines()[-1]
    return executor.describe(job_id) if job_id else "never submitted"
