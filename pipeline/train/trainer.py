"""The one trainer: DeepSpeed ZeRO 0/2/3 (± CPU offload), LoRA or full fine-tuning, response-only loss.

Inject and every defense call `Trainer(...).fit(rows, out_dir)` with TrainRow rows; defenses change it only
through plugins (pipeline/train/plugins.py, which lists the hooks and TrainRow's fields). `fit` reads top to
bottom, one method a step:
  setup        seeds -> plugin transforms -> row check (TrainRow) -> build_model -> encode (the shared prompt
               format) -> plugin setup -> TrainModule (model + plugin tensors) -> total_steps -> setup_engine
               (DeepSpeed config, AdamW, warm-up + decay schedule, deepspeed.initialize)
  resume       engine state, step, micro-batch and every rank's RNG from the newest complete checkpoint
  train_loop   micro-batches of a seeded per-epoch order, sharded by rank (padded or packed; those seen before
               a resume skipped) -> forward (plugins may splice embeddings) + plugin loss terms -> backward/step
               (one optimizer step per `grad_accum`, clipping) -> a record (self.records; TrainLogger: metrics
               JSONL, progress bar, TensorBoard) -> at the step boundary the ranks agree (`agree`) whether to
               checkpoint (every `save_every` steps, every `save_every_minutes`, or on Slurm's signal: then
               the checkpoint is the last thing done, pipeline/train/checkpoint.py)
  end          close the logger; save (ZeRO-3 shards gathered) as safetensors/adapter, unless stopped early.
Plugins reach the trainer through `extra_tensor`, `load_frozen`, `extra_forward` and `last_record`.
The distributed environment is read from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT); launch/distributed.py sets them from Slurm. Without them it runs as a single process.
"""
from __future__ import annotations

import itertools
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

from ..models import accepts_logits_to_keep, cpu_bf16, load_model, load_trained
from ..prompts import encode_example
from . import checkpoint
from .checkpoint import checkpoint_dir_for, cleanup_checkpoints  # noqa: F401 - the stages import them from here
from .logger import TrainLogger
from .packing import lm_loss, pack_examples, pad_batch, scored_positions
from .plugins import Plugin, TrainRow, check_rows, extra_key


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
            if not torch.cuda.is_available() and os.environ["WORLD_SIZE"] == "1":
                _no_shared_memory_op()
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    finally:
        if own_port:  # a port this process picked and now listens on must not leak into its children
            os.environ.pop("MASTER_PORT", None)
    return dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])


def _no_shared_memory_op():
    """One CPU process has no peer to all-reduce with through shared memory: DeepSpeed's CPU backend would
    still compile that C++ op (about 40 s of both cores at the first training on a fresh machine, a load at
    every one after). Several CPU ranks (torchrun) still get it."""
    import importlib

    ds_torch = importlib.import_module("deepspeed.comm.torch")  # not `import ... as`: deepspeed.comm.torch is torch
    if hasattr(ds_torch, "build_shm_op"):
        ds_torch.build_shm_op = lambda: None


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


