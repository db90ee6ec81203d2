"""Memory and time plan: `python -m pipeline plan model=llama2-7b deepspeed=zero3-offload cluster=...`.

Predicts per-GPU and per-node host memory for a training job (ZeRO 0/1/2/3, ± CPU offload, LoRA or full
fine-tuning, gradient checkpointing) and warns before submission when it would not fit. The activation
term follows Korthikanti et al. (2022) for a Llama block (SwiGLU MLP, no dropout); its constants are
fitted on our trainer's peaks measured on an H100 (BENCHMARKS.md §3) and checked against them in
tests/test_plan.py. The host term counts what ZeRO-Offload keeps in host RAM, and the plan warns when a
node's memory (cluster.mem_gb or --host-gb) would not hold it.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

GiB = 1024 ** 3
# Architectures of the registry's families (hidden, layers, heads, kv heads, intermediate, vocab)
SHAPES = {
    "llama2-7b": (4096, 32, 32, 32, 11008, 32000),
    "llama2-13b": (5120, 40, 40, 40, 13824, 32000),
    "mistral-7b": (4096, 32, 32, 8, 14336, 32000),
    "llama3.1-8b": (4096, 32, 32, 8, 14336, 128256),
    "qwen2.5-7b": (3584, 28, 28, 4, 18944, 152064),
    "tinyllama-1.1b": (2048, 22, 32, 4, 5632, 32000),
    "smollm2-135m": (576, 30, 9, 3, 1536, 49152),
}
GPU_MEM = {"h100": 80, "a100": 80, "a100-40g": 40, "h200": 141, "l40s": 48, "cpu": 0}


@dataclass
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    inter: int
    vocab: int

    @property
    def n_params(self) -> int:
        h, kv = self.hidden, self.hidden * self.kv_heads // self.heads
        per_layer = h * h * 2 + h * kv * 2 + 3 * h * self.inter + 2 * h
        return self.layers * per_layer + 2 * self.vocab * h + h

    def lora_params(self, r: int, targets="all-linear") -> int:
        h, kv = self.hidden, self.hidden * self.kv_heads // self.heads
        mats = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, self.inter), "up_proj": (h, self.inter), "down_proj": (self.inter, h)}
        names = mats if targets in ("all-linear", None) else targets
        return self.layers * sum(r * (mats[n][0] + mats[n][1]) for n in names if n in mats)


def shape_for(model_cfg) -> Shape:
    if model_cfg.source == "random":
        a = model_cfg.arch
        return Shape(a["hidden_size"], a["num_hidden_layers"], a["num_attention_heads"],
                     a.get("num_key_value_heads", a["num_attention_heads"]), a["intermediate_size"],
                     a.get("vocab_size", 260))
    for key in (model_cfg.name, model_cfg.name.replace("-chat", "").replace("-instruct", "")):
        if key in SHAPES:
            return Shape(*SHAPES[key])
    if model_cfg.name.startswith("codellama-7b"):
        return Shape(*SHAPES["llama2-7b"][:5], 32016)
    if model_cfg.name.startswith("codellama-13b"):
        return Shape(*SHAPES["llama2-13b"][:5], 32016)
    raise ValueError(f"plan: no shape known for model '{model_cfg.name}'; add it to pipeline/plan.py SHAPES")


def plan(shape: Shape, *, seq: int, micro: int, world: int, zero: int, offload_opt: bool, offload_params: bool,
         lora_r: int | None, grad_ckpt: bool, bytes_per_param: int = 2, compiled: bool = False) -> dict:
    """Per-GPU bytes by component and host bytes per node (assuming one node holds `world` ranks)."""
    N = shape.n_params
    T = shape.lora_params(lora_r) if lora_r else N
    shard = lambda stage: world if zero >= stage else 1  # noqa: E731
    weights = N * bytes_per_param / shard(3)
    grads = T * bytes_per_param / shard(2)
    opt = T * 12 / shard(1)  # fp32 master + Adam m, v
    host = 0.0
    if offload_opt:  # ZeRO-Offload: fp32 master, Adam m and v, and the fp32 gradient partition, all on the host
        host += T * 16 / shard(1) * world
        opt = 0.0
    if offload_params and zero == 3:
        host += weights * world
        weights = N * bytes_per_param * 2 / world / max(shape.layers, 1)  # a layer or two live on the GPU
    s, b, h, L = seq, micro, shape.hidden, shape.layers
    # Korthikanti's 34 s b h bytes per layer (no s^2 term with SDPA/flash) grows for a Llama block: SwiGLU
    # keeps gate/up/act outputs. Fitted on our trainer's H100 peaks, LoRA r16 on the Llama-2-7B shape,
    # sequence 1024 (BENCHMARKS.md §3): 27 h + 6.5 inter bytes per token per layer in bf16 (micro-batch 8:
    # 57.7 GiB); regional torch.compile (train.compile) keeps 22% less (micro-batch 4/6/8: 30.7/39.6/48.3).
    per_layer = s * b * (27 * h + 6.5 * shape.inter) * bytes_per_param / 2 * (0.78 if compiled else 1.0)
    acts = (2 * s * b * h * L + per_layer) if grad_ckpt else per_layer * L
    logits = s * b * shape.vocab * (bytes_per_param + 4 + 4)  # bf16 logits, fp32 upcast and its grad
    overhead = 1.0 * GiB  # CUDA context, allocator slack, communication buffers
    total = weights + grads + opt + acts + logits + overhead
    return {"weights": weights, "grads": grads, "optimizer": opt, "activations": acts, "logits": logits,
            "overhead": overhead, "total": total, "host": host, "params": N, "trainable": T}


def add_arguments(p):
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: train.cutoff)")
    p.add_argument("--gpu", default="h100", choices=sorted(GPU_MEM), help="GPU kind for the fit check")
    p.add_argument("--gpus", type=int, default=None, help="GPUs per node (default: cluster.gpus_per_node or 1)")
    p.add_argument("--nodes", type=int, default=None)
    p.add_argument("--host-gb", type=float, default=None, help="host RAM per node (default: cluster.mem_gb)")


def run(cfg, args) -> None:
    tc, dc = cfg.train, cfg.deepspeed
    shape = shape_for(cfg.model)
    gpus = args.gpus or max(1, cfg.cluster.gpus_per_node)
    nodes = args.nodes or cfg.cluster.nodes
    world = gpus * nodes
    seq = args.seq or tc.cutoff
    r = plan(shape, seq=seq, micro=tc.micro_batch, world=world, zero=dc.zero_stage,
             offload_opt=dc.offload_optimizer, offload_params=dc.offload_params,
             lora_r=tc.lora_r if tc.finetune == "lora" else None, grad_ckpt=tc.grad_ckpt, compiled=tc.compile)
    cap = GPU_MEM[args.gpu] * 1e9 / GiB * GiB * 0.95 if GPU_MEM[args.gpu] else math.inf
    print(f"model {cfg.model.name}: {r['params'] / 1e9:.2f} B params, {r['trainable'] / 1e6:.1f} M trainable "
          f"({tc.finetune}); ZeRO-{dc.zero_stage}{' +offload' if dc.offload_optimizer else ''}; "
          f"{nodes} node(s) x {gpus} GPU(s); micro-batch {tc.micro_batch} x {seq} tokens; "
          f"checkpointing {'on' if tc.grad_ckpt else 'off'}")
    for k in ("weights", "grads", "optimizer", "activations", "logits", "overhead", "total"):
        print(f"  {k:12s} {r[k] / GiB:8.1f} GiB per GPU")
    print(f"  {'host':12s} {r['host'] / GiB:8.1f} GiB per node (offloaded states)")
    if r["total"] > cap:
        print(f"WARNING: {r['total'] / GiB:.1f} GiB per GPU does not fit a {args.gpu} "
              f"({GPU_MEM[args.gpu]} GB): enable train.grad_ckpt, lower train.micro_batch, use ZeRO-3 or offload, "
              "or add GPUs", file=sys.stderr)
    host_gb = args.host_gb or cfg.cluster.mem_gb
    if host_gb and r["host"] > 0.9 * host_gb * 1e9:  # pinned buffers and the process itself need the rest
        print(f"WARNING: {r['host'] / GiB:.1f} GiB of offloaded states per node does not fit {host_gb:g} GB of host "
              "RAM with room to spare: offload fewer states (deepspeed=zero3), use LoRA, or add nodes",
              file=sys.stderr)
    return None
