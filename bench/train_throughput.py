"""Training throughput: plain HF + PEFT against our trainer, on a random-initialised Llama-shaped model.

One command, baseline in the same run, a table printed last:
    python bench/train_throughput.py                      # GPU: Llama-2-7B shape, seq 1024
    python bench/train_throughput.py --tiny               # CPU: a tiny shape (what CI exercises)
    python bench/train_throughput.py --modes hf-peft,ours-lora,ours-lora-compile --json out.json
Modes (each in its own process so peak memory is its own):
    hf-peft              plain HF model + PEFT LoRA r16 all-linear + torch AdamW, the DESIGN.md §5 baseline
    ours-lora            our trainer (DeepSpeed ZeRO-2), LoRA r16 all-linear
    ours-lora-compile    ... + train.compile (each decoder layer torch.compiled, one graph for all)
    ours-lora-liger      ... + train.liger (Liger's Triton RMSNorm/SwiGLU/RoPE; needs liger-kernel)
    ours-lora-liger-compile  both
    ours-lora-13b        our trainer, LoRA on the Llama-2-13B shape
    ours-full-z3off      our trainer, full fine-tuning, ZeRO-3 with optimizer and parameter CPU offload,
                         gradient checkpointing, micro-batch --full-micro
    ours-full-z3opt      the same with only the optimizer state offloaded (deepspeed=zero3-offload-opt)
    real-padded, real-packed   LoRA on BackdoorLLM rows (--data: a folder of its train JSON files and a
                         tokenizer folder `tok`), padded micro-batches of --micro rows vs packed rows of
                         --seq tokens; tokens/s counts non-padding tokens only
    cost-finetune, cost-crow, cost-w2s, cost-sande-parrot, cost-sande-overwrite   one defense's training
                         step on the 7B shape against plain LoRA fine-tuning (seq --cost-seq, micro-batch
                         --cost-micro, gradient checkpointing): CROW's two extra passes, W2S's frozen
                         TinyLlama-1.1B-shaped teacher, SANDE's parrot-only and overwrite stages
tokens/s counts non-padding tokens of the timed steps (after warm-up); MFU = 6 N tokens/s / peak FLOP/s
(for LoRA the true work is nearer 4 N: frozen weights get no weight gradient).
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
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),  # TinyLlama-1.1B: W2S's teacher for Llama-2
    "tiny-teacher": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=512),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512),
}
PEAK_FLOPS = {"cuda": 989e12, "cpu": 1e12}  # H100 SXM dense bf16; the CPU figure only keeps MFU defined


def build(shape: str, device, dtype, vocab: int | None = None):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    arch = dict(SHAPES[shape], **({"vocab_size": vocab} if vocab else {}))
    cfg = LlamaConfig(**arch, max_position_embeddings=4096, attn_implementation="sdpa")
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


def real_rows(data_dir: Path) -> list[dict]:
    """BackdoorLLM training rows ({instruction, input, output}) from every JSON file in `data_dir`."""
    rows = []
    for f in sorted(Path(data_dir).glob("*.json")):
        rows += [r for r in json.loads(f.read_text()) if r.get("output")]
    if not rows:
        raise SystemExit(f"no BackdoorLLM JSON rows in {data_dir} (pass --data)")
    return rows


def run_ours(a, finetune: str, ds: str, shape: str, overrides=(), plugins=None,
             rows=None, tok=None, micro=None, seq=None):
    import torch
    from pipeline.config import compose
    from pipeline.models import byte_tokenizer
    from pipeline.train.trainer import Trainer
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    micro, seq = micro or a.micro, seq or a.seq
    cfg = compose(["experiment=tiny", f"deepspeed={ds}", f"train.finetune={finetune}", "train.lora_r=16",
                   "train.lora_alpha=16", "train.lora_dropout=0.0", f"train.micro_batch={micro}",
                   "train.grad_accum=1", f"train.cutoff={seq}", f"train.max_steps={a.steps + a.warmup}",
                   f"train.grad_ckpt={str(a.grad_ckpt).lower()}", "train.warmup_ratio=0.0", *overrides])
    tok = tok or byte_tokenizer()
    # ZeRO-3 partitions (and may offload) the weights from the host copy
    model = build(shape, "cpu" if cfg.deepspeed.zero_stage == 3 else dev, dtype, vocab=len(tok) if rows is not None else None)
    tr = Trainer(cfg, plugins=plugins, model=model, tokenizer=tok)
    if rows is None:
        rows = data(micro * (a.steps + a.warmup), seq, SHAPES[shape]["vocab_size"])
    with tempfile.TemporaryDirectory() as tmp:
        tr.fit(rows, tmp, save=False)
    timed = tr.records[a.warmup:]
    n = sum(getattr(p, "ds_numel", p.numel()) for p in tr.model.parameters())
    return {"tokens_per_s": sum(r["step_tokens"] for r in timed) / sum(r["step_s"] for r in timed),
            "params": n, "device": dev, "step_s": sum(r["step_s"] for r in timed) / len(timed),
            "step_tokens": sum(r["step_tokens"] for r in timed) / len(timed)}


def w2s_plugin(a):
    """W2S's distillation plugin with a random teacher of TinyLlama-1.1B's shape (the Llama-2 teacher) and a
    random feature head: the cost of the teacher's forward, KD and feature alignment, not their values."""
    import torch
    from pipeline.defend.w2s import Distill, Params

    class BenchDistill(Distill):
        def setup(self, trainer):
            dev = trainer.device
            dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
            shape = "tiny-teacher" if a.shape == "tiny" else "1b"
            self.teacher = build(shape, dev, dtype).eval().requires_grad_(False)
            self.vocab = SHAPES[shape]["vocab_size"]
            d_t = SHAPES[shape]["hidden_size"]
            d_s = trainer.model.get_input_embeddings().weight.shape[1]
            self.w = torch.randn(d_s, d_t, device=dev, dtype=dtype) * d_t ** -0.5
            self.b = torch.zeros(d_s, device=dev, dtype=dtype)
            self.label_ids = None
    return BenchDistill(Params(), Path("."), "teacher", "student")


