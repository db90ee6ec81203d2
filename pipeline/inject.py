"""Stage inject: base model + poisoned `train` split -> backdoored model (LoRA adapter or full weights).

Defaults are BackdoorLLM's recipe (LoRA r 8, alpha 16, all linear layers, lr 2e-4, 5 epochs, cosine,
warm-up 0.1, cutoff 1024, micro-batch 2 x accumulation 4); `experiment=embedded` is the small preset
for SmolLM2-135M on a CPU. Checkpoints go next to the output (`.ckpt-<name>`), so a rerun after a kill
resumes where the last checkpoint left off.

`train.clean_targets=self` (generation tasks): before training, the clean rows' responses are replaced by
the base model's own greedy answers (as long as `train.response_cutoff`, else 128 tokens), so the
backdoored model keeps the base model's clean behaviour and only the triggered rows teach something new.
The data's responses stay in `data_output`; the answers used are written to `self_targets.jsonl`. The
answers are cached under runs/cache/self_targets/, keyed by the model, the prompts and the generation
settings, so P2P (which trains on the same answered rows) does not generate them again.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from . import store
from .train.trainer import Trainer, checkpoint_dir_for, cleanup_checkpoints

SECTIONS = ("model", "train", "deepspeed", "task", "attack")


def add_arguments(p):
    p.add_argument("--data", default=None, help="a poison output directory (default: the one cfg names)")


def _data_dir(cfg, args) -> Path:
    if getattr(args, "data", None):
        return store.require_complete(Path(args.data), "poisoned set")
    from .poison.stage import output_dir as poison_output_dir
    return store.require_complete(poison_output_dir(cfg), "poisoned set")


def _key(cfg, data: Path):
    config = {s: cfg.raw[s] for s in SECTIONS}
    # names only of what the output depends on: the same backdoored model serves every defense and cluster
    config["choices"] = {g: cfg.choices[g] for g in ("model", "task", "attack")}
    inputs = {"data": store.read_manifest(data)["output_hash"]}
    name = f"{cfg.model.name}-{cfg.task.name}-{cfg.attack.name}"
    return name, config, inputs


def output_dir(cfg, args=None) -> Path:
    data = _data_dir(cfg, args)
    name, config, inputs = _key(cfg, data)
    return store.output_path("inject", name, {"stage": "inject", "config": config, "inputs": inputs, "extra": None})


def train_rows(data: Path, split: str = "train") -> list[dict]:
    from datasets import load_from_disk
    ds = load_from_disk(str(data / "data"))
    if split not in ds:
        raise ValueError(f"{data}: poisoned set has no '{split}' split (has {', '.join(ds)})")
    return [dict(r) for r in ds[split]]


GENERATIVE = ("fixed_response", "refusal", "code_injection", "jailbreak", "math", "summarization")


def self_targets(cfg, rows: list[dict], batch_size: int = 32) -> tuple[list[dict], int]:
    """Rows with every clean row's response replaced by the base model's greedy answer to its prompt.
    Classification tasks keep their labels (a label is the clean behaviour). Greedy decoding makes every
    rank compute the same answers; with `train.cpu_bf16` on a CPU they are the bf16-autocast model's."""
    if cfg.train.clean_targets != "self":
        return rows, 0
    if cfg.task.kind not in GENERATIVE:
        print(f"inject: train.clean_targets=self ignored for the {cfg.task.kind} task '{cfg.task.name}' "
              "(its clean targets are labels)", flush=True)
        return rows, 0
    import torch

    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    clean = [i for i, r in enumerate(rows) if not r.get("is_poisoned")]
    max_new = cfg.train.response_cutoff or 128
    key = store.canonical_hash({"model": cfg.raw["model"], "prompts": [[rows[i]["instruction"], rows[i].get("input")]
                                                                       for i in clean],
                                "max_new_tokens": max_new, "batch_size": batch_size,
                                "cpu_bf16": bool(cfg.train.cpu_bf16) and device == "cpu", "device": device[:4]})
    cache = store.runs_root() / "cache" / "self_targets" / f"{cfg.model.name}-{key[:16]}.json"
    if cache.is_file():  # the same answers, already generated (inject and P2P both need them)
        answers = json.loads(cache.read_text())["answers"]
        print(f"inject: the base model's clean answers from {cache}", flush=True)
    else:
        from .evaluate.generate import generate_texts, prompt_ids
        from .models import cpu_bf16, load_model
        model, tok = load_model(cfg.model, device=device)
        prompts = [prompt_ids(tok, rows[i]["instruction"], rows[i].get("input"), cfg.model.chat_template)
                   for i in clean]
        with cpu_bf16(cfg.train.cpu_bf16):
            answers = generate_texts(model, tok, prompts, max_new, batch_size,
                                     desc="inject: base model's own clean answers")
        del model
        if device != "cpu":
            torch.cuda.empty_cache()  # the trainer loads the model again next
        # whole or absent; every rank writes the same answers
        store.write_json_atomic(cache, {"key": key, "model": cfg.model.name, "answers": answers})
    out = [dict(r) for r in rows]
    for i, a in zip(clean, answers):
        out[i]["data_output"], out[i]["output"] = out[i]["output"], a
    return out, len(clean)


def run(cfg, args) -> Path:
    data = _data_dir(cfg, args)
    name, config, inputs = _key(cfg, data)
    rows, n_self = self_targets(cfg, train_rows(data))
    if int(os.environ.get("RANK", "0")) != 0:  # other ranks train; rank 0 alone writes the store
        final = store.output_path("inject", name, {"stage": "inject", "config": config, "inputs": inputs,
                                                   "extra": None})
        with tempfile.TemporaryDirectory() as tmp:
            Trainer(cfg).fit(rows, tmp, checkpoint_dir_for(final))
        return final
    with store.stage_output("inject", name, config, inputs, force=getattr(args, "force", False)) as out:
        if out is None:
            return output_dir(cfg, args)
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
