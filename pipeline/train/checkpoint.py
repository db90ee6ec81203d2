"""Training checkpoints that survive a kill at any moment, and the signals that ask for one.

On disk, `ckpt_dir/` (next to the stage output: `checkpoint_dir_for`) holds one complete checkpoint,
`step<N>/` (DeepSpeed's engine files: model and plugin tensors, optimizer, schedule; `rng_rank<r>.pt` per
rank; `state.json`: step, micro-batch, world size), and `latest`, naming it. Every rank writes into
`.tmp-step<N>/`; rank 0 then `commit`s: writes `state.json`, fsyncs, renames the directory into place,
rewrites `latest` atomically and deletes every older checkpoint. A directory without `state.json` was cut
short and is never loaded (`find`).

Signals (`catch_signals`, in every rank): Slurm's pre-timeout signal (USR2: `--signal=USR2@signal_delay_s`,
as submitit asks for it) and SIGTERM (preemption, `scontrol requeue`, `scancel`) only record that they
came. The trainer acts at its next optimizer-step boundary, where the ranks agree (one all-reduce of
`pending()`): they save one checkpoint together, then `hand_over` gives the signal to the handler that was
there before: under submitit, USR2 on rank 0 requeues the job and exits (a requeued job resumes from the
checkpoint); after SIGTERM, Slurm requeues a preempted job itself. Without such a handler the process
exits with 128 + the signal's number, and a rerun resumes.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

STATE = "state.json"
SIGNALS = (signal.SIGTERM, signal.SIGUSR2)  # pending() codes 1, 2: the larger wins when both came

_caught: list[int] = []  # signals received and not yet acted on
_previous: dict[int, object] = {}  # signal -> the handler catch_signals replaced


def _record(signum, frame):
    _caught.append(signum)  # nothing else here: a save inside a handler would cut a step in half


def catch_signals():
    """Record SIGTERM and USR2 instead of acting on them (until `release_signals`)."""
    for s in SIGNALS:
        if s in _previous:
            continue
        try:
            old = signal.signal(s, _record)
        except ValueError:  # not the main thread: the process's own handlers stay
            return
        if old is signal.SIG_IGN:  # ignored on purpose: keep it so
            signal.signal(s, old)
        else:
            _previous[s] = old


def release_signals():
    for s, old in _previous.items():
        signal.signal(s, old)
    _previous.clear()


def pending() -> int:
    """0 (no signal), 1 (SIGTERM) or 2 (USR2, submitit's: save and requeue)."""
    return max((SIGNALS.index(s) + 1 for s in _caught), default=0)


def pending_name() -> str | None:
    code = pending()
    return signal.Signals(SIGNALS[code - 1]).name if code else None


def hand_over(code: int, main: bool, wait_s: float = 120.0):
    """Leave after the checkpoint of signal `code` (pending()'s, agreed by all ranks): the signal goes to
    the handler that was there before, then the process exits."""
    signum = SIGNALS[code - 1]
    old = _previous.get(signum, signal.SIG_DFL)
    release_signals()
    _caught.clear()
    print(f"[train] {signal.Signals(signum).name}: checkpoint saved, stopping", flush=True)
    if callable(old):
        try:
            old(signum, None)  # submitit's USR2 handler: rank 0 requeues the job and exits; other ranks return
        except subprocess.CalledProcessError as e:  # `scontrol requeue`, killed by the very requeue it asked for
            print(f"[train] {e}: if the job was not requeued, submit it again: it resumes from the checkpoint",
                  flush=True)
        if signum == signal.SIGUSR2 and not main:
            time.sleep(wait_s)  # as submitit asks: leave the ending to rank 0's requeue (Slurm ends this task)
    raise SystemExit(128 + signum)


# ------------------------------------------------------------------------------------------ on disk
def checkpoint_dir_for(final: Path) -> Path:
    """Deterministic checkpoint location next to a stage output, so a rerun of the same run resumes."""
    return Path(final).parent / f".ckpt-{Path(final).name}"


def cleanup_checkpoints(final: Path):
    shutil.rmtree(checkpoint_dir_for(final), ignore_errors=True)


def _fsync(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def commit(ckpt_dir: Path, tmp: Path, state: dict):
    """Rank 0, once every rank's files are in `tmp` (`.tmp-<tag>`): make it the checkpoint `<tag>`."""
    tag = tmp.name[len(".tmp-"):]
    _write_atomic(tmp / STATE, json.dumps(state))
    for p in tmp.rglob("*"):
        if p.is_file():
            _fsync(p)
    _fsync(tmp)
    final = ckpt_dir / tag
    if final.exists():  # the same step saved again after an earlier resume
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic(ckpt_dir / "latest", tag)
    _fsync(ckpt_dir)
    for p in ckpt_dir.iterdir():  # older checkpoints, and any cut short
        if p.is_dir() and p.name != tag and (p.name.startswith("step") or p.name.startswith(".tmp-")):
            shutil.rmtree(p, ignore_errors=True)
    print(f"[train] checkpoint {final} written", flush=True)


def _step(tag: str) -> int:
    return int(tag[len("step"):]) if tag[len("step"):].isdigit() else -1


def find(ckpt_dir: Path | None) -> tuple[str, dict] | None:
    """(tag, state) of the newest complete checkpoint in `ckpt_dir`, or None."""
    if not (ckpt_dir and Path(ckpt_dir).is_dir()):
        return None
    for d in sorted(Path(ckpt_dir).glob("step*"), key=lambda p: _step(p.name), reverse=True):
        if (d / STATE).is_file():
            return d.name, json.loads((d / STATE).read_text())
        print(f"[train] {d}: incomplete checkpoint, ignored")
    print(f"[train] {ckpt_dir}: no complete checkpoint (holds: {sorted(p.name for p in Path(ckpt_dir).iterdir())})",
          flush=True)
    return None