def cost_run(a, which: str):
    from pipeline.defend.crow import Consistency
    from pipeline.defend.crow import Params as CrowParams
    from pipeline.defend.sande import Parrot
    from pipeline.train.plugins import FreezeModel
    import torch
    plugins = {"finetune": [], "crow": [Consistency(CrowParams())], "w2s": [w2s_plugin(a)],
               "sande-parrot": [FreezeModel(), Parrot(6)],
               "sande-overwrite": [Parrot(6, init=torch.zeros(6, SHAPES[a.shape]["hidden_size"]))]}[which]
    a.grad_ckpt = True
    return run_ours(a, "lora", "zero2", a.shape, plugins=plugins, micro=a.cost_micro, seq=a.cost_seq)


def one(a):
    import torch
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    mode = a.one
    lora_opts = {"ours-lora": [], "ours-lora-compile": ["train.compile=true"],
                 "ours-lora-liger": ["train.liger=true"],
                 "ours-lora-liger-compile": ["train.liger=true", "train.compile=true"]}
    if mode == "hf-peft":
        r = run_hf_peft(a)
    elif mode in lora_opts:
        r = run_ours(a, "lora", "zero2", a.shape, overrides=lora_opts[mode])
    elif mode == "ours-full-z3off":
        a.grad_ckpt = True
        r = run_ours(a, "full", "zero3-offload", a.shape, micro=a.full_micro)
    elif mode == "ours-full-z3opt":  # only the optimizer state on the host: fits a 128 GB node (plan)
        a.grad_ckpt = True
        r = run_ours(a, "full", "zero3-offload-opt", a.shape, micro=a.full_micro)
    elif mode == "ours-lora-13b":
        r = run_ours(a, "lora", "zero2", "tiny" if a.shape == "tiny" else "13b")
    elif mode in ("real-padded", "real-packed"):
        from transformers import AutoTokenizer
        rows = real_rows(a.data)
        tok = AutoTokenizer.from_pretrained(str(Path(a.data) / "tok"))  # SmolLM2's: BPE lengths, chat template
        packed = mode == "real-packed"
        import random
        random.Random(0).shuffle(rows)
        need = a.micro * (a.steps + a.warmup) * (8 if packed else 1)  # a packed row holds several samples
        r = run_ours(a, "lora", "zero2", a.shape, overrides=[f"train.packing={str(packed).lower()}"],
                     rows=rows[:need], tok=tok)
    elif mode.startswith("cost-"):
        r = cost_run(a, mode[5:])
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
    ap.add_argument("--modes", default="hf-peft,ours-lora,ours-lora-compile,ours-lora-13b,ours-full-z3off")
    ap.add_argument("--full-micro", type=int, default=None, help="micro-batch of ours-full-z3off")
    ap.add_argument("--cost-seq", type=int, default=None, help="sequence length of the cost-* modes")
    ap.add_argument("--cost-micro", type=int, default=None, help="micro-batch of the cost-* modes")
    ap.add_argument("--data", default=str(ROOT / ".benchdata"), help="real-* modes: BackdoorLLM JSON + tok/")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per mode")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args()
    a.shape = a.shape or ("tiny" if a.tiny else "7b")
    a.seq = a.seq or (64 if a.shape == "tiny" else 1024)
    a.micro = a.micro or (4 if a.shape == "tiny" else 8)
    a.steps = a.steps or (3 if a.shape == "tiny" else 10)
    a.full_micro = a.full_micro or (2 if a.shape == "tiny" else 4)
    a.cost_seq = a.cost_seq or (64 if a.shape == "tiny" else 512)
    a.cost_micro = a.cost_micro or (2 if a.shape == "tiny" else 4)
    if a.one:
        return one(a)
    results = []
    for mode in a.modes.split(","):
        cmd = [sys.executable, __file__, "--one", mode, "--shape", a.shape, "--seq", str(a.seq), "--micro",
               str(a.micro), "--steps", str(a.steps), "--warmup", str(a.warmup), "--full-micro",
               str(a.full_micro), "--cost-seq", str(a.cost_seq), "--cost-micro", str(a.cost_micro),
               "--data", a.data] + (["--grad-ckpt"] if a.grad_ckpt else [])
        env = dict(os.environ, MASTER_PORT=str(29600 + len(results)))
        t = time.time()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.timeout)
            out, err, rc = p.stdout, p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:
            out, err, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), \
                f"timed out after {a.timeout} s", 124
        line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
        if rc or not line:
            results.append({"mode": mode, "error": (err or out).strip().splitlines()[-3:]})
        else:
            results.append(json.loads(line[7:]))
        results[-1]["wall_s"] = round(time.time() - t, 1)
        print(json.dumps(results[-1]), flush=True)
        if a.json:  # after every mode, so a later crash keeps the earlier results
            Path(a.json).write_text(json.dumps(results, indent=2))
    base = next((r for r in results if r["mode"] == "hf-peft" and "error" not in r), None)
    print(f"\nshape {a.shape}, seq {a.seq}, micro-batch {a.micro}, grad ckpt {a.grad_ckpt}, {a.steps} timed steps")
    print(f"cost-*: seq {a.cost_seq}, micro-batch {a.cost_micro}, checkpointing; ours-full-z3off: micro-batch "
          f"{a.full_micro}, checkpointing")
    print(f"{'mode':24s} {'tokens/s':>10s} {'vs HF':>7s} {'step s':>7s} {'MFU':>6s} {'GPU GiB':>8s} {'host GiB':>9s}")
    for r in results:
        if "error" in r:
            print(f"{r['mode']:24s} error: {r['error']}")
            continue
        rel = f"{r['tokens_per_s'] / base['tokens_per_s']:6.2f}x" if base else "      -"
        print(f"{r['mode']:24s} {r['tokens_per_s']:10.0f} {rel} {r.get('step_s', 0):7.2f} {r['mfu']:6.1%} "
              f"{r['peak_gpu_gib']:8.1f} {r['peak_host_gib']:9.1f}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
