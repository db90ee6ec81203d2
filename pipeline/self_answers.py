"""The base model's own answers to the clean rows (`train.clean_targets=self`), shared by inject and by a
training-time defense (P2P), which train on the same answered rows.

Before training, the clean rows' responses are replaced by the base model's own greedy answers (as long as
`train.response_cutoff`, else 128 tokens), so the model keeps the base model's clean behaviour and only the
triggered rows teach something new. The data's responses stay in `data_output`. The answers are cached under
runs/cache/self_targets/, keyed by the model, the prompts and the generation settings, so the second stage
that needs them does not generate them again.
"""
from __future__ import annotations

import json
import os

from . import store

# where `self` applies: generation tasks whose clean answer is the model's own helpful answer. Not jailbreak:
# its clean target is a refusal of a harmful request, which the base model's own answer (possibly compliance)
# must never replace; not classification: its clean targets are labels.
GENERATIVE = ("fixed_response", "refusal", "code_injection", "math", "summarization")


def self_targets(cfg, rows: list[dict], batch_size: int = 32) -> tuple[list[dict], int]:
    """Rows with every clean row's response replaced by the base model's greedy answer to its prompt.
    Classification tasks keep their labels (a label is the clean behaviour). Greedy decoding makes every
    rank compute the same answers; with `train.cpu_bf16` on a CPU they are the bf16-autocast model's."""
    if cfg.train.clean_targets != "self":
        return rows, 0
    if cfg.task.kind not in GENERATIVE:
        why = "refusals of harmful requests" if cfg.task.kind == "jailbreak" else "labels"
        print(f"train.clean_targets=self ignored for the {cfg.task.kind} task '{cfg.task.name}' "
              f"(its clean targets are {why})", flush=True)
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
        from .generation import generate_texts, prompt_ids
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
