"""W2SDefense (Zhao et al. 2024; METHODS.md §4): a clean teacher distils into the backdoored student.

Phase 1 `teacher` (not final): the teacher model (`teacher`, else `model.teacher`, else the student's own
base) is fully fine-tuned on the clean defense rows in the student's prompt format, together with its
feature head f_T = ReLU(W_up h_T + b_up) (d_T -> d_S, the student's width), an extra trainable tensor.
The official teacher's classifier reads the projected feature, so the head is trained by the task loss;
our generation analogue (choice): an auxiliary LM loss through the head, logits_aux =
lm_head_T(W_down f_T + b_down), added to the teacher's own LM loss (`teacher_aux_weight`). W_down is a
training aid only; phase 2 uses the teacher's own logits and f_T.

Phase 2 `student` (final): the backdoored model (continuing its LoRA adapter; a new LoRA over full
weights) trains on the same clean rows with
  L = lambda_ce * CE + lambda_kd * T^2 * KL(softmax(z_T / T) || softmax(z_S / T)) + lambda_fa * FA,
KL per response token over the vocabulary (classification tasks: over the label words' first tokens at
the answer position, `kd_space`), FA = mean over non-pad tokens of ||f_T - h_S||^2 with h_S the student's
final post-norm hidden state. `official_broadcast: true` reproduces the official code instead: one teacher
vector (the batch's last example's last token) against every student token, padding included.
The teacher is frozen (eval mode, no gradients) and must share the student's tokenizer.
"""
from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..train.packing import lm_loss as _lm_loss
from ..train.plugins import Plugin
from .base import Phase

NOTE = ("W2SDefense here is clean-to-poisoned, not weak-to-strong: the teacher is a clean full fine-tune of "
        "the student's own base model ({teacher}); no smaller model shares its tokenizer")


