"""The one trainer: DeepSpeed ZeRO 0/2/3 (± CPU offload), LoRA or full fine-tuning, response-only loss.

Inject and every defense call `Trainer(...).fit(rows, out_dir)`; defenses change it only through plugins
(pipeline/train/plugins.py). The loop, top to bottom:
  rows -> plugin transforms -> tokenise with the shared prompt format -> seeded per-epoch order, sharded by
  rank -> micro-batches (padded or packed) -> forward (plugins may splice embeddings) -> LM loss + plugin
  terms -> engine.backward/step (accumulation, clipping, warm-up + cosine) -> metrics JSONL + progress bar
  -> checkpoint every `save_every` optimizer steps -> save (ZeRO-3 shards gathered) as safetensors/adapter.
The distributed environment is read from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT); launch/distributed.py sets them from Slurm. Without them it runs as a single process.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..models import cpu_bf16, load_model, load_trained
from ..prompts import encode_example
from .packing import lm_loss, pack_examples, pad_batch
from .plugins import Plugin


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); starts torch.distributed (gloo on CPU, nccl on GPU) once."""
    import deepspeed
    import torch.distributed as dist

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    own_port = "MASTER_PORT" not in os.environ
    if own_port:
        os.environ["MASTER_PORT"] = str(_free_port())
    try:
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    finally:
        if own_port:  # a port this process picked and now listens on must not leak into its children
            os.environ.pop("MASTER_PORT", None)
    return dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])


def lr_lambda(total_steps: int, warmup_ratio: float, schedule: str):
    warm = int(math.ceil(total_steps * warmup_ratio))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if schedule == "constant":
            return 1.0
        frac = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1 + math.cos(math.pi * frac)) if schedule == "cosine" else max(0.0, 1 - frac)
    return f


def deepspeed_config(tc, dc, world: int, cuda: bool) -> dict:
    zero = {"stage": dc.zero_stage}
    if dc.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
    if dc.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    if dc.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    cfg = {
        "train_micro_batch_size_per_gpu": tc.micro_batch,
        "gradient_accumulation_steps": tc.grad_accum,
        "train_batch_size": tc.micro_batch * tc.grad_accum * world,
        "gradient_clipping": tc.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bool(cuda)},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    # No "optimizer" entry: the trainer passes a client torch AdamW (fused on CUDA), so no DeepSpeed op is
    # compiled at start-up (FusedAdam/CPUAdam JIT builds need nvcc/ninja and minutes). To use DeepSpeed's own,
    # set deepspeed.extra.optimizer (it then takes precedence).
    _deep_update(cfg, dc.extra)
    return cfg


def make_optimizer(params, tc, fused: bool):
    """torch AdamW; its fused kernel on CUDA (one launch for all tensors; also runs on ZeRO's offloaded
    fp32 partitions on the host)."""
    kw = dict(lr=tc.lr, betas=tuple(tc.betas), eps=1e-8, weight_decay=tc.weight_decay)
    if fused:
        try:
            return torch.optim.AdamW(params, fused=True, **kw)
        except (RuntimeError, ValueError):  # a dtype/device the fused kernel does not take
            pass
    return torch.optim.AdamW(params, **kw)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's stack of transformer blocks (through PEFT wrappers): the one ModuleList as long as
    config.num_hidden_layers."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) == n and n:
            return m
    raise ValueError(f"train.compile: no list of {n} decoder layers found in {type(model).__name__}")


def apply_liger(model):
    """Liger's Triton kernels (RMSNorm, SwiGLU, RoPE) patched into this model instance; the loss stays ours."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError as e:
        raise RuntimeError("train.liger=true needs the liger-kernel package and Triton on a GPU "
                           f"(pip install liger-kernel): {e}") from e
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)


def _deep_update(d: dict, u: dict):
    for k, v in u.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            _deep_update(d[k], v)
        else:
            d[k] = v


class TrainModule(torch.nn.Module):
    """The model plus the plugins' extra trainable tensors, so DeepSpeed manages (shards, checkpoints) both."""

    def __init__(self, model, extra: dict[str, torch.nn.Parameter]):
        super().__init__()
        self.model = model
        self.extra = torch.nn.ParameterDict(extra)

    def forward(self, **kw):
        return self.model(**kw)


