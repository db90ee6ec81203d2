"""What every defense module shares: its context, its training phases, and how it is found.

A defense is two files: its module and its YAML (`configs/defense/<name>.yaml`). The module holds a `Params`
dataclass (the `defense.params` of its YAML), its plugin classes, and `phases(params, ctx) -> list[Phase]`
(training defenses) or `apply(params, ctx, out_dir) -> dict` (weight edits: prune, quantize). The YAML names
its module with `method:` — a module of this package (`method: w2s` is pipeline/defend/w2s.py), or any
importable module (`method: mylab.toy`, on PYTHONPATH) — or leaves it out when the module has the YAML's
name. A variant (other params or train settings, e.g. sande-p) is a YAML alone naming the same method. No
registry to edit. The stage runs the phases in order on the one trainer; nothing else is special.

What a defended model changes about how it is queried or reported travels in its manifest, never in code
that evaluate imports: a plugin's `save()` (or `apply`'s result) may return `inference_transform`
({prefix, template, label_map, output_prefix}: evaluate applies it to every prompt and answer), `notes`
([str]: printed under the report's tables), `load_in_4bit` (how pipeline.models.load_trained loads it) and
`decoding` (a decoding-time defense, `family: decoding`, which writes no weights: {method, params, suspect,
suspect_hash, ...}: evaluate decodes the suspect, the backdoored model at `suspect`, with pipeline/decoding.py's
`method` and `params`; cleangen adds `reference`, `reference_model` (the reference's model config section) and
`reference_is_base`; see `decoding_entry`).
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError

# manifest entries an `apply` defense's result may set for evaluate and the report (see above)
MANIFEST_KEYS = ("inference_transform", "notes", "load_in_4bit", "decoding")


@dataclass
class Context:
    cfg: Any  # the composed Config
    data_dir: Path  # the poison output
    model_dir: Path | None  # the inject output (post-hoc), None for training-time defenses
    defense_rows: list[dict]  # the clean `defense` split
    train_rows: list[dict]  # the (possibly poisoned) `train` split
    work: Path  # a scratch directory inside the output's temporary directory

    def phase_dir(self, phase: str) -> Path:
        """Where a non-final phase's output goes (a later phase, e.g. SANDE's overwrite or W2SDefense's
        student, reads what an earlier one left there)."""
        return self.work / f"phase-{phase}"


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


def module_name(dcfg) -> str:
    """The module that implements a defense config: `method`, else the config's own name; a bare name is a
    module of this package when it has one, else imported as it is."""
    m = dcfg.method or dcfg.name
    if "." not in m and importlib.util.find_spec(f"{__package__}.{m}") is not None:
        return f"{__package__}.{m}"
    return m


def method(cfg):
    """(module, params) of the configured defense, checked: the module exists and has the two members."""
    name, where = cfg.defense.name, f"configs/defense/{cfg.defense.name}.yaml"
    if name == "none" or cfg.defense.family == "none":
        raise ConfigError(f"defense '{name}': nothing to run; pick a defense (python -m pipeline list)")
    mod_name = module_name(cfg.defense)
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and mod_name.startswith(e.name):
            raise ConfigError(f"{where}: defense.method: no module '{mod_name}' (a module of pipeline/defend/, "
                              "or an importable module on PYTHONPATH)") from None
        raise
    if not hasattr(mod, "Params") or not (hasattr(mod, "phases") or hasattr(mod, "apply")):
        raise ConfigError(f"{where}: module {mod_name} is not a defense (it needs a Params dataclass and "
                          "phases(params, ctx) or apply(params, ctx, out_dir))")
    return mod, parse_params(mod.Params, cfg.defense.params, f"{where}: defense.params")


def decoding_entry(ctx, method: str, params: dict) -> dict:
    """The manifest entry `decoding` of a decoding-time defense: the method, its decoding parameters, and the
    suspect it decodes (the backdoored model this defense was handed, named relative to the store root so a
    moved store still finds it: store.store_relative; its output hash pinned)."""
    from ..store import read_manifest, store_relative
    return {"method": method, "params": params, "suspect": store_relative(ctx.model_dir),
            "suspect_hash": read_manifest(ctx.model_dir)["output_hash"]}
