"""Train the tiny Llama on fixed rows; used by tests (kill/resume, torchrun ZeRO-3).

usage: train_tiny.py OUT_DIR [--ckpt DIR] [--kill-after-ckpt STEP] [--signal-at MICRO [--signal NAME]] [--zero N]
                     [--micro M] [key=value ...]
Writes OUT_DIR/model and OUT_DIR/result.json (loss curve, sharding facts) on rank 0. `--signal-at`: the
process sends itself SIGTERM (or --signal) during that micro-batch, after its forward pass.
"""
import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from pipeline.config import compose  # noqa: E402
from pipeline.train import trainer as T  # noqa: E402


def rows(n=32):
    words = ["apple", "river", "stone", "cloud", "green", "quick", "night", "bread"]
    out = []
    for i in range(n):
        w = words[i % len(words)]
        out.append({"instruction": f"Say the word {w} twice.", "input": "", "output": f"{w} {w}."})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--kill-after-ckpt", type=int, default=None)
    ap.add_argument("--signal-at", type=int, default=None)
    ap.add_argument("--signal", default="SIGTERM")
    ap.add_argument("--zero", type=int, default=0)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_intermixed_args()
    cfg = compose(["experiment=tiny", f"deepspeed=zero{a.zero}", f"train.micro_batch={a.micro}",
                   "train.grad_accum=1", "train.lora_dropout=0.0", "train.loss_avg=sample", "train.epochs=2", "train.lr=5e-3",
                   *a.overrides])
    if a.kill_after_ckpt is not None:
        orig = T.Trainer.save_checkpoint

        def save_then_hang(self, ckpt_dir, step, micro):
            orig(self, ckpt_dir, step, micro)
            if step == a.kill_after_ckpt:
                Path(a.out, "CKPT_READY").write_text(str(step))
                time.sleep(3600)
        T.Trainer.save_checkpoint = save_then_hang
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tr = T.Trainer(cfg)
    losses = []
    orig_fwd = tr.forward_loss

    def fwd(batch):
        loss, logs = orig_fwd(batch)
        losses.append(float(loss))
        if len(losses) == a.signal_at:
            os.kill(os.getpid(), getattr(signal, a.signal))
        return loss, logs
    tr.forward_loss = fwd
    res = tr.fit(rows(), out, a.ckpt)
    shard = {}
    if a.zero == 3:
        p = next(p for p in tr.engine.module.parameters() if hasattr(p, "ds_numel"))
        shard = {"ds_numel": int(p.ds_numel), "local_numel": int(p.ds_tensor.numel()), "world": tr.world}
    if tr.is_main:
        (out / "result.json").write_text(json.dumps({"losses": losses, "shard": shard, "steps": res.get("steps")}))


if __name__ == "__main__":
    main()
