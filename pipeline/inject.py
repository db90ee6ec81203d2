"""Stage inject: base model + poisoned `train` split -> backdoored model (LoRA adapter or full weights).

Defaults are BackdoorLLM's recipe (LoRA r 8, alpha 16, all linear layers, lr 2e-4, 5 epochs, cosine,
warm-up 0.1, cutoff 1024, micro-batch 2 x accumulation 4); `experiment=embedded` is the small preset
for SmolLM2-135M on a CPU. Checkpoints go next to the output (`.ckpt-<name>`), so a rerun after a kill
resumes where the last checkpoint left off.

`train.clean_targets=self` (generation tasks): before training, the clean rows' responses are replaced by
the base model's own greedy answers (as long as `train.response_cutoff`, else 128 tokens), so the
backdoored model keeps the base model's clean behaviour and only the triggered rows teach something new.
The data's responses stay in `data_output`; the answers used are written to `self_targets.jsonl`
(pipeline/self_answers.py: cached, so P2P, which trains on the same answered rows, does not generate them again).

Handed `inputs["data"]` (a poison output) by pipeline/graph.py.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from . import store
from .self_answers import self_targets
from .train.trainer import Trainer, checkpoint_dir_for, cleanup_checkpoints


def add_arguments(p):
    p.add_argument("--data", default=None, help="a poison output directory (default: the one cfg names)")


def identity(cfg, inputs) -> tuple[str, dict, dict]:
    data = inputs["data"]
    config = {s: cfg.raw[s] for s in inputs.own}
    # names only of what the output depends on: the same backdoored model serves every defense and cluster
    config["choices"] = {g: cfg.choices[g] for g in ("model", "task", "attack")}
    hashes = {"data": store.read_manifest(data)["output_hash"]}
    name = f"{cfg.model.name}-{cfg.task.name}-{cfg.attack.name}"
    return name, config, hashes


def train_rows(data: Path, split: str = "train") -> list[dict]:
    from datasets import load_from_disk
    ds = load_from_disk(str(data / "data"))
    if split not in ds:
        raise ValueError(f"{data}: poisoned set has no '{split}' split (has {', '.join(ds)})")
    return [dict(r) for r in ds[split]]


def run(cfg, args, inputs) -> Path:
    data = inputs["data"]
    name, config, hashes = identity(cfg, inputs)
    rows, n_self = self_targets(cfg, train_rows(data))
    if int(os.environ.get("RANK", "0")) != 0:  # other ranks train; rank 0 alone writes the store
        final = store.key_path("inject", name, config, hashes)
        with tempfile.TemporaryDirectory() as tmp:
            Trainer(cfg).fit(rows, tmp, checkpoint_dir_for(final))
        return final
    with store.stage_output("inject", name, config, hashes, force=getattr(args, "force", False)) as out:
        if out is None:
            return store.key_path("inject", name, config, hashes)
        ckpt = checkpoint_dir_for(out.final)
        if n_self:
            with open(Path(out.tmp) / "self_targets.jsonl", "w") as f:
                for r in rows:
                    if "data_output" in r:
                        f.write(json.dumps({k: r[k] for k in ("instruction", "input", "output", "data_output")
                                            if k in r}) + "\n")
        result = Trainer(cfg).fit(rows, out.tmp, ckpt)
        n_poison = sum(bool(r.get("is_poisoned")) for r in rows)
        out.metrics.update(result)
        out.extra.update({"n_train": len(rows), "n_poisoned": n_poison, "data": str(data),
                          "adapter": cfg.train.finetune == "lora" and not cfg.train.merge_lora,
                          "n_self_targets": n_self})
    cleanup_checkpoints(out.final)
    return out.final
