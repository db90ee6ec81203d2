"""OSFT, trigger known (Li et al. 2024; METHODS.md §1): every clean defense sample twice, once with the
known trigger inserted exactly as the attack inserts it and once plain, both mapped to the sample's own
clean response; loss on the first `response_tokens` response tokens (the code's train_effective_len)."""
from __future__ import annotations

import random
from dataclasses import dataclass

from ..train.plugins import Plugin
from .base import Phase


@dataclass
class Params:
    response_tokens: int | str = 10  # "all" = the whole response
    seed: int = 0


class OverwriteTransform(Plugin):
    name = "osft"

    def __init__(self, attack_cfg, params: Params, task_cfg=None):
        self.attack, self.params, self.task = attack_cfg, params, task_cfg

    def transform(self, rows):
        from ..attacks import insert_trigger
        from ..tasks import trigger_field
        rng = random.Random(self.params.seed)
        k = None if self.params.response_tokens == "all" else int(self.params.response_tokens)
        out = []
        for r in rows:
            clean = r.get("clean_output") or r["output"]
            field = trigger_field(self.task, self.attack, r) if self.task is not None else self.attack.field
            trig_text, trig = insert_trigger(self.attack, r.get(field) or "", rng)
            triggered = {**r, field: trig_text, "output": clean, "trigger": trig, "response_tokens": k}
            out += [triggered, {**r, "output": clean, "response_tokens": k}]
        return out


def phases(params: Params, ctx) -> list[Phase]:
    return [Phase("overwrite", ctx.defense_rows, [OverwriteTransform(ctx.cfg.attack, params, ctx.cfg.task)], init_from="inject")]