class StepMeter:
    """Running sums of the optimizer step in progress: each logged value / grad_accum, its non-padding tokens,
    and (for tokens_per_s, train_wall_s) the tokens and time since training started."""

    def __init__(self, grad_accum: int):
        self.grad_accum = grad_accum
        self.t0 = self.t_step = time.time()
        self.tokens = self.step_tokens = 0
        self.logs: dict[str, float] = {}

    def add(self, logs: dict, n_tok: int):
        self.tokens += n_tok
        self.step_tokens += n_tok
        for k, v in logs.items():
            self.logs[k] = self.logs.get(k, 0.0) + v / self.grad_accum

    def next_step(self):
        self.t_step, self.step_tokens, self.logs = time.time(), 0, {}


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
        self.can_keep_logits = accepts_logits_to_keep(model)

    # ------------------------------------------------------------------------------------ data
    def encode(self, rows: list[TrainRow]) -> list[dict]:
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
        pos = None
        if self.can_keep_logits and not any(p.wants_logits for p in self.plugins):
            pos = scored_positions(batch["labels"])  # the LM head on the response tokens alone
        if pos is not None:
            kw["logits_to_keep"] = pos
        out = self.engine(**kw)
        loss = lm_loss(out.logits, batch["labels"], batch["sample_ids"], self.tc.loss_avg, positions=pos)
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

    # ------------------------------------------------------------------------------------ plugins' view
    def extra_tensor(self, plugin: Plugin | str, key: str) -> torch.nn.Parameter:
        """The live trainable tensor that `plugin` (or a plugin name) returned as `key` from `parameters()`:
        the one DeepSpeed trains (on the device; stored as `{plugin.name}__{key}`)."""
        return self.module.extra[extra_key(plugin, key)]

    def load_frozen(self, path: str | Path):
        """A trained stage output (pipeline.models.load_trained) on this trainer's device, frozen: eval mode,
        no parameter requires grad. Under ZeRO-3 it loads whole (HF's partitioned loading is switched off for
        it: a frozen model is replicated, never trained). Returns (model, tokenizer, model config)."""
        hf = getattr(self, "_hf_ds", None)
        if hf is not None:
            from transformers.integrations import deepspeed as hf_ds
            hf_ds.unset_hf_deepspeed_config()
        try:
            model, tok, mcfg = load_trained(path, device=str(self.device))
        finally:
            if hf is not None:
                hf_ds.set_hf_deepspeed_config(hf)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model, tok, mcfg

    # ------------------------------------------------------------------------------------ fit
    def fit(self, rows: list[TrainRow], out_dir: str | Path, ckpt_dir: str | Path | None = None,
            stop_after_steps: int | None = None, save: bool = True) -> dict:
        """Train on `rows` (TrainRow: {instruction, input, output, ...}) and save into `out_dir/model`. Resumes
        from `ckpt_dir` when it holds a checkpoint. `stop_after_steps` stops early (tests of kill/resume)."""
        checkpoint.catch_signals()  # from here a signal waits for the next step boundary
        try:
            examples = self.setup(rows)
            ckpt_dir = Path(ckpt_dir) if ckpt_dir else None
            step, micro = self.resume(ckpt_dir)
            out_dir = Path(out_dir)
            logger = TrainLogger(out_dir, self.total_steps, self.tc.log_every, main=self.is_main,
                                 tensorboard=self.tc.tensorboard).open(initial_step=step)
            meter = StepMeter(self.tc.grad_accum)
            step = self.train_loop(examples, step, micro, meter, logger, ckpt_dir, stop_after_steps)
            logger.close()
            if stop_after_steps and step < self.total_steps:
                return {"stopped_at": step}
            if save:  # still caught: a signal during the final save must not requeue a job that has trained
                self.save(out_dir)
        finally:  # a signal after the last step stays pending: a next phase's first step acts on it
            checkpoint.release_signals()
        if checkpoint.pending() and self.is_main:
            print(f"[train] {checkpoint.pending_name()} came after the last step: finishing the run", flush=True)
        return {"steps": step, "train_wall_s": time.time() - meter.t0, "final": self.last_record}

    def setup(self, rows: list[TrainRow]) -> list[dict]:
        """Seeds, the plugins' row transforms, the model, the tokenised examples, the plugins' setup, then the
        TrainModule (model + plugin tensors), the step count and the DeepSpeed engine. Returns the examples."""
        tc = self.tc
        torch.manual_seed(tc.seed)
        random.seed(tc.seed)
        np.random.seed(tc.seed)
        for p in self.plugins:
            rows = p.transform(rows)
        check_rows(rows)
        self.build_model()
        examples = self.examples = self.encode(rows)
        for p in self.plugins:
            p.setup(self)
        self.module = TrainModule(self.model, self.plugin_tensors())
        steps_per_epoch = math.ceil(len(self.micro_batches(examples, 0)) / tc.grad_accum)
        self.total_steps = tc.max_steps or max(1, int(math.ceil(steps_per_epoch * tc.epochs)))
        self.setup_engine()
        return examples

    def plugin_tensors(self) -> dict[str, torch.nn.Parameter]:
        """Every plugin's `parameters()`, keyed `{plugin.name}__{key}` (each plugin asked once)."""
        extra = {}
        for p in self.plugins:
            extra.update({extra_key(p, k): v for k, v in p.parameters().items()})
        return extra

    def setup_engine(self):
        """DeepSpeed config, the client optimizer (unless the config names DeepSpeed's), warm-up + decay
        schedule over `total_steps`, and the engine around the TrainModule."""
        import deepspeed

        tc, total = self.tc, self.total_steps
        dsc = deepspeed_config(tc, self.dc, self.world, self.cuda)
        params = [p for p in self.module.parameters() if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: every parameter is frozen")
        opt = None
        if "optimizer" not in dsc:
            opt = make_optimizer(params, tc, fused=self.cuda)
        sched = lambda o: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(total, tc.warmup_ratio, tc.schedule))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.module, model_parameters=params if opt is None else None, optimizer=opt,
            lr_scheduler=sched, config=dsc)
        self.device = self.engine.device

    def resume(self, ckpt_dir: Path | None) -> tuple[int, int]:
        """(optimizer step, micro-batch) to continue from: the newest complete checkpoint's in `ckpt_dir`
        (engine state and this rank's RNG restored), else (0, 0)."""
        found = checkpoint.find(ckpt_dir)
        if found is None:
            return 0, 0
        tag, state = found
        if state["world"] != self.world:
            print(f"[train] {ckpt_dir / tag}: written by {state['world']} ranks, not {self.world}: starting over")
            return 0, 0
        self.engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=False)
        rng = torch.load(ckpt_dir / tag / f"rng_rank{self.rank}.pt", weights_only=False)  # our own file
        torch.set_rng_state(rng["torch"])
        if self.cuda:
            torch.cuda.set_rng_state(rng["cuda"])
        random.setstate(rng["py"])
        np.random.set_state(rng["np"])
        if self.is_main:
            print(f"[train] resumed from {ckpt_dir} at step {state['step']}")
        return state["step"], state["micro"]

    def train_loop(self, examples: list[dict], step: int, micro: int, meter: StepMeter, logger: TrainLogger,
                   ckpt_dir: Path | None, stop_after_steps: int | None) -> int:
        """One optimizer step per `grad_accum` micro-batches from (step, micro) on, until `total_steps` or
        `stop_after_steps`; checkpoints as `agree` decides (a signal: checkpoint, then exit). Returns the
        last step."""
        tc = self.tc
        batches = self.micro_batch_stream(examples, skip=micro)
        self.saved_at = time.time()
        while step < self.total_steps:
            epoch, mb = next(batches)
            logs, n_tok = self.train_micro_batch(mb)
            micro += 1
            meter.add(logs, n_tok)
            if micro % tc.grad_accum:
                continue
            step += 1
            rec = self.step_record(step, epoch, meter)
            self.records.append(rec)
            logger.log(rec)
            signalled, due = self.agree(step)
            if ckpt_dir and (due or signalled) and step < self.total_steps:
                self.save_checkpoint(ckpt_dir, step, micro)
            if signalled and step < self.total_steps:
                checkpoint.hand_over(signalled, self.is_main)
            if stop_after_steps and step >= stop_after_steps:
                break
        return step

    def agree(self, step: int) -> tuple[int, bool]:
        """At an optimizer-step boundary: (the signal any rank caught: checkpoint.pending()'s code, whether a
        checkpoint is due: every `save_every` steps or `save_every_minutes`), the same on every rank (one
        all-reduce of both when distributed)."""
        tc = self.tc
        minutes = tc.save_every_minutes if tc.save_every_minutes is not None else self.cfg.cluster.save_every_minutes
        due = bool(tc.save_every and step % tc.save_every == 0)
        due |= bool(minutes) and time.time() - self.saved_at >= minutes * 60
        flags = [checkpoint.pending(), int(due)]
        if self.world > 1:
            import torch.distributed as dist
            t = torch.tensor(flags, dtype=torch.int64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flags = t.tolist()
        return flags[0], bool(flags[1])

    def barrier(self):
        """Wait for every rank (e.g. until rank 0 has written a phase's output that the next phase reads)."""
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()

    def micro_batch_stream(self, examples: list[dict], skip: int):
        """(epoch, micro-batch), epoch after epoch without end, less the first `skip` micro-batches (those a
        resumed run trained on before its checkpoint)."""
        seen = 0
        for epoch in itertools.count():
            for mb in self.micro_batches(examples, epoch):
                seen += 1
                if seen > skip:
                    yield epoch, mb

    def train_micro_batch(self, mb: list[dict]) -> tuple[dict, int]:
        """Forward (plugins included), backward and engine.step (which steps the optimizer only at the
        accumulation boundary) on one micro-batch; returns (its logs, its non-padding token count)."""
        batch = self.collate(mb)
        self.engine.train()
        with cpu_bf16(self.tc.cpu_bf16):
            loss, logs = self.forward_loss(batch)
        self.engine.backward(loss)
        self.engine.step()
        return logs, int((batch["sample_ids"] >= 0).sum())

    def step_record(self, step: int, epoch: int, meter: StepMeter) -> dict:
        """The metrics of the optimizer step just taken (the meter then starts the next step)."""
        dt = max(time.time() - meter.t0, 1e-9)
        if self.cuda:
            torch.cuda.synchronize()
        rec = {"step": step, "epoch": epoch, "lr": self.scheduler.get_last_lr()[0], **meter.logs,
               "tokens_per_s": meter.tokens * self.world / dt, "step_s": time.time() - meter.t_step,
               "step_tokens": meter.step_tokens * self.world}
        meter.next_step()
        return rec

    def save_checkpoint(self, ckpt_dir: Path, step: int, micro: int):
        """Every rank together: this rank's RNG and DeepSpeed's files (model and plugin tensors, optimizer,
        schedule) into `.tmp-step<N>`; DeepSpeed's save ends on a barrier, then rank 0 commits it."""
        tmp = Path(ckpt_dir) / f".tmp-step{step}"
        tmp.mkdir(parents=True, exist_ok=True)
        rng = {"torch": torch.get_rng_state(), "py": random.getstate(), "np": np.random.get_state(),
               "cuda": torch.cuda.get_rng_state() if self.cuda else None}
        torch.save(rng, tmp / f"rng_rank{self.rank}.pt")
        self.engine.save_checkpoint(str(ckpt_dir), tag=tmp.name, save_latest=False,
                                    exclude_frozen_parameters=self.peft)
        if self.is_main:
            checkpoint.commit(Path(ckpt_dir), tmp, {"step": step, "micro": micro, "world": self.world})
        self.saved_at = time.time()

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
