"""Does SANDE's learned parrot simulate the trigger? On clean test prompts, how often does the frozen
backdoored model emit the triggered response r_t with the parrot spliced in (where stage 1 put it), without
it, and the clean base model with the same parrot.

    python bench/sande_parrot.py --defend runs/defend/<...-sande-...> [--n 100] [--max-new-tokens 16]

Reads the parrot from the sande output (`simulate.extra.safetensors`), the backdoored model from the
output's manifest (`backdoored_model`), the clean prompts from its poisoned set (`data`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import store  # noqa: E402
from pipeline.config import compose_model  # noqa: E402
from pipeline.evaluate.metrics import wilson  # noqa: E402
from pipeline.models import load_model, load_trained  # noqa: E402
from pipeline.prompts import prompt_text, user_start  # noqa: E402


@torch.no_grad()
def rate(model, tok, prompts, target: str, parrot, pos: int, max_new: int) -> tuple[int, int]:
    hits = 0
    emb_layer = model.get_input_embeddings()
    for p in prompts:
        ids = tok(p, return_tensors="pt", add_special_tokens=False)["input_ids"]
        emb = emb_layer(ids)
        if parrot is not None:
            emb = torch.cat([emb[:, :pos], parrot.to(emb.dtype).unsqueeze(0), emb[:, pos:]], dim=1)
        mask = torch.ones(emb.shape[:2], dtype=torch.long)
        out = model.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0], skip_special_tokens=True)
        hits += target.lower() in text.lower()
    return hits, len(prompts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--defend", required=True)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--target", default=None, help="default: the task's target (config of the output)")
    a = ap.parse_args()
    out = store.require_complete(Path(a.defend), "sande output")
    man, cfg = store.read_manifest(out), store.read_config(out)
    from safetensors.torch import load_file
    parrot = load_file(str(out / "simulate.extra.safetensors"))["parrot__vectors"]
    target = a.target or cfg["task"].get("target") or cfg["task"].get("target_label")
    from datasets import load_from_disk
    rows = load_from_disk(str(Path(man["data"]) / "data"))["test_clean"]
    rows = [rows[i] for i in range(min(a.n, len(rows)))]
    mcfg = compose_model(cfg["model"])
    bd, tok, _ = load_trained(man["backdoored_model"])
    bd.eval()
    prompts = [prompt_text(tok, r["instruction"], r["input"], mcfg.chat_template) for r in rows]
    pos = man.get("parrot", {}).get("position", user_start(tok, mcfg.chat_template))
    res = {}
    res["backdoored + parrot"] = rate(bd, tok, prompts, target, parrot, pos, a.max_new_tokens)
    res["backdoored, no parrot"] = rate(bd, tok, prompts, target, None, pos, a.max_new_tokens)
    base, btok = load_model(mcfg)
    base.eval()
    res["clean base + parrot"] = rate(base, btok, prompts, target, parrot, pos, a.max_new_tokens)
    print(f"r_t = {target!r}, {len(prompts)} clean prompts, {a.max_new_tokens} new tokens, parrot at token {pos}")
    print(f"{'model':24s} {'emits r_t':>10s}  95% CI")
    for k, (h, n) in res.items():
        lo, hi = wilson(h, n)
        print(f"{k:24s} {h:4d}/{n:<4d}  [{lo:.3f}, {hi:.3f}]")
    print(json.dumps({k: v[0] / v[1] for k, v in res.items()}))


if __name__ == "__main__":
    main()
