"""`python -m pipeline status [experiment=NAME] [overrides]`: every run of a sweep, one line each:
state (done / running / pending / failed, or new: never submitted), stage, job id, log path and run key.

done means the run's output is complete (whatever the scheduler says); otherwise the state is the recorded
job's (runs/sweeps/<experiment>/state.json), asked of the executor that ran it. `make sweep` again
resubmits exactly the runs shown as failed or new.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .dag import PipelineStages, SweepState, done_keys, expand, sweep_dir
from .executors import JobError, make_executor


@dataclass
class Row:
    key: str
    stage: str
    state: str
    job_id: str | None = None
    log: str | None = None


def collect(runs, stages, state: SweepState, cluster) -> list[Row]:
    """One Row per run; jobs are looked up with an executor of the kind that ran them."""
    recs = {k: state.runs[k] for k in runs if k in state.runs}
    live: dict[str, str] = {}
    for kind in {r["executor"] for r in recs.values()}:
        mine = {k: r for k, r in recs.items() if r["executor"] == kind}
        folder = next(iter(mine.values()))["folder"]
        ex = make_executor(dataclasses.replace(cluster, executor=kind), folder)
        states = ex.states([r["job_id"] for r in mine.values()])
        live.update({k: states[r["job_id"]] for k, r in mine.items()})
    rows = []
    done = done_keys(runs, stages)
    for key, run in runs.items():
        rec = recs.get(key, {})
        if key in done:
            s = "done"
        elif not rec:
            s = "new"
        else:  # a job that finished without a complete output has failed
            s = {"done": "failed", "unknown": "failed"}.get(live[key], live[key])
        rows.append(Row(key, run.stage, s, rec.get("job_id"), rec.get("log")))
    return rows


def format_rows(rows: list[Row]) -> str:
    w = max([len(r.job_id or "-") for r in rows] + [6])
    lines = [f"{'STATE':8s} {'STAGE':9s} {'JOB':{w}s} LOG / RUN"]
    for r in rows:
        lines.append(f"{r.state:8s} {r.stage:9s} {r.job_id or '-':{w}s} {r.log or '-'}")
        lines.append(f"{'':8s} {'':9s} {'':{w}s}   {r.key}")
    counts = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    lines.append(f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return "\n".join(lines)


def run(cfg, args) -> None:
    stages = PipelineStages()
    runs = expand(cfg, list(getattr(args, "overrides", []) or []), stages)
    state = SweepState.load(sweep_dir(cfg.choices["experiment"]) / "state.json")
    try:
        print(format_rows(collect(runs, stages, state, cfg.cluster)))
    except JobError as e:
        raise SystemExit(f"error: {e}") from None
