"""`sampling`: the decoding baseline (BackdoorLLM DefenseBox's "Decoding": temperature instead of greedy decoding).
A decoding-time defense: no weights are written; the manifest entry `decoding` {method: sampling, params:
{temperature, top_p, seeds}, suspect, suspect_hash} tells evaluate to sample the backdoored model's answers once
per seed and report each metric's mean and spread over the seeds.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .base import decoding_entry


@dataclass
class Params:
    temperature: float = 0.7
    top_p: float = 0.75
    seeds: list = field(default_factory=lambda: [0, 1, 2])

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (0 is greedy decoding: defense=none), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.seeds or not all(isinstance(s, int) for s in self.seeds) or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct integers, got {self.seeds!r}")


def apply(params: Params, ctx, out_dir: Path) -> dict:
    entry = decoding_entry(ctx, "sampling", {"temperature": params.temperature, "top_p": params.top_p,
                                             "seeds": list(params.seeds)})
    (Path(out_dir) / "decoding.json").write_text(json.dumps(entry, indent=1, sort_keys=True))
    note = (f"sampling: the no-defense model sampled (temperature {params.temperature:g}, top-p {params.top_p:g}; "
            f"weights unchanged) once per seed {', '.join(map(str, params.seeds))}: mean ± sample std over the seeds")
    return {"decoding": entry, "notes": [note]}
