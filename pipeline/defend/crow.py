"""CROW (Min et al. 2024; METHODS.md §3): LM loss + alpha * consistency of consecutive layers' hidden
states, measured on FGSM-perturbed input embeddings (one step, epsilon 0.1), continuing the backdoored
adapter on the clean defense set. Padding is masked out of the consistency mean (our choice; the
official code averages over padding too: `mask_padding: false` restores that)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..train.plugins import Plugin
from .base import Phase


@dataclass
class Params:
    alpha: float = 5.5  # 11 for refusal (configs/defense/crow.yaml notes it)
    epsilon: float = 0.1
    mask_padding: bool = True
    # `absolute`: the FGSM step moves each embedding coordinate by epsilon (the code's form, set for
    # Llama-2-7B); `embedding_rms`: by epsilon x the RMS of the token embedding matrix's entries, so the step
    # keeps its size relative to the embeddings across models
    epsilon_scale: str = "absolute"

    def __post_init__(self):
        if self.epsilon_scale not in ("absolute", "embedding_rms"):
            raise ValueError(f"epsilon_scale must be absolute or embedding_rms, got {self.epsilon_scale!r}")


def embedding_scale(weight: torch.Tensor) -> tuple[float, float]:
    """(RMS of the entries, mean L2 norm of a token's embedding) of an embedding matrix [V, d]."""
    w = weight.detach().float()
    return float(w.pow(2).mean().sqrt()), float(w.norm(dim=-1).mean())


def consistency_loss(hidden_states, mask: torch.Tensor | None) -> torch.Tensor:
    """mean(1 - cos(h_l, h_{l+1})) over layers hidden_states[1:-2] vs [2:-1] and (non-pad) tokens."""
    hs = torch.stack(hidden_states[1:-1])  # [L-?, B, T, H]: skip the embedding output
    cos = torch.nn.functional.cosine_similarity(hs[:-1].float(), hs[1:].float(), dim=-1)  # [n, B, T]
    d = 1 - cos
    if mask is None:
        return d.mean()
    m = mask.to(d.dtype).unsqueeze(0).expand_as(d)
    return (d * m).sum() / m.sum().clamp(min=1)


class Consistency(Plugin):
    """Three passes per step (the official code has two): the trainer's pass gives the LM loss; a clean pass
    through the bare module gives the consistency whose gradient w.r.t. the embeddings makes the FGSM step;
    the perturbed pass gives the regulariser. The FGSM gradient cannot come from the trainer's pass itself:
    DeepSpeed's engine hooks the outputs of its forward and refuses (ZeRO-0) or runs its gradient reduction
    (ZeRO-1/2/3) on any backward through them other than engine.backward. Cost on the 7B shape: 2.4x a
    fine-tuning step (BENCHMARKS.md §3)."""
    name = "crow"
    wants_hidden_states = True

    def __init__(self, params: Params):
        self.p = params
        self.epsilon, self.step_ratio = params.epsilon, None

    def setup(self, trainer):
        """The effective epsilon, and the FGSM step's norm relative to a token embedding's (in the manifest)."""
        w = trainer.model.get_input_embeddings().weight
        if hasattr(w, "ds_id"):  # partitioned under ZeRO-3: gather it to measure
            import deepspeed
            with deepspeed.zero.GatheredParameters([w]):
                rms, norm = embedding_scale(w)
        else:
            rms, norm = embedding_scale(w)
        self.epsilon = self.p.epsilon * (rms if self.p.epsilon_scale == "embedding_rms" else 1.0)
        d = getattr(w, "ds_shape", w.shape)[-1]  # a ZeRO-3 partition's own shape is [0]
        self.step_ratio = self.epsilon * d ** 0.5 / norm if norm > 0 else None
        if trainer.is_main and self.step_ratio is not None:
            print(f"[crow] epsilon {self.epsilon:.4g} ({self.p.epsilon_scale}): the FGSM step's norm is "
                  f"{self.step_ratio:.2f} of a token embedding's")

    def save(self, trainer, out_dir):
        return {"crow": {"epsilon": self.epsilon, "epsilon_scale": self.p.epsilon_scale,
                         "step_norm_over_embedding_norm": None if self.step_ratio is None
                         else round(self.step_ratio, 4)}}

    def loss(self, trainer, batch, outputs, lm_loss):
        mask = batch["attention_mask"] if self.p.mask_padding else None
        if mask is None and self.p.mask_padding:  # packed rows: every non-pad token counts
            mask = (batch["sample_ids"] >= 0).long()
        embed = trainer.model.get_input_embeddings()
        embeds = embed(batch["input_ids"]).detach().requires_grad_(True)
        kw = dict(attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                  output_hidden_states=True, use_cache=False)
        if trainer.can_keep_logits:  # only hidden states are read: the LM head on one position, not every one
            kw["logits_to_keep"] = 1
        clean_c = consistency_loss(trainer.extra_forward(inputs_embeds=embeds, **kw).hidden_states, mask)
        grad, = torch.autograd.grad(clean_c, embeds)
        perturbed = (embeds + self.epsilon * grad.sign()).detach()
        pert_c = consistency_loss(trainer.extra_forward(inputs_embeds=perturbed, **kw).hidden_states, mask)
        return lm_loss + self.p.alpha * pert_c, {"consistency": clean_c.item(), "consistency_perturbed": pert_c.item()}


def phases(params: Params, ctx) -> list[Phase]:
    return [Phase("crow", ctx.defense_rows, [Consistency(params)], init_from="inject")]
