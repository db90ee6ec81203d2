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

    def loss(self, trainer, batch, outputs, lm_loss):
        mask = batch["attention_mask"] if self.p.mask_padding else None
        if mask is None and self.p.mask_padding:  # packed rows: every non-pad token counts
            mask = (batch["sample_ids"] >= 0).long()
        embed = trainer.model.get_input_embeddings()
        embeds = embed(batch["input_ids"]).detach().requires_grad_(True)
        kw = dict(attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                  output_hidden_states=True, use_cache=False)
        clean_c = consistency_loss(trainer.extra_forward(inputs_embeds=embeds, **kw).hidden_states, mask)
        grad, = torch.autograd.grad(clean_c, embeds)
        perturbed = (embeds + self.p.epsilon * grad.sign()).detach()
        pert_c = consistency_loss(trainer.extra_forward(inputs_embeds=perturbed, **kw).hidden_states, mask)
        return lm_loss + self.p.alpha * pert_c, {"consistency": clean_c.item(), "consistency_perturbed": pert_c.item()}


def phases(params: Params, ctx) -> list[Phase]:
    return [Phase("crow", ctx.defense_rows, [Consistency(params)], init_from="inject")]
