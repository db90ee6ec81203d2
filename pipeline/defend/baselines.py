"""`finetune`: plain SFT of the backdoored model on the clean defense split (CROW's baseline: lr 2e-4,
5 epochs, continuing the backdoored adapter). No plugin: the trainer as it is."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Phase


@dataclass
class Params:
    pass


def phases(params: Params, ctx) -> list[Phase]:
    return [Phase("finetune", ctx.defense_rows, init_from="inject")]
