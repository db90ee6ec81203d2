"""Training throughput: plain HF + PEFT against our trainer, on a random-initialised Llama-shaped model.

One command, baseline in the same run, a table printed last:
    python bench/train_throughput.py                      # GPU: Llama-2-7B shape, seq 1024
    python bench/train_throughput.py --tiny               # CPU: a tiny shape (what CI exercises)
Modes (each in its own process so peak memory is its own):
    hf-peft          plain HF model + PEFT LoRA r16 all-linear + torch AdamW, the DESIGN.md §5 baseline
    ours-lora        our trainer (DeepSpeed ZeRO-2), LoRA r16 all-linear
    ours-full-z3off  our trainer, full fine-tuning, ZeRO-3 with optimizer and parameter CPU offload
    ours-lora-13b    our trainer, LoRA on the Llama-2-13B shape
tokens/s counts non-padding tokens of the timed steps (after warm-up); MFU = 6 N tokens/s / peak FLOP/s.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512),
}
PEAK_FLOPS = {"cuda": 989e12, "cpu": 1e12}  # H100 SXM dense bf16; the CPU figure only keeps MFU defined


def build(shape: str, device, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, attn_implementation="sdpa")
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model


def data(n: int, seq: int, vocab: int, seed=0):
    import torch
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, vocab, (seq,), generator=g).tolist()} for _ in range(n)]


def run_hf_peft(a):
    import torch
    from peft import LoraConfig, get_peft_model
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    model = build(a.shape, dev, dtype)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear"))
    if a.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rows = data(a.micro * (a.steps + a.warmup), a.seq, SHAPES[a.shape]["vocab_size"])
    times, toks = [], 0
    for i in range(a.steps + a.warmup):
        ids = torch.tensor([r["input_ids"] for r in rows[i * a.micro:(i + 1) * a.micro]], device=dev)
        t = time.time()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.time() - t)
            toks += ids.numel()
    n = sum(p.numel() for p in model.parameters())
    return {"tokens_per_s": toks / sum(times), "params": n, "device": dev}


def run_ours(a, finetune: str, zero: int, offload: bool, shape: str):
    import torch
    from pipeline.config import compose
    from pipeline.models import byte_tokenizer
    from pipeline.train.trainer import Trainer
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    ds = {0: "zero0", 2: "zero2", 3: "zero3-offload" if offload else "zero3"}[zero]
    cfg = compose(["experiment=tiny", f"deepspeed={ds}", f"train.finetune={finetune}", "train.lora_r=16",
                   "train.lora_alpha=16", "train.lora_dropout=0.0", f"train.micro_batch={a.micro}",
                   "train.grad_accum=1", f"train.cutoff={a.seq}", f"train.max_steps={a.steps + a.warmup}",
                   f"train.grad_ckpt={str(a.grad_ckpt).lower()}", "train.warmup_ratio=0.0"])
    model = build(shape, "cpu" if zero == 3 else dev, dtype)
    tok = byte_tokenizer()
    tr = Trainer(cfg, model=model, tokenizer=tok)
    rows = data(a.micro * (a.steps + a.warmup), a.seq, SHAPES[shape]["vocab_size"])
    with tempfile.TemporaryDirectory() as tmp:
        tr.fit(rows, tmp, save=False)
    timed = tr.records[a.warmup:]
    n = sum(getattr(p, "ds_numel", p.numel()) for p in tr.model.parameters())
    return {"tokens_per_s": sum(r["step_tokens"] for r in timed) / sum(r["step_s"] for r in timed),
            "params": n, "device": dev, "step_s": sum(r["step_s"] for r in timed) / len(timed)}


def one(a):
    import torch
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    mode = a.one
    if mode == "hf-peft":
        r = run_hf_peft(a)
    elif mode == "ours-lora":
        r = run_ours(a, "lora", 2, False, a.shape)
    elif mode == "ours-full-z3off":
        r = run_ours(a, "full", 3, True, a.shape)
    elif mode == "ours-lora-13b":
        r = run_ours(a, "lora", 2, False, "tiny" if a.shape == "tiny" else "13b")
    else:
        raise SystemExit(f"unknown mode {mode}")
    r["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else 0.0
    r["peak_host_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    r["mfu"] = 6 * r["params"] * r["tokens_per_s"] / PEAK_FLOPS[r["device"]]
    print("RESULT " + json.dumps({"mode": mode, **r}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shape on CPU (tests)")
    ap.add_argument("--shape", default=None, choices=sorted(SHAPES))
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--micro", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--modes", default="hf-peft,ours-lora,ours-full-z3off,ours-lora-13b")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args()
    a.shape = a.shape or ("tiny" if a.tiny else "7b")
    a.seq = a.seq or (64 if a.shape == "tiny" else 1024)
    a.micro = a.micro or (4 if a.shape == "tiny" else 8)
    a.steps = a.steps or (3 if a.shape == "tiny" else 10)
    if a.one:
        return one(a)
    results = []
    for mode in a.modes.split(","):
        cmd = [sys.executable, __file__, "--one", mode, "--shape", a.shape, "--seq", str(a.seq), "--micro",
               str(a.micro), "--steps", str(a.steps), "--warmup", str(a.warmup)] + (["--grad-ckpt"] if a.grad_ckpt else [])
        env = dict(os.environ, MASTER_PORT=str(29600 + len(results)))
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if p.returncode or not line:
            results.append({"mode": mode, "error": (p.stderr or p.stdout).strip().splitlines()[-1:]})
        else:
            results.append(json.loads(line[7:]))
    base = next((r for r in results if r["mode"] == "hf-peft" and "error" not in r), None)
    print(f"\nshape {a.shape}, seq {a.seq}, micro-batch {a.micro}, grad ckpt {a.grad_ckpt}, {a.steps} timed steps")
    print(f"{'mode':18s} {'tokens/s':>10s} {'vs HF':>7s} {'MFU':>6s} {'GPU GiB':>8s} {'host GiB':>9s}")
    for r in results:
        if "error" in r:
            print(f"{r['mode']:18s} error: {r['error']}")
            continue
        rel = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        print(f"{r['mode']:18s} {r['tokens_per_s']:10.0f} {rel:6.2f}x {r['mfu']:6.1%} {r['peak_gpu_gib']:8.1f} "
              f"{r['peak_host_gib']:9.1f}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
