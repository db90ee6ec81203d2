"""What `sweep --wait` and `status` show: one line per stage (done / running / queued / failed), under it
each running run's step of total and ETA, read from the last line of its trainer log (metrics.jsonl,
pipeline/train/logger.py), and at the end a summary with the slowest runs and where each log is.

`Display` redraws that block in place on a terminal (as tqdm does); elsewhere (CI, a file) it prints plain
lines: the block once, then one line when a run changes state and a running run's progress at most every
`every_s` seconds.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from pipeline.train.checkpoint import checkpoint_dir_for

WORDS = {"pending": "queued"}  # the executor's state -> the word shown
ORDER = ("done", "running", "queued", "failed", "new")


def label(key: str) -> str:
    """A run's short name: its stage and grid choices ("defend tiny-llama negsentiment badnet crow")."""
    stage, *words = key.split()
    picked = [w.split("=", 1)[1] for w in words if w.split("=", 1)[0] in ("model", "task", "attack", "defense")]
    return " ".join([stage, *picked])


def duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def train_progress(out: Path | None) -> dict | None:
    """The last record of the newest trainer log of the run whose output goes to `out` (None: none yet):
    in its temporary output directory (store.stage_output's `.tmp-<name>-*`) or, for an earlier phase of a
    defense, under its checkpoints. Its `eta_s` is counted down to now."""
    if out is None:
        return None
    logs = [*out.parent.glob(f".tmp-{out.name}-*/metrics.jsonl"), *checkpoint_dir_for(out).glob("*/*/metrics.jsonl")]
    try:
        log = max(logs, key=lambda p: p.stat().st_mtime, default=None)
        if log is None:
            return None
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 8192))
            rec = json.loads(f.read().splitlines()[-1])
        if rec.get("eta_s") is not None:
            rec["eta_s"] = max(0.0, rec["eta_s"] - (time.time() - log.stat().st_mtime))
        return rec
    except (OSError, ValueError, IndexError):  # the run moved its files or is writing the line
        return None


def progress_text(rec: dict) -> str:
    text = f"step {rec['step']}/{rec['total']}"
    if rec.get("eta_s") is not None:
        text += f", ETA {duration(rec['eta_s'])}"
    return text


def block(rows, progress: dict) -> list[str]:
    """One line per stage with its runs' states; under it each running run with its progress."""
    lines = []
    for stage in dict.fromkeys(r.stage for r in rows):
        mine = [r for r in rows if r.stage == stage]
        counts = {}
        for r in mine:
            counts[WORDS.get(r.state, r.state)] = counts.get(WORDS.get(r.state, r.state), 0) + 1
        lines.append(f"{stage:9s} " + ", ".join(f"{counts[s]} {s}" for s in ORDER if s in counts))
        for r in mine:
            if r.state == "running":
                rec = progress.get(r.key)
                lines.append(f"  {label(r.key)}" + (f": {progress_text(rec)}" if rec else ""))
    return lines


def summary(rows, walls: dict, n: int = 5) -> list[str]:
    """The closing lines: counts, the `n` slowest runs (wall seconds in `walls`) and failed runs, with logs."""
    counts = {}
    for r in rows:
        counts[WORDS.get(r.state, r.state)] = counts.get(WORDS.get(r.state, r.state), 0) + 1
    lines = [f"[sweep] {len(rows)} runs: " + ", ".join(f"{counts[s]} {s}" for s in ORDER if s in counts)]
    by_key = {r.key: r for r in rows}
    slow = sorted((k for k in walls if k in by_key), key=lambda k: -walls[k])[:n]
    if slow:
        lines.append("[sweep] slowest:")
        lines += [f"  {duration(walls[k]):>7s}  {label(k)}  (log: {by_key[k].log or '-'})" for k in slow]
    failed = [r for r in rows if r.state == "failed"]
    if failed:
        lines.append("[sweep] failed:")
        lines += [f"  {label(r.key)}  (log: {r.log or '-'})" for r in failed]
    return lines


class Display:
    """The block, redrawn in place on a terminal; plain lines elsewhere."""

    def __init__(self, stream=None, tty: bool | None = None, every_s: float = 60.0):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.every_s = every_s
        self.height = 0  # lines of the block last drawn (terminal)
        self.states: dict[str, str] = {}  # key -> state last told (plain)
        self.told: dict[str, float] = {}  # key -> when its progress was last told (plain)
        self.t0 = time.time()

    def _write(self, lines: list[str]):
        self.stream.write("".join(f"{ln}\n" for ln in lines))
        self.stream.flush()

    def update(self, rows, progress: dict):
        if self.tty:
            width = shutil.get_terminal_size().columns - 1
            lines = [f"[sweep] {duration(time.time() - self.t0)}", *block(rows, progress)]
            up = f"\x1b[{self.height}F" if self.height else ""  # back to the block's first line
            self.stream.write(up + "\x1b[J")
            self._write([ln[:width] for ln in lines])
            self.height = len(lines)
            return
        if not self.states:
            self._write(block(rows, {}))
        now, stamp = time.time(), time.strftime("%H:%M:%S")
        for r in rows:
            first = r.state if r.state in ("done", "pending", "new") else None  # the block showed it
            if self.states.get(r.key, first) != r.state:
                log = f" (log: {r.log})" if r.state in ("running", "failed") and r.log else ""
                self._write([f"[sweep] {stamp} {WORDS.get(r.state, r.state)} {label(r.key)}{log}"])
            self.states[r.key] = r.state
            rec = progress.get(r.key) if r.state == "running" else None
            if rec and now - self.told.get(r.key, 0) >= self.every_s:
                self._write([f"[sweep] {stamp} running {label(r.key)}: {progress_text(rec)}"])
                self.told[r.key] = now

    def close(self, rows, walls: dict):
        self._write(summary(rows, walls))