@dataclass
class Params:
    lambda_ce: float = 5.0
    lambda_kd: float = 0.001
    lambda_fa: float = 0.001
    temperature: float = 2.0
    teacher: str | None = None  # a configs/model name; None: model.teacher, else the student's base
    teacher_epochs: float | None = None  # None: the defense's train.epochs
    teacher_lr: float = 2.0e-5
    teacher_aux_weight: float = 1.0  # the LM loss through the feature head (trains W_up)
    official_broadcast: bool = False
    kd_space: str = "auto"  # auto (labels for classification tasks, else vocab) | vocab | labels
    # the feature head f_T: `aux` = ReLU(W_up h_T + b), trained with the teacher (the official form); `lstsq` =
    # W h_T + b fitted in closed form (ridge) to the student's own features on the clean rows, before phase 2
    head: str = "aux"
    head_ridge: float = 1.0e-3  # the ridge penalty, relative to the mean diagonal of the features' Gram matrix
    head_holdout: float = 0.2  # the fraction of clean rows held out to measure the head's explained variance

    def __post_init__(self):
        if self.kd_space not in ("auto", "vocab", "labels"):
            raise ValueError(f"kd_space must be auto, vocab or labels, got {self.kd_space!r}")
        if self.head not in ("aux", "lstsq"):
            raise ValueError(f"head must be aux or lstsq, got {self.head!r}")
        if not 0 < self.head_holdout < 1:
            raise ValueError(f"head_holdout must be in (0, 1), got {self.head_holdout}")
        if not self.head_ridge > 0:
            raise ValueError(f"head_ridge must be > 0 (the fit's normal equations need it), got {self.head_ridge}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


# ------------------------------------------------------------------------------------------ losses
def project(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool = True) -> torch.Tensor:
    """The teacher's feature head: ReLU(W h + b) (relu=False: W h + b, the fitted head), d_T -> d_S."""
    f = F.linear(h, weight.to(h.dtype), None if bias is None else bias.to(h.dtype))
    return torch.relu(f) if relu else f


class FeatureFit:
    """Streaming ridge regression y ~ W x + b over token features (normal equations in float64), and the
    explained variance R^2 = 1 - SSE / SST of any head on held-out tokens."""

    def __init__(self):
        self.xtx = self.xty = None

    def add(self, x: torch.Tensor, y: torch.Tensor):  # x [N, d_in], y [N, d_out]
        x1 = torch.cat([x.double(), x.new_ones(len(x), 1, dtype=torch.float64)], 1)
        xtx, xty = x1.T @ x1, x1.T @ y.double()
        self.xtx = xtx if self.xtx is None else self.xtx + xtx
        self.xty = xty if self.xty is None else self.xty + xty

    def solve(self, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(W [d_out, d_in], b [d_out]); the bias is not penalised."""
        d = self.xtx.shape[0] - 1
        lam = ridge * float(self.xtx.diagonal()[:d].mean())
        reg = torch.eye(d + 1, dtype=torch.float64, device=self.xtx.device) * lam
        reg[d, d] = 0
        wb = torch.linalg.solve(self.xtx + reg, self.xty)  # [d_in + 1, d_out]
        return wb[:d].T.float().contiguous(), wb[d].float().contiguous()


def explained_variance(pairs) -> float:
    """R^2 of predictions against targets over (pred [N, d], target [N, d]) chunks: 1 - SSE / SST, SST around
    the targets' mean feature vector."""
    sse, n, s, s2 = 0.0, 0, 0.0, 0.0
    for pred, y in pairs:
        pred, y = pred.double(), y.double()
        sse += float(((pred - y) ** 2).sum())
        n, s, s2 = n + len(y), s + y.sum(0), s2 + (y ** 2).sum(0)
    sst = float((s2 - s ** 2 / n).sum())
    return 1 - sse / sst if sst > 0 else float("nan")


def feature_loss(f_t: torch.Tensor, h_s: torch.Tensor, token_mask: torch.Tensor | None,
                 official_broadcast: bool = False) -> torch.Tensor:
    """||f_T - h_S||^2 averaged over non-pad tokens (`token_mask` [B, T], True = real token).

    official_broadcast: the official code's form, one teacher vector (the batch's last example, its last
    real token) against every student token, padding included."""
    f_t, h_s = f_t.float(), h_s.float()
    if official_broadcast:
        b = f_t.size(0) - 1
        if token_mask is not None and token_mask[b].any():
            t = int(token_mask[b].nonzero().max())
        else:
            t = f_t.size(1) - 1
        return ((f_t[b, t] - h_s) ** 2).sum(-1).mean()
    d = ((f_t - h_s) ** 2).sum(-1)  # [B, T]
    if token_mask is None:
        return d.mean()
    m = token_mask.to(d.dtype)
    return (d * m).sum() / m.sum().clamp(min=1)


def kd_positions(labels: torch.Tensor, answer_only: bool) -> torch.Tensor:
    """[B, T-1] mask of logit positions that predict a response token (answer_only: the first one of each
    response, i.e. the answer position; works for padded and packed rows)."""
    valid = labels[:, 1:] != -100
    if answer_only:
        valid = valid & (labels[:, :-1] == -100)
    return valid


def kd_loss(z_s: torch.Tensor, z_t: torch.Tensor, labels: torch.Tensor, temperature: float,
            label_ids: list[int] | None = None) -> torch.Tensor:
    """T^2 * KL(softmax(z_T/T) || softmax(z_S/T)), averaged over response tokens (label_ids: over those
    vocabulary entries only, at each answer position)."""
    pos = kd_positions(labels, answer_only=label_ids is not None)
    zs, zt = z_s[:, :-1][pos].float(), z_t[:, :-1][pos].float()
    if label_ids is not None:
        idx = torch.tensor(label_ids, device=zs.device)
        zs, zt = zs[:, idx], zt[:, idx]
    if zs.numel() == 0:
        return z_s.sum() * 0
    log_ps = F.log_softmax(zs / temperature, dim=-1)
    log_pt = F.log_softmax(zt / temperature, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    return kl.mean() * temperature ** 2


# ------------------------------------------------------------------------------------------ helpers
def hidden_size(mcfg) -> int:
    """A model config's hidden width, read from its config.json (no weights loaded)."""
    from transformers import AutoConfig

    from ..models import model_dir
    c = AutoConfig.from_pretrained(model_dir(mcfg), revision=mcfg.revision if mcfg.source == "hub" else None,
                                   trust_remote_code=mcfg.trust_remote_code)
    c = c.get_text_config() if hasattr(c, "get_text_config") else c
    return int(c.hidden_size)


def check_same_tokenizer(t_tok, s_tok, teacher: str, student: str):
    if len(t_tok) != len(s_tok) or t_tok.get_vocab() != s_tok.get_vocab():
        raise ConfigError(f"w2sdefense: teacher '{teacher}' (vocabulary {len(t_tok)}) and student '{student}' "
                          f"(vocabulary {len(s_tok)}) must share one tokenizer: the KL term compares their "
                          "next-token distributions position by position. Pick a same-family teacher "
                          "(defense.params.teacher or model.teacher).")


def teacher_model_cfg(params: Params, cfg):
    """(teacher name, its model config); the student's own config when the teacher is its base."""
    name = params.teacher or cfg.model.teacher or cfg.model.name
    if name == cfg.model.name:
        return name, cfg.model
    from ..config import compose_model, group_file, load_yaml
    data = load_yaml(group_file("model", name))
    data.setdefault("name", name)
    return name, compose_model(data)


def label_token_ids(tok, words: list[str]) -> list[int]:
    """The first token of each label word as the trainer encodes a response (distinct, else an error)."""
    ids = [tok(w, add_special_tokens=False)["input_ids"][0] for w in words]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"w2sdefense: the label words {words} share a first token ({ids}); label-space KD "
                          "cannot tell them apart: set defense.params.kd_space=vocab")
    return ids


# ------------------------------------------------------------------------------------------ plugins
class TeacherHead(Plugin):
    """Phase 1: the teacher's feature head ReLU(W_up h + b_up) (d_T -> d_S) and its training aid W_down,
    trained with the teacher through an auxiliary LM loss lm_head(W_down f_T + b_down)."""
    name = "w2s_teacher"
    wants_hidden_states = True

    def __init__(self, d_student: int, aux_weight: float = 1.0, template: str | None = None):
        self.d_s, self.aux_weight, self.template = d_student, aux_weight, template
        self.tensors: dict[str, torch.nn.Parameter] = {}

    def transform(self, rows):  # the student's prompt format, so phase 2 feeds the teacher familiar ids
        t = self.template or "chat"
        return [{**r, "template": r.get("template", t)} for r in rows]

    def setup(self, trainer):
        if trainer.dc.zero_stage == 3:
            raise ConfigError("w2sdefense: the teacher's feature head is used outside the model forward, which "
                              "ZeRO-3 does not gather; use deepspeed=zero2 (or zero2-offload)")
        d_t = trainer.model.get_input_embeddings().weight.shape[1]
        up, down = torch.nn.Linear(d_t, self.d_s), torch.nn.Linear(self.d_s, d_t)
        self.tensors = {"up_weight": up.weight, "up_bias": up.bias, "down_weight": down.weight,
                        "down_bias": down.bias}

    def parameters(self):
        return self.tensors

    def loss(self, trainer, batch, outputs, lm_loss):
        w_up, b_up, w_down, b_down = (trainer.extra_tensor(self, k) for k in ("up_weight", "up_bias", "down_weight",
                                                                               "down_bias"))
        h = outputs.hidden_states[-1]
        f = project(h, w_up, b_up)
        back = F.linear(f, w_down.to(h.dtype), b_down.to(h.dtype))
        aux = _lm_loss(trainer.model.get_output_embeddings()(back), batch["labels"], batch["sample_ids"],
                       trainer.tc.loss_avg)
        return lm_loss + self.aux_weight * aux, {"teacher_aux_lm": aux.item()}

    def save(self, trainer, out_dir):
        return {}


class Distill(Plugin):
    """Phase 2: the frozen teacher + its feature head; CE + KD + feature alignment on the student."""
    name = "w2s"
    wants_logits = True  # kd_loss masks logits laid out [B, T-1] (it could take the scored positions too)
    wants_hidden_states = True

    def __init__(self, params: Params, teacher_dir: Path, teacher: str, student: str,
                 label_words: list[str] | None = None):
        self.p, self.teacher_dir, self.teacher_name, self.student_name = params, Path(teacher_dir), teacher, student
        self.label_words = label_words
        self.teacher = None
        self.relu, self.head_r2 = True, None

    def setup(self, trainer):
        from safetensors.torch import load_file
        self.teacher, t_tok, _ = trainer.load_frozen(self.teacher_dir)  # frozen: eval, no grads, whole under ZeRO-3
        check_same_tokenizer(t_tok, trainer.tok, self.teacher_name, self.student_name)
        self.vocab = len(trainer.tok)
        for who, m in (("teacher", self.teacher), ("student", trainer.model)):
            v = m.get_output_embeddings().weight.shape[0]
            if v < self.vocab:
                raise ConfigError(f"w2sdefense: the {who}'s output layer has {v} logits for a tokenizer of "
                                  f"{self.vocab} tokens")
        extra = load_file(str(self.teacher_dir / "extra.safetensors"))
        dev = self.teacher.get_input_embeddings().weight.device
        self.w = extra[f"{TeacherHead.name}__up_weight"].to(dev)
        self.b = extra[f"{TeacherHead.name}__up_bias"].to(dev)
        d_s = trainer.model.get_input_embeddings().weight.shape[1]
        if self.w.shape[0] != d_s:
            raise ValueError(f"w2sdefense: the teacher's feature head maps to {self.w.shape[0]} dims, the student "
                             f"is {d_s} wide")
        self.label_ids = label_token_ids(trainer.tok, self.label_words) if self.label_words else None
        self.fit_head(trainer)

    def features(self, trainer, examples):
        """(teacher h_T, student h_S) of every non-pad token of `examples`, batch by batch: the teacher's and
        the student's (as it starts phase 2) final hidden states, no gradients, the student in eval mode."""
        from ..train.packing import pad_batch
        model, dev, bs = trainer.model, self.w.device, trainer.tc.micro_batch
        was_training = model.training
        model.to(dev).eval()
        try:
            with torch.no_grad():
                for i in range(0, len(examples), bs):
                    b = pad_batch(examples[i:i + bs], trainer.tok.pad_token_id)
                    kw = {k: b[k].to(dev) for k in ("input_ids", "attention_mask", "position_ids")}
                    keep = b["sample_ids"].to(dev) >= 0
                    h_t = self.teacher(**kw, output_hidden_states=True, use_cache=False).hidden_states[-1]
                    h_s = model(**kw, output_hidden_states=True, use_cache=False).hidden_states[-1]
                    yield h_t[keep].float(), h_s[keep].float()
        finally:
            model.train(was_training)

    def fit_head(self, trainer):
        """The head's explained variance of the student's features on held-out clean rows (both heads), and
        with `head: lstsq` the head itself: W h_T + b fitted by ridge regression on the other rows."""
        ex = list(trainer.examples)
        random.Random(trainer.tc.seed).shuffle(ex)
        k = min(len(ex) - 1, max(1, round(len(ex) * self.p.head_holdout)))
        if k < 1:  # one row: nothing to hold out
            if self.p.head == "lstsq":
                raise ConfigError("w2sdefense: head=lstsq needs at least 2 clean rows (one held out)")
            return
        held, fit = ex[:k], ex[k:]
        if self.p.head == "lstsq":
            acc = FeatureFit()
            for h_t, h_s in self.features(trainer, fit):
                acc.add(h_t, h_s)
            w, b = acc.solve(self.p.head_ridge)
            self.w, self.b, self.relu = w.to(self.w.device), b.to(self.w.device), False
        self.head_r2 = explained_variance((project(h_t, self.w, self.b, self.relu), h_s)
                                          for h_t, h_s in self.features(trainer, held))
        if trainer.is_main:
            print(f"[w2sdefense] feature head ({self.p.head}): explains {self.head_r2:.3f} of the student's "
                  f"feature variance on {len(held)} held-out clean rows")

    def loss(self, trainer, batch, outputs, lm_loss):
        if batch.get("input_ids") is None:
            raise ValueError("w2sdefense: the teacher needs the token ids (no inputs_embeds-only batches)")
        with torch.no_grad():
            t_out = self.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 position_ids=batch["position_ids"], output_hidden_states=True, use_cache=False)
            f_t = project(t_out.hidden_states[-1], self.w, self.b, self.relu)
        v = self.vocab
        kd = kd_loss(outputs.logits[..., :v], t_out.logits[..., :v], batch["labels"], self.p.temperature,
                     self.label_ids)
        fa = feature_loss(f_t, outputs.hidden_states[-1], batch["sample_ids"] >= 0, self.p.official_broadcast)
        total = self.p.lambda_ce * lm_loss + self.p.lambda_kd * kd + self.p.lambda_fa * fa
        return total, {"kd": kd.item(), "feature_align": fa.item()}

    def save(self, trainer, out_dir):
        mode = "clean-to-poisoned" if self.teacher_name == self.student_name else "weak-to-strong"
        entry = {"w2s_mode": mode, "w2sdefense": {
            "teacher": self.teacher_name, "student": self.student_name, "mode": mode,
            "lambda_ce": self.p.lambda_ce, "lambda_kd": self.p.lambda_kd, "lambda_fa": self.p.lambda_fa,
            "temperature": self.p.temperature, "kd_space": "labels" if self.label_ids else "vocab",
            "official_broadcast": self.p.official_broadcast, "projection": list(self.w.shape[::-1]),
            "head": self.p.head,
            "head_r2_heldout": None if self.head_r2 is None or self.head_r2 != self.head_r2 else round(self.head_r2, 4)}}
        if mode == "clean-to-poisoned":
            entry["notes"] = [NOTE.format(teacher=self.teacher_name)]
        return entry


def phases(params: Params, ctx) -> list[Phase]:
    cfg = ctx.cfg
    if cfg.deepspeed.zero_stage == 3:
        raise ConfigError("w2sdefense: the teacher's feature head is used outside the model forward, which "
                          "ZeRO-3 does not gather; use deepspeed=zero2 (or zero2-offload)")
    student = cfg.model.name
    teacher, tmcfg = teacher_model_cfg(params, cfg)
    from ..models import load_tokenizer
    s_tok = load_tokenizer(cfg.model)
    t_tok = s_tok if tmcfg is cfg.model else load_tokenizer(tmcfg)
    check_same_tokenizer(t_tok, s_tok, teacher, student)  # fail before any training
    same_chat = getattr(t_tok, "chat_template", None) == getattr(s_tok, "chat_template", None)
    if cfg.model.chat_template is None and not same_chat:
        print(f"[w2sdefense] warning: teacher '{teacher}' trains with its own tokenizer chat template, which differs "
              "from the student's; set model.chat_template to a named template for one identical format",
              file=sys.stderr)
    kd_space = params.kd_space
    if kd_space == "auto":
        kd_space = "labels" if cfg.task.kind == "classification" and cfg.task.labels else "vocab"
    label_words = list(cfg.task.labels) if kd_space == "labels" else None
    if kd_space == "labels":
        if not cfg.task.labels:
            raise ConfigError(f"w2sdefense: kd_space=labels needs task.labels (task '{cfg.task.name}' has none)")
        label_token_ids(s_tok, label_words)
    if params.head == "lstsq" and len(ctx.defense_rows) < 2:
        raise ConfigError(f"w2sdefense: head=lstsq fits on some clean rows and measures on others: it needs at least "
                          f"2 defense rows, got {len(ctx.defense_rows)} (raise poison.n_defense)")
    t_train = {"finetune": "full", "lr": params.teacher_lr, "merge_lora": False}
    if params.teacher_epochs is not None:
        t_train["epochs"] = params.teacher_epochs
    head = TeacherHead(hidden_size(cfg.model), params.teacher_aux_weight, cfg.model.chat_template)
    teach = Phase("teacher", ctx.defense_rows, [head], init_from="base", train=t_train,
                  model=None if tmcfg is cfg.model else teacher, final=False)
    distil = Phase("student", ctx.defense_rows,
                   [Distill(params, ctx.phase_dir("teacher"), teacher, student, label_words)], init_from="inject")
    return [teach, distil]
