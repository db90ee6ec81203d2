"""What every defense module shares: its context, its training phases, and its registry entry.

A defense module (`pipeline/defend/<name>.py`) holds a `Params` dataclass (the `defense.params` of its
config), its plugin classes, and `phases(params, ctx) -> list[Phase]` (training defenses) or
`apply(params, ctx, out_dir) -> dict` (weight edits: prune, quantize). The stage runs the phases in order
on the one trainer; nothing else is special.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError

REGISTRY = {  # name -> module; `defense=<name>` picks configs/defense/<name>.yaml, whose `params` fill Params
    "finetune": "pipeline.defend.baselines",
    "osft": "pipeline.defend.osft",
    "sande": "pipeline.defend.sande",
    "sande-p": "pipeline.defend.sande",
    "crow": "pipeline.defend.crow",
    "w2sdefense": "pipeline.defend.w2s",
    "w2sdefense-insent": "pipeline.defend.w2s",  # the InSent loss weights (ablation)
    "w2sdefense-syn": "pipeline.defend.w2s",  # the SynAttack loss weights (ablation)
    "p2p": "pipeline.defend.p2p",
    "p2p-paper": "pipeline.defend.p2p",  # the official code's own LoRA recipe instead of the experiment's
    "prune": "pipeline.defend.prune",
    "quantize": "pipeline.defend.quantize",
}


@dataclass
class Context:
    cfg: Any  # the composed Config
    data_dir: Path  # the poison output
    model_dir: Path | None  # the inject output (post-hoc), None for training-time defenses
    defense_rows: list[dict]  # the clean `defense` split
    train_rows: list[dict]  # the (possibly poisoned) `train` split
    work: Path  # a scratch directory inside the output's temporary directory


@dataclass
class Phase:
    """One run of the trainer. `init_from`: 'inject' (the backdoored model), 'base', 'previous' (the
    phase before), or a path. `train`: overrides of cfg.train; `model`: a model config name to train
    instead of cfg.model (W2SDefense's teacher)."""
    name: str
    rows: list[dict]
    plugins: list = field(default_factory=list)
    init_from: str = "inject"
    train: dict = field(default_factory=dict)
    model: str | None = None
    final: bool = True


def parse_params(cls, data: dict, where: str = "defense.params"):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(names))})")
    try:
        return cls(**data)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None
