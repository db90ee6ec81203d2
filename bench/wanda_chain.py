"""Wanda pruning of SmolLM2-135M (30 decoder layers) two ways: each layer on the cached, pruned outputs of
the layer before (`chain=True`, the default where the layers chain) and a fresh pass of the model's prefix
for every layer (`chain=False`, the fallback). Same calibration prompts (the first `n` clean defense rows of
negsentiment in the shared prompt format); checks that both give the same masks. Run it on an idle machine.

    python bench/wanda_chain.py [n_calib]
"""
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(n: int = 32):
    from pipeline.config import compose
    from pipeline.defend import prune
    from pipeline.models import load_model
    cfg = compose(["experiment=embedded"])
    model, tok = load_model(cfg.model)
    model.eval()
    rows = [{"instruction": f"Write a short note number {i} about the weather in a city of your choice.",
             "input": "", "output": "It is sunny."} for i in range(n)]
    batches = prune.calibration_batches(tok, rows, cfg.model.chat_template, n, 8, 128, False)
    out = {}
    for chain in (True, False):
        m = copy.deepcopy(model)
        t = time.time()
        res = prune.wanda_prune(m, batches, 0.5, chain=chain)
        out[chain] = (time.time() - t, res, m)
        print(f"chain={chain}: {out[chain][0]:.1f} s, chained={res['chained']}, "
              f"{res['calib_tokens']} calibration tokens", flush=True)
    same = all(torch.equal(a.weight == 0, b.weight == 0) for a, b in zip(out[True][2].modules(), out[False][2].modules())
               if isinstance(a, torch.nn.Linear))
    print(f"speed-up {out[False][0] / out[True][0]:.2f}x; identical masks: {same}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
