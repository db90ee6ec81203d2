"""Generation throughput: plain `model.generate` vs the evaluate stage's fast path, same model, same batches.

    python bench/eval_throughput.py            # Llama-2-7B shape, bf16, on the GPU (random init)
    python bench/eval_throughput.py --tiny     # tiny Llama shape on the CPU (seconds)

Baseline: prompts in their given order, left-padded batches, `model.generate` with the default dynamic KV
cache. Fast path: `pipeline.generation.generate_ids`: length-bucketed batches (sorted by prompt length,
order restored) and, on CUDA, a static KV cache with torch.compile (CUDA graphs). Both decode exactly
--new-tokens tokens per prompt (EOS suppressed), greedy. The fast path is warmed up (compiled) on one batch
first; that time is shown apart. Prints a table last.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.generation import generate_ids, left_pad  # noqa: E402

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=260, max_position_embeddings=512),
}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shape on the CPU, small defaults")
    p.add_argument("--shape", default=None, choices=sorted(SHAPES))
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--prompts", type=int, default=None, help="number of prompts")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--min-len", type=int, default=None, help="shortest prompt (tokens)")
    p.add_argument("--max-len", type=int, default=None, help="longest prompt (tokens)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="static cache + torch.compile in the fast path (default: on CUDA)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--repeats", type=int, default=None, help="timed runs of each path; the best counts")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    small = a.tiny
    a.shape = a.shape or ("tiny" if small else "llama2-7b")
    a.device = a.device or ("cpu" if small or not torch.cuda.is_available() else "cuda")
    a.dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    a.prompts = a.prompts or (48 if small else 256)
    a.batch = a.batch or (8 if small else 64)
    a.new_tokens = a.new_tokens or (16 if small else 128)
    a.min_len = a.min_len or (8 if small else 32)
    a.max_len = a.max_len or (160 if small else 512)
    a.repeats = a.repeats or (3 if small else 1)
    a.compile = a.device.startswith("cuda") if a.compile is None else a.compile
    return a


def build_model(shape: str, device: str, dtype: torch.dtype, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**SHAPES[shape], pad_token_id=0, bos_token_id=1, eos_token_id=2)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.generation_config.pad_token_id = 0
    return model.eval()


@torch.no_grad()
def plain(model, prompts, batch, new_tokens):
    """The baseline: given order, left padding, plain `generate` (dynamic cache)."""
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(prompts), batch):
        enc = left_pad(prompts[s:s + batch], 0, device)
        gen = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
        out += gen[:, enc["input_ids"].shape[1]:].tolist()
    return out


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    a = parse(argv)
    dtype = getattr(torch, a.dtype)
    rng = random.Random(a.seed)
    model = build_model(a.shape, a.device, dtype, a.seed)
    vocab = SHAPES[a.shape]["vocab_size"]
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(a.min_len, a.max_len))] for _ in range(a.prompts)]
    n_params = sum(p.numel() for p in model.parameters())

    plain(model, prompts[:2], 2, 2)  # CUDA context, kernels
    sync(a.device)
    t = time.time()  # fast-path warm-up: one full batch of the longest prompts (compiles the decode step once)
    longest = sorted(prompts, key=len, reverse=True)[:a.batch]
    generate_ids(model, longest, 0, a.new_tokens, a.batch, static_cache_compile=a.compile, progress=False,
                 min_new_tokens=a.new_tokens)
    sync(a.device)
    t_warm = time.time() - t
    t_plain = t_fast = float("inf")
    for _ in range(a.repeats):  # alternate, keep the best of each
        t = time.time()
        base = plain(model, prompts, a.batch, a.new_tokens)
        sync(a.device)
        t_plain = min(t_plain, time.time() - t)
        t = time.time()
        fast = generate_ids(model, prompts, 0, a.new_tokens, a.batch, static_cache_compile=a.compile,
                            progress=False, min_new_tokens=a.new_tokens)
        sync(a.device)
        t_fast = min(t_fast, time.time() - t)

    tokens = a.prompts * a.new_tokens
    same = sum(x == y for x, y in zip(base, fast)) / len(prompts)
    res = {"shape": a.shape, "params_m": n_params / 1e6, "device": a.device, "dtype": a.dtype,
           "gpu": torch.cuda.get_device_name() if a.device.startswith("cuda") else None,
           "plain_s": t_plain, "fast_s": t_fast, "warmup_s": t_warm, "plain_tok_s": tokens / t_plain,
           "fast_tok_s": tokens / t_fast, "speedup": t_plain / t_fast, "identical": same, "compile": a.compile}
    print(f"\nmodel: random {a.shape} ({n_params / 1e6:.1f}M params), {a.dtype} on {res['gpu'] or a.device}; "
          f"{a.prompts} prompts of {a.min_len}-{a.max_len} tokens, batch {a.batch}, {a.new_tokens} new tokens "
          f"each (greedy), best of {a.repeats}; torch {torch.__version__}")
    compiled = ", compile" if a.compile and a.device.startswith("cuda") else ""
    print(f"fast path warm-up (first batch{compiled}): {t_warm:.1f} s; "
          f"identical outputs: {100 * same:.0f}%\n")
    fast_name = "bucketed" + ((" + static cache + compile" if a.device.startswith("cuda") else " + static cache")
                              if a.compile else "")
    print("| path | wall s | new tokens/s | speedup |\n|---|---|---|---|")
    print(f"| plain model.generate | {t_plain:.2f} | {tokens / t_plain:,.0f} | 1.00x |")
    print(f"| {fast_name} | {t_fast:.2f} | {tokens / t_fast:,.0f} | {t_plain / t_fast:.2f}x |")
    return res


if __name__ == "__main__":
    main()
