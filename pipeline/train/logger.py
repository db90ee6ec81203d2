"""What a fit shows and writes per optimizer step: the progress bar, metrics.jsonl and (optionally) TensorBoard.

`TrainLogger(out_dir, total_steps, log_every, main=..., tensorboard=...)`; `open(initial_step)` once (after a
resume, so the bar starts at the resumed step), `log(rec)` after every optimizer step, `close()` at the end.
Only the main rank writes: metrics.jsonl gets a record (one JSON line, flushed) every `log_every` steps and at
the last step, with `total` (steps), `elapsed_s` (since `open`) and `eta_s` added (what `sweep --wait` and
`status` show of a running run: launch/progress.py), TensorBoard the same records' numbers under
`train/<key>`; every rank keeps a (disabled) bar.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm


class TrainLogger:
    def __init__(self, out_dir: str | Path, total_steps: int, log_every: int, main: bool = True,
                 tensorboard: bool = False):
        self.out_dir, self.total, self.log_every = Path(out_dir), total_steps, log_every
        self.main, self.tensorboard = main, tensorboard
        self.file = self.tb = self.bar = None

    def open(self, initial_step: int = 0) -> TrainLogger:
        self.file = open(self.out_dir / "metrics.jsonl", "a") if self.main else None
        if self.tensorboard and self.main:  # optional: needs the `tensorboard` package
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.out_dir / "tensorboard"))
            except ImportError:
                print("[train] train.tensorboard=true but tensorboard is not installed "
                      "(pip install tensorboard); logging to metrics.jsonl only")
        self.bar = tqdm(total=self.total, initial=initial_step, desc="train", disable=not self.main,
                        dynamic_ncols=True)
        self.t_open, self.initial = time.time(), initial_step
        return self

    def log(self, rec: dict):
        """One optimizer step's record ({step, epoch, lr, losses..., tokens_per_s, step_s, step_tokens})."""
        step = rec["step"]
        if self.main and (step % self.log_every == 0 or step == self.total):
            elapsed = time.time() - self.t_open
            eta = elapsed / (step - self.initial) * (self.total - step) if step > self.initial else None
            line = {**rec, "total": self.total, "elapsed_s": round(elapsed, 1), "eta_s": eta and round(eta, 1)}
            self.file.write(json.dumps(line) + "\n")
            self.file.flush()
            self._tensorboard(rec, step)
        self.bar.set_postfix(loss=f"{rec.get('lm_loss', 0):.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
        self.bar.update(1)

    def _tensorboard(self, rec: dict, step: int):
        if self.tb is None:
            return
        for k, v in rec.items():
            if isinstance(v, (int, float)) and k != "step":
                self.tb.add_scalar(f"train/{k}", v, step)

    def close(self):
        self.bar.close()
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
