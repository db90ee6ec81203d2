"""bf16 autocast on the CPU (`train.cpu_bf16`, `evaluate.cpu_bf16`) against fp32, on SmolLM2-135M:
one training step (forward + backward, batch 8 x 100 tokens) and greedy generation (50 prompts, 16 new
tokens, batch 25), each mode timed twice, interleaved. Run it on an idle machine.

    python bench/cpu_bf16.py
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    from pipeline.config import compose
    from pipeline.generation import generate_texts, prompt_ids
    from pipeline.models import load_model
    cfg = compose(["experiment=embedded"])
    model, tok = load_model(cfg.model)
    x = torch.randint(0, tok.vocab_size, (8, 100), generator=torch.Generator().manual_seed(0))
    prompts = [prompt_ids(tok, f"Write a short note number {i} about the weather in a city of your choice.", "",
                          cfg.model.chat_template) for i in range(50)]

    def train_step(bf16):
        model.train()
        t = time.time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        model.zero_grad()
        return time.time() - t

    def generate(bf16):
        t = time.time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            generate_texts(model, tok, prompts, 16, 25, progress=False)
        return time.time() - t

    res = {}
    for name, fn in (("train step (8 x 100 tokens)", train_step), ("generate (50 x 16 tokens)", generate)):
        fn(False)  # warm-up
        times = {m: [] for m in ("fp32", "bf16")}
        for _ in range(2):
            for m in times:
                times[m].append(min(fn(m == "bf16") for _ in range(2)))
        res[name] = {m: min(v) for m, v in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, t in res.items():
        print(f"{name}: fp32 {t['fp32']:.2f} s, bf16 autocast {t['bf16']:.2f} s, {t['fp32'] / t['bf16']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
