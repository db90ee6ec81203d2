"""`python -m pipeline status [experiment=NAME] [overrides]`: where a sweep stands. One line per stage
(done / running / queued / failed / new: never submitted) with each running run's step of total and ETA
(launch/progress.py), then every run, one line each: state, stage, job id, log path and run key.

done means the run's output is complete (whatever the scheduler says); otherwise the state is the recorded
job's (runs/sweeps/<experiment>/state.json), asked of the executor that ran it. `make sweep` again
resubmits exactly the runs shown as failed or new. `watch` is `sweep --wait`: the same lines, live.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass

from .dag import PipelineStages, SweepState, done_keys, expand, sweep_dir
from .executors import JobError, make_executor
from .progress import Display, block, train_progress


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


def watch(runs, stages, state: SweepState, executor, actions: dict, display: Display, poll_s: float = 1.0,
          unknown_s: float = 60.0) -> list[Row]:
    """Until every run has ended: each run's Row (its job's state, asked of `executor`; a job unknown to it
    for `unknown_s` has failed) and the running runs' progress to `display`, then its summary (wall time:
    as seen here, or the output manifest's when longer). `actions`: dag.submit's. Returns the last rows."""
    ended = {k: "done" for k, a in actions.items() if a == "done"}
    outs, started, walls, unknown = {}, {}, {}, {}
    while True:
        ids = {k: state.runs[k]["job_id"] for k in runs if k not in ended}
        live = executor.states(list(ids.values())) if ids else {}
        now, rows = time.time(), []
        for key, run in runs.items():
            s = ended.get(key) or live[ids[key]]
            if s == "unknown":
                s = "failed" if now - unknown.setdefault(key, now) > unknown_s else "pending"
            if s == "running":
                started.setdefault(key, now)
            elif s in ("done", "failed") and key not in ended:
                ended[key] = s
                walls[key] = now - started.get(key, now)
            rec = state.runs.get(key, {})
            rows.append(Row(key, run.stage, s, rec.get("job_id"), rec.get("log")))
        progress = {}
        for r in rows:
            if r.state == "running":
                outs[r.key] = outs.get(r.key) or stages.output_dir(r.stage, runs[r.key].overrides)
                progress[r.key] = train_progress(outs[r.key])
        display.update(rows, {k: v for k, v in progress.items() if v})
        if len(ended) == len(runs):
            break
        time.sleep(poll_s)
    for key in [k for k in walls if ended[k] == "done"]:  # a job may start and end between two polls
        try:
            out = stages.output_dir(runs[key].stage, runs[key].overrides)
            walls[key] = max(walls[key], json.loads((out / "manifest.json").read_text())["wall_s"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    display.close(rows, {k: w for k, w in walls.items() if w > 0})
    return rows


def run(cfg, args) -> None:
    stages = PipelineStages()
    runs = expand(cfg, list(getattr(args, "overrides", []) or []), stages)
    state = SweepState.load(sweep_dir(cfg.choices["experiment"]) / "state.json")
    try:
        rows = collect(runs, stages, state, cfg.cluster)
    except JobError as e:
        raise SystemExit(f"error: {e}") from None
    progress = {r.key: train_progress(stages.output_dir(r.stage, runs[r.key].overrides))
                for r in rows if r.state == "running"}
    print("\n".join(block(rows, {k: v for k, v in progress.items() if v})))
    print(format_rows(rows))
