"""SANDE (Li et al. 2024; METHODS.md §2): trigger unknown, triggered response r_t known.

Stage 1 (simulate): the backdoored model is frozen; the only trainable tensor is a zero-initialised soft
"parrot" prompt (6 vectors x hidden size) spliced into the input embeddings where the attack puts its
trigger (the start of the user text; the official code uses a fixed index 2), attention extended and
labels -100 at its positions. Data: clean prompts -> r_t + the clean answer; loss on the first response
token only. Stage 2 (eliminate): the parrot is frozen and spliced into every prompt; the model trains to
the clean answer (loss on the first 10 response tokens). Evaluation uses the real trigger, no parrot.
`sande-p`: stage 1 knows only the first `known_tokens` tokens of r_t (our reading of SANDE-P).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..prompts import user_span
from ..train.plugins import FreezeModel, Plugin
from .base import Phase


@dataclass
class Params:
    n_vectors: int = 6
    parrot_lr: float = 1.0e-3
    parrot_epochs: float = 1.0
    parrot_response_tokens: int = 1  # the code's effective_len=1
    overwrite_response_tokens: int = 10
    known_tokens: int | None = None  # sande-p: only the first k tokens of r_t are known
    triggered_response: str | None = None  # default: the task's target behaviour
    position: str = "start"  # start: the start of the user text (paper); random: a random token of it per
    #                          sample and step, in both stages (for triggers at a random word, e.g. badnet)
    seed: int = 0
    space: str = "embedding"  # embedding: free vectors (paper); vocab: each vector a softmax mixture of the
    #                           token embeddings (the official code's commented-out alternative), so the
    #                           parrot stays among real tokens and can land on the trigger's own

    def __post_init__(self):
        if self.position not in ("start", "random"):
            raise ValueError(f"sande: position must be 'start' or 'random', not {self.position!r}")
        if self.space not in ("embedding", "vocab"):
            raise ValueError(f"sande: space must be 'embedding' or 'vocab', not {self.space!r}")


def splice(batch: dict, embeds: torch.Tensor, soft: torch.Tensor, pos) -> dict:
    """Insert `soft` [k, H] into every row of `embeds` [B, T, H] at token `pos` (an int, or one int per
    row); extend mask, labels, sample ids and positions so every original token keeps its label."""
    B, k = embeds.size(0), soft.size(0)
    pos = [pos] * B if isinstance(pos, int) else [int(p) for p in pos]
    soft = soft.to(embeds.dtype)

    def ins(t, fill):  # t [B, T, ...] -> [B, T + k, ...] with fill(i) [k, ...] at row i's position
        return torch.stack([torch.cat([t[i, :pos[i]], fill(i), t[i, pos[i]:]]) for i in range(B)])

    mask = batch["attention_mask"]
    new = dict(batch)
    ones = torch.ones(k, dtype=mask.dtype, device=mask.device)
    ign = torch.full((k,), -100, dtype=batch["labels"].dtype, device=mask.device)
    sid = batch["sample_ids"]
    new["inputs_embeds"] = ins(embeds, lambda i: soft)
    new["attention_mask"] = ins(mask, lambda i: ones)
    new["labels"] = ins(batch["labels"], lambda i: ign)
    new["sample_ids"] = ins(sid, lambda i: sid[i, :1].expand(k))
    new["position_ids"] = (new["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    new["input_ids"] = None
    return new


def random_positions(labels: torch.Tensor, start: int, suffix: int, gen: torch.Generator) -> list[int]:
    """One uniformly random token boundary of each row's user text: between `start` and the prompt's end
    (the first label) less the template's `suffix` tokens after the user text."""
    out = []
    for row in labels:
        idx = (row != -100).nonzero()
        end = (int(idx[0]) if len(idx) else row.numel()) - suffix
        out.append(int(torch.randint(start, max(start, end) + 1, (1,), generator=gen)))
    return out


