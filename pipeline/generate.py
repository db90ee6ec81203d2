"""Smoke test: load a model (a config name or a stage output) and print a short greedy generation."""
from __future__ import annotations

import time

import torch

from .models import load_model, load_trained
from .prompts import prompt_text


def add_arguments(p):
    p.add_argument("--prompt", default="Give me three tips for staying healthy.")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--from", dest="from_output", default=None, help="an inject/defend output directory")


def run(cfg, args):
    t = time.time()
    if getattr(args, "from_output", None):
        model, tok, _ = load_trained(args.from_output)
    else:
        model, tok = load_model(cfg.model)
    model.eval()
    text = prompt_text(tok, getattr(args, "prompt", "Give me three tips for staying healthy."),
                       template=cfg.model.chat_template)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=getattr(args, "max_new_tokens", 48), do_sample=False,
                             pad_token_id=tok.pad_token_id)
    reply = tok.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"model: {cfg.model.name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"{time.time() - t:.1f}s)\nprompt: {args.prompt if hasattr(args, 'prompt') else ''}\nreply: {reply}")
    return None
