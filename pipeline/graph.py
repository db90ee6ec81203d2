"""The pipeline's shape (first step: where each stage's output goes)."""
from __future__ import annotations

import argparse
from pathlib import Path


def output_dir(stage: str, cfg, base: bool = False) -> Path:
    ns = argparse.Namespace(data=None, model_dir=None, base=base)
    if stage == "poison":
        from .poison.stage import output_dir as f
        return f(cfg)
    if stage == "inject":
        from .inject import output_dir as f
    elif stage == "defend":
        from .defend.stage import output_dir as f
    else:
        from .evaluate.stage import output_dir as f
    return Path(f(cfg, ns))