class Parrot(Plugin):
    """The soft prompt. Trainable in stage 1 (`init=None`: zeros), frozen in stage 2 (`init`: a tensor)."""
    name = "parrot"

    def __init__(self, n_vectors: int, init: torch.Tensor | None = None, position: str = "start", seed: int = 0,
                 space: str = "embedding"):
        self.n, self.init, self.position, self.space = n_vectors, init, position, space
        self.gen = torch.Generator().manual_seed(seed)

    def setup(self, trainer):
        if trainer.tc.packing:
            raise ValueError("SANDE splices a soft prompt per sample: set train.packing=false")
        vocab, hidden = trainer.model.get_input_embeddings().weight.shape
        if self.init is None:  # zeros: the null vector, or (vocab space) the uniform mixture of all tokens
            self.param = torch.nn.Parameter(torch.zeros(self.n, vocab if self.space == "vocab" else hidden))
        else:
            self.param = torch.nn.Parameter(self.init.clone(), requires_grad=False)
        self.pos, self.suffix = user_span(trainer.tok, trainer.template)

    def parameters(self):
        return {"vectors": self.param} if self.init is None else {}

    def on_batch(self, trainer, batch):
        emb = trainer.model.get_input_embeddings()
        embeds = emb(batch["input_ids"])
        soft = trainer.extra_tensor(self, "vectors") if self.init is None else self.param.to(embeds.device)
        if self.space == "vocab":
            soft = soft.float().softmax(-1) @ emb.weight.float()
        pos = self.pos
        if self.position == "random":
            pos = random_positions(batch["labels"], self.pos, self.suffix, self.gen)
        return splice(batch, embeds, soft, pos)

    def save(self, trainer, out_dir):
        out = {"n_vectors": self.n, "position": self.pos, "placement": self.position, "space": self.space,
               "trained": self.init is None}
        if self.space == "vocab":  # the tokens the parrot leans on most: is it the trigger?
            p = (trainer.extra_tensor(self, "vectors") if self.init is None else self.param).detach().float()
            top = p.softmax(-1).topk(3, dim=-1)
            out["top_tokens"] = [[[trainer.tok.decode([int(i)]), round(float(w), 3)] for w, i in zip(ws, ix)]
                                 for ws, ix in zip(top.values, top.indices)]
        return {"parrot": out}


def triggered_response(params: Params, ctx, tok=None) -> str:
    r_t = params.triggered_response or ctx.cfg.task.target or ctx.cfg.task.target_label
    if not r_t:
        raise ValueError(f"task '{ctx.cfg.task.name}' has no target behaviour: set defense.params.triggered_response")
    if params.known_tokens is not None:
        from ..models import load_tokenizer
        tok = tok or load_tokenizer(ctx.cfg.model)
        ids = tok(r_t, add_special_tokens=False)["input_ids"][:params.known_tokens]
        r_t = tok.decode(ids)
    return r_t


class _LoadParrot(Parrot):
    """Stage 2's parrot: reads stage 1's trained vectors when the trainer is set up."""

    def __init__(self, n_vectors, phase_dir, position="start", seed=0, space="embedding"):
        super().__init__(n_vectors, init=None, position=position, seed=seed, space=space)
        self.phase_dir = phase_dir

    def setup(self, trainer):
        from safetensors.torch import load_file
        self.init = load_file(str(self.phase_dir / "extra.safetensors"))["parrot__vectors"]
        super().setup(trainer)


def phases(params: Params, ctx) -> list[Phase]:
    r_t = triggered_response(params, ctx)
    k1 = params.parrot_response_tokens
    stage1 = [{**r, "output": f"{r_t} {r.get('clean_output') or r['output']}", "response_tokens": k1}
              for r in ctx.defense_rows]
    stage2 = [{**r, "output": r.get("clean_output") or r["output"],
               "response_tokens": params.overwrite_response_tokens} for r in ctx.defense_rows]
    simulate = Phase("simulate", stage1, [FreezeModel(), Parrot(params.n_vectors, position=params.position,
                                                                 seed=params.seed, space=params.space)],
                     init_from="inject",
                     train={"lr": params.parrot_lr, "epochs": params.parrot_epochs, "packing": False},
                     final=False)
    parrot2 = _LoadParrot(params.n_vectors, ctx.phase_dir("simulate"), params.position, params.seed + 1,
                          params.space)
    eliminate = Phase("eliminate", stage2, [parrot2],
                      init_from="inject", train={"packing": False})
    return [simulate, eliminate]