class Trainer:
    def __init__(self, cfg, plugins: list[Plugin] | None = None, init_from: str | Path | None = None,
                 template: str | None = None, model=None, tokenizer=None):
        """`cfg`: a composed Config (model, train, deepspeed sections). `init_from`: an inject/defend output
        to continue (its adapter keeps training with LoRA; full weights are loaded as the base)."""
        self.cfg, self.tc, self.dc = cfg, cfg.train, cfg.deepspeed
        self.plugins = list(plugins or [])
        self.init_from = init_from
        self.template = template if template is not None else cfg.model.chat_template
        self.rank, self.world, self.local_rank = init_distributed()
        self.cuda = torch.cuda.is_available()
        self.device = torch.device(f"cuda:{self.local_rank}" if self.cuda else "cpu")
        self.is_main = self.rank == 0
        self._given = (model, tokenizer)  # a model built by the caller (benchmarks); LoRA still applies
        self.records: list[dict] = []

    # ----------------------------------------------------------------------------------- model
    def build_model(self):
        tc = self.tc
        dtype = torch.bfloat16 if self.cuda else torch.float32
        self._hf_ds = None
        if self.dc.zero_stage == 3:  # let from_pretrained partition weights as they load (zero.Init)
            from transformers.integrations import HfDeepSpeedConfig
            self._hf_ds = HfDeepSpeedConfig(deepspeed_config(tc, self.dc, self.world, self.cuda))
        resume_adapter = False
        if self._given[0] is not None:
            model, tok = self._given
        elif self.init_from is not None:
            model, tok, _ = load_trained(self.init_from, device="cpu")
            resume_adapter = hasattr(model, "peft_config")  # continue the adapter
        else:
            model, tok = load_model(self.cfg.model, device="cpu", dtype=dtype)
        if tc.liger:
            apply_liger(model.get_base_model() if resume_adapter else model)
        if resume_adapter:
            for n, p in model.named_parameters():
                p.requires_grad_("lora_" in n)
            self.peft = True
        else:
            self.peft = tc.finetune == "lora"
        if self.peft and not resume_adapter:
            from peft import LoraConfig, get_peft_model
            targets = tc.lora_targets
            lcfg = LoraConfig(r=tc.lora_r, lora_alpha=tc.lora_alpha, lora_dropout=tc.lora_dropout,
                              target_modules=targets, task_type="CAUSAL_LM")
            model = get_peft_model(model, lcfg)
        if tc.grad_ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if self.peft:
                model.enable_input_require_grads()
        model.config.use_cache = False
        if tc.compile:
            if self.dc.zero_stage == 3:
                raise ValueError("train.compile=true: ZeRO-3 gathers parameters in hooks that a compiled "
                                 "layer would trace; use deepspeed=zero2 or train.compile=false")
            for layer in decoder_layers(model):  # regional: every layer reuses one compiled graph
                layer.compile()
        self.model, self.tok = model, tok

    # ------------------------------------------------------------------------------------ data
    def encode(self, rows: list[dict]) -> list[dict]:
        tc = self.tc
        out = []
        for r in rows:
            if "input_ids" in r:  # already tokenised (benchmarks)
                out.append({"input_ids": list(r["input_ids"]), "labels": list(r.get("labels", r["input_ids"]))})
                continue
            e = encode_example(self.tok, r["instruction"], r.get("input", ""), r["output"],
                               r.get("template", self.template),
                               cutoff=tc.cutoff, response_cutoff=tc.response_cutoff,
                               response_tokens=r.get("response_tokens", tc.response_tokens),
                               prefix=r.get("prefix", ""))
            if any(lab != -100 for lab in e["labels"]):
                out.append(e)
        if not out:
            raise ValueError("no training example has a response token inside the cutoff "
                             f"(train.cutoff={tc.cutoff}); raise train.cutoff")
        return out

    def epoch_order(self, n: int, epoch: int) -> list[int]:
        """This rank's sample order for an epoch: one seeded permutation, interleaved across ranks, so
        the ranks' micro-batches together are exactly the single-process micro-batch of the same step."""
        g = torch.Generator().manual_seed(self.tc.seed * 1000 + epoch)
        order = torch.randperm(n, generator=g).tolist()
        usable = len(order) - len(order) % self.world
        return order[:usable][self.rank::self.world]

    def micro_batches(self, examples: list[dict], epoch: int) -> list[list[dict]]:
        order = self.epoch_order(len(examples), epoch)
        mb = self.tc.micro_batch
        if self.tc.packing:  # a micro-batch = `micro_batch` rows of up to `cutoff` tokens
            batches, cur, used = [], [], 0
            budget = mb * self.tc.cutoff
            for i in order:
                k = len(examples[i]["input_ids"])
                if cur and used + k > budget:
                    batches.append(cur)
                    cur, used = [], 0
                cur.append(examples[i])
                used += k
            if cur:
                batches.append(cur)
            return batches
        return [[examples[i] for i in order[j:j + mb]] for j in range(0, len(order), mb)]

    def collate(self, exs: list[dict]) -> dict:
        pad = self.tok.pad_token_id
        b = pack_examples(exs, self.tc.cutoff, pad) if self.tc.packing else pad_batch(exs, pad)
        return {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in b.items()}

    # ------------------------------------------------------------------------------------ loop
    def forward_loss(self, batch: dict):
        for p in self.plugins:
            batch = p.on_batch(self, batch)
        kw = {"attention_mask": batch["attention_mask"], "position_ids": batch["position_ids"],
              "output_hidden_states": any(p.wants_hidden_states for p in self.plugins), "use_cache": False}
        if "inputs_embeds" in batch:
            kw["inputs_embeds"] = batch["inputs_embeds"]
        else:
            kw["input_ids"] = batch["input_ids"]
        out = self.engine(**kw)
        loss = lm_loss(out.logits, batch["labels"], batch["sample_ids"], self.tc.loss_avg)
        logs = {"lm_loss": loss.item()}
        for p in self.plugins:
            loss, extra = p.loss(self, batch, out, loss)
            logs.update(extra)
        return loss, logs

    @property
    def last_record(self) -> dict:
        """The latest optimizer step's metrics (empty before the first step)."""
        return self.records[-1] if self.records else {}

    def extra_forward(self, **kw):
        """A further forward pass for a plugin (CROW's perturbed pass, a teacher-free probe). It calls
        the wrapped module directly: DeepSpeed's engine forward arms its backward hooks once per step."""
        return self.engine.module(**kw)

    def fit(self, rows: list[dict], out_dir: str | Path, ckpt_dir: str | Path | None = None,
            stop_after_steps: int | None = None, save: bool = True) -> dict:
        """Train on `rows` ({instruction, input, output}) and save into `out_dir/model`. Resumes from
        `ckpt_dir` when it holds a checkpoint. `stop_after_steps` stops early (tests of kill/resume)."""
        import deepspeed

        tc = self.tc
        torch.manual_seed(tc.seed)
        random.seed(tc.seed)
        np.random.seed(tc.seed)
        for p in self.plugins:
            rows = p.transform(rows)
        self.build_model()
        examples = self.encode(rows)
        for p in self.plugins:
            p.setup(self)
        extra = {}
        for p in self.plugins:
            extra.update({f"{p.name}__{k}": v for k, v in p.parameters().items()})
        self.module = TrainModule(self.model, extra)
        steps_per_epoch = math.ceil(len(self.micro_batches(examples, 0)) / tc.grad_accum)
        total = tc.max_steps or max(1, int(math.ceil(steps_per_epoch * tc.epochs)))
        self.total_steps = total
        dsc = deepspeed_config(tc, self.dc, self.world, self.cuda)
        params = [p for p in self.module.parameters() if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: every parameter is frozen")
        opt = None
        if "optimizer" not in dsc:
            opt = make_optimizer(params, tc, fused=self.cuda)
        sched = lambda o: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(total, tc.warmup_ratio, tc.schedule))  # noqa: E731
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.module, model_parameters=params if opt is None else None, optimizer=opt,
            lr_scheduler=sched, config=dsc)
        self.device = self.engine.device
        step, micro = 0, 0
        ckpt_dir = Path(ckpt_dir) if ckpt_dir else None
        if ckpt_dir and (ckpt_dir / "latest").is_file():
            _, client = self.engine.load_checkpoint(str(ckpt_dir), load_module_strict=False)
            step, micro = client["step"], client["micro"]
            torch.set_rng_state(client["rng_torch"])
            random.setstate(client["rng_py"])
            np.random.set_state(client["rng_np"])
            if self.is_main:
                print(f"[train] resumed from {ckpt_dir} at step {step}")
        out_dir = Path(out_dir)
        metrics_f = open(out_dir / "metrics.jsonl", "a") if self.is_main else None
        tb = None
        if tc.tensorboard and self.is_main:  # optional: needs the `tensorboard` package
            try:
                from torch.utils.tensorboard import SummaryWriter
                tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                print("[train] train.tensorboard=true but tensorboard is not installed "
                      "(pip install tensorboard); logging to metrics.jsonl only")
        bar = tqdm(total=total, initial=step, desc="train", disable=not self.is_main, dynamic_ncols=True)
        t0, tokens, last = time.time(), 0, {}
        t_step, tok_step = time.time(), 0
        epoch, done = 0, step >= total
        seen = 0  # micro-batches passed over in this process (to skip to `micro` when resuming)
        while not done:
            for mb in self.micro_batches(examples, epoch):
                if seen < micro:
                    seen += 1
                    continue
                batch = self.collate(mb)
                self.engine.train()
                with cpu_bf16(self.tc.cpu_bf16):
                    loss, logs = self.forward_loss(batch)
                self.engine.backward(loss)
                self.engine.step()
                seen += 1
                micro += 1
                n_tok = int((batch["sample_ids"] >= 0).sum())  # non-padding tokens
                tokens += n_tok
                tok_step += n_tok
                for k, v in logs.items():
                    last[k] = last.get(k, 0.0) + v / tc.grad_accum
                if micro % tc.grad_accum:
                    continue
                step += 1
                dt = max(time.time() - t0, 1e-9)
                if self.cuda:
                    torch.cuda.synchronize()
                rec = {"step": step, "epoch": epoch, "lr": self.scheduler.get_last_lr()[0], **last,
                       "tokens_per_s": tokens * self.world / dt, "step_s": time.time() - t_step,
                       "step_tokens": tok_step * self.world}
                t_step, tok_step = time.time(), 0
                self.records.append(rec)
                last = {}
                if self.is_main and (step % tc.log_every == 0 or step == total):
                    metrics_f.write(json.dumps(rec) + "\n")
                    metrics_f.flush()
                    if tb is not None:
                        for k, v in rec.items():
                            if isinstance(v, (int, float)) and k != "step":
                                tb.add_scalar(f"train/{k}", v, step)
                bar.set_postfix(loss=f"{rec.get('lm_loss', 0):.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                bar.update(1)
                if ckpt_dir and tc.save_every and step % tc.save_every == 0 and step < total:
                    self.save_checkpoint(ckpt_dir, step, micro)
                if step >= total or (stop_after_steps and step >= stop_after_steps):
                    done = True
                    break
            epoch += 1
        bar.close()
        if metrics_f:
            metrics_f.close()
        if tb is not None:
            tb.close()
        if stop_after_steps and step < total:
            return {"stopped_at": step}
        if save:
            self.save(out_dir)
        return {"steps": step, "train_wall_s": time.time() - t0, "final": self.last_record}

    def save_checkpoint(self, ckpt_dir: Path, step: int, micro: int):
        client = {"step": step, "micro": micro, "rng_torch": torch.get_rng_state(), "rng_py": random.getstate(),
                  "rng_np": np.random.get_state()}
        self.engine.save_checkpoint(str(ckpt_dir), tag=f"step{step}", client_state=client,
                                    exclude_frozen_parameters=self.peft)

    # ------------------------------------------------------------------------------------ save
    def full_state_dict(self) -> dict:
        """The whole TrainModule's state on rank 0, ZeRO-3 shards gathered (None on other ranks)."""
        if self.engine.zero_optimization_stage() == 3:
            sd = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            sd = self.engine.module.state_dict()
        return sd

    def save(self, out_dir: Path):
        sd = self.full_state_dict()
        if not self.is_main:
            return
        model_sd = {k[len("model."):]: v.detach().cpu() for k, v in sd.items() if k.startswith("model.")}
        extra_sd = {k[len("extra."):]: v.detach().cpu() for k, v in sd.items() if k.startswith("extra.")}
        target = Path(out_dir) / "model"
        target.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(target, state_dict=model_sd, safe_serialization=True)
        if self.peft and self.init_from and not (Path(self.init_from) / "model" / "adapter_config.json").is_file():
            # a new adapter over full weights from an earlier stage: record which weights it sits on
            (target / "base_ref.json").write_text(json.dumps({"path": str(Path(self.init_from).resolve() / "model")}))
        if self.peft and self.tc.merge_lora:  # reload base + adapter on the CPU, merge, save full weights
            from peft import PeftModel
            base_dir = Path(self.init_from) / "model" if self.init_from and (target / "base_ref.json").is_file() else None
            base, _ = load_model(self.cfg.model, device="cpu",
                                 path=str(base_dir) if base_dir and base_dir.is_dir() else None)
            merged = PeftModel.from_pretrained(base, str(target)).merge_and_unload()
            shutil.rmtree(target)
            merged.save_pretrained(target, safe_serialization=True)
        self.tok.save_pretrained(target)
        if extra_sd:
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in extra_sd.items()}, str(Path(out_dir) / "extra.safetensors"))


def checkpoint_dir_for(final: Path) -> Path:
    """Deterministic checkpoint location next to a stage output, so a rerun of the same run resumes."""
    return Path(final).parent / f".ckpt-{Path(final).name}"


def cleanup_checkpoints(final: Path):
    shutil.rmtree(checkpoint_dir_for(final), ignore_errors=True)
