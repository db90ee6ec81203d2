"""Stage defend: backdoored model (+ clean `defense` split) -> defended model; or, for a training-time
defense (P2P), base model + poisoned `train` split -> the model the defender ships.

`python -m pipeline defend defense=crow` (or `make stage-defend DEFENSE=crow`). `--dry-run` prints the
resolved config and the launch command without training (what a cluster job would run).
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from .. import store
from ..config import ConfigError, TrainCfg, build_section, compose_model, config_root, load_yaml, plain_section
from ..train.trainer import Trainer, checkpoint_dir_for, cleanup_checkpoints
from .base import REGISTRY, Context, parse_params

SECTIONS = ("model", "train", "deepspeed", "task", "attack", "defense")


def add_arguments(p):
    p.add_argument("--data", default=None, help="a poison output (default: the one cfg names)")
    p.add_argument("--model-dir", default=None, help="an inject output to defend (default: the one cfg names)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and launch command only")


def method(cfg):
    name = cfg.defense.name
    if name == "none" or cfg.defense.family == "none":
        raise ConfigError(f"defense '{name}': nothing to run; pick one of {', '.join(REGISTRY)}")
    if name not in REGISTRY:
        raise ConfigError(f"configs/defense/{name}.yaml: no defense module registered as '{name}' "
                          f"(registered: {', '.join(REGISTRY)})")
    mod = importlib.import_module(REGISTRY[name])
    return mod, parse_params(mod.Params, cfg.defense.params, f"configs/defense/{name}.yaml: defense.params")


def _inputs(cfg, args):
    from ..poison.stage import output_dir as poison_output_dir
    data = Path(args.data) if getattr(args, "data", None) else poison_output_dir(cfg)
    store.require_complete(data, "poisoned set")
    model_dir = None
    if cfg.defense.family == "post_hoc":
        if getattr(args, "model_dir", None):
            model_dir = Path(args.model_dir)
        else:
            from ..inject import output_dir as inject_output_dir
            model_dir = inject_output_dir(cfg)
        store.require_complete(model_dir, "backdoored model (run the inject stage first)")
    return data, model_dir


def _key(cfg, data, model_dir):
    config = {s: cfg.raw[s] for s in SECTIONS}
    config["train"] = defense_train(cfg)
    # names only of what the output depends on: the same backdoored model serves every defense and cluster
    config["choices"] = {g: cfg.choices[g] for g in ("model", "task", "attack", "defense")}
    inputs = {"data": store.read_manifest(data)["output_hash"]}
    if model_dir is not None:
        inputs["model"] = store.read_manifest(model_dir)["output_hash"]
    name = f"{cfg.model.name}-{cfg.task.name}-{cfg.attack.name}-{cfg.defense.name}"
    return name, config, inputs


def output_dir(cfg, args=None) -> Path:
    data, model_dir = _inputs(cfg, args)
    name, config, inputs = _key(cfg, data, model_dir)
    return store.output_path("defend", name, {"stage": "defend", "config": config, "inputs": inputs, "extra": None})


def _rows(data: Path, split: str) -> list[dict]:
    from datasets import load_from_disk
    return [dict(r) for r in load_from_disk(str(data / "data"))[split]]


# Settings of `train` (the inject recipe) that a defense inherits: the sequence shape and run mechanics,
# not the recipe (lr, epochs, loss averaging, response cutoff, full vs LoRA), which `defense.train` sets.
INHERITED = ("cutoff", "grad_ckpt", "packing", "seed", "save_every", "log_every", "tensorboard", "max_steps",
             "lora_targets", "compile", "liger", "cpu_bf16")


def defense_train(cfg) -> dict:
    """The defense's training settings. Post-hoc: defaults <- inherited keys of `train` <- `defense.train`.
    Training-time (P2P): the defense replaces the victim's own fine-tuning, so it trains with the whole
    `train` recipe (the one the no-defense inject row used) <- `defense.train` (empty unless a preset such
    as p2p-paper sets the paper's own recipe); only the data differ between the two rows (so a
    `train.clean_targets=self` run answers the clean rows with the base model before P2P's transform, as
    inject does)."""
    base = plain_section("train", TrainCfg())
    keys = cfg.raw["train"] if cfg.defense.family == "training_time" else INHERITED
    base.update({k: cfg.raw["train"][k] for k in keys if k in cfg.raw["train"]})
    base.update(cfg.defense.train)
    return base


def phase_config(cfg, phase):
    """cfg with the defense's and the phase's train settings (and model) applied, validated."""
    raw_train = {**defense_train(cfg), **phase.train}
    new = dataclasses.replace(cfg, train=build_section("train", raw_train, {"train": f"defense phase {phase.name}"}))
    if phase.model:
        data = load_yaml(config_root() / "model" / f"{phase.model}.yaml")
        data.setdefault("name", phase.model)
        new = dataclasses.replace(new, model=compose_model(data))
        new.raw = {**new.raw, "model": dataclasses.asdict(new.model)}
    new.raw = {**new.raw, "train": plain_section("train", new.train)}
    return new


def _mark_phase_output(path: Path, pcfg):
    """Make a phase's output loadable by `load_trained` (a later phase may start from it)."""
    (path / "config.yaml").write_text(yaml.safe_dump(pcfg.raw))
    (path / "manifest.json").write_text('{"output_hash": "phase"}')
    (path / store.SUCCESS).write_text("")


def run_phases(cfg, mod, params, ctx, out_tmp: Path, ckpt_root: Path) -> dict:
    phases = mod.phases(params, ctx)
    results, prev = {}, None
    for i, ph in enumerate(phases):
        pcfg = phase_config(cfg, ph)
        init = {"inject": ctx.model_dir, "base": None, "previous": prev}.get(ph.init_from, ph.init_from)
        dest = out_tmp if ph.final else ctx.work / f"phase{i}-{ph.name}"
        dest.mkdir(parents=True, exist_ok=True)
        print(f"[defend] {cfg.defense.name}: phase {i + 1}/{len(phases)} '{ph.name}' on {len(ph.rows)} rows",
              file=sys.stderr)
        tr = Trainer(pcfg, plugins=ph.plugins, init_from=init)
        res = tr.fit(ph.rows, dest, ckpt_root / f"phase{i}")
        ph.trainer = tr
        results[ph.name] = res
        if not ph.final:
            _mark_phase_output(dest, pcfg)
            if (dest / "extra.safetensors").is_file():  # keep what a phase learned (SANDE's parrot)
                out_tmp.mkdir(parents=True, exist_ok=True)
                shutil.copy(dest / "extra.safetensors", out_tmp / f"{ph.name}.extra.safetensors")
        prev = dest
    manifest = {}
    for ph in phases:
        for p in ph.plugins:
            if ph.final:
                manifest.update(p.save(ph.trainer, out_tmp) or {})
    return {"phases": results, "manifest": manifest}


def dry_run(cfg, args):
    """Print the resolved config, the launch command and the output path; train nothing."""
    print(yaml.safe_dump({"choices": cfg.choices, **{s: cfg.raw[s] for s in SECTIONS},
                          "defense_train": defense_train(cfg), "cluster": cfg.raw["cluster"]}, sort_keys=True))
    gpus = cfg.cluster.gpus_per_node
    launcher = ["torchrun", f"--nnodes={cfg.cluster.nodes}", f"--nproc_per_node={gpus}"] if gpus > 1 else ["python"]
    cmd = [*launcher, "-m", "pipeline", "defend", *getattr(args, "overrides", [])]
    print("launch:", " ".join(shlex.quote(c) for c in cmd),
          f"(executor: {cfg.cluster.executor}; on Slurm: python -m pipeline sweep ... cluster=<profile>)")
    try:
        data, model_dir = _inputs(cfg, args)
        name, config, inputs = _key(cfg, data, model_dir)
        final = store.output_path("defend", name, {"stage": "defend", "config": config, "inputs": inputs,
                                                   "extra": None})
        print("output:", final)
        return final
    except (store.StoreError, FileNotFoundError, ConfigError) as e:
        print(f"inputs not built yet ({e}); the output path is known once they are")
        return None


def run(cfg, args) -> Path:
    mod, params = method(cfg)
    if getattr(args, "dry_run", False):
        return dry_run(cfg, args)
    data, model_dir = _inputs(cfg, args)
    name, config, inputs = _key(cfg, data, model_dir)
    defense_rows = _rows(data, "defense")
    train_rows = []
    if cfg.defense.family == "training_time":  # the inject stage's rows, clean answers included
        from ..inject import self_targets
        tcfg = dataclasses.replace(cfg, train=build_section("train", defense_train(cfg), {"train": "defense"}))
        train_rows, _ = self_targets(tcfg, _rows(data, "train"))
    if int(os.environ.get("RANK", "0")) != 0 and hasattr(mod, "phases"):
        final = store.output_path("defend", name, {"stage": "defend", "config": config, "inputs": inputs,
                                                   "extra": None})
        with tempfile.TemporaryDirectory() as tmp:
            ctx = Context(cfg, data, model_dir, defense_rows, train_rows, Path(tmp))
            run_phases(cfg, mod, params, ctx, Path(tmp) / "out", checkpoint_dir_for(final))
        return final
    with store.stage_output("defend", name, config, inputs, force=getattr(args, "force", False)) as out:
        if out is None:
            return output_dir(cfg, args)
        with tempfile.TemporaryDirectory(dir=out.tmp.parent, prefix=".work-") as work:
            ctx = Context(cfg, data, model_dir, defense_rows, train_rows, Path(work))
            if hasattr(mod, "apply"):
                result = mod.apply(params, ctx, out.tmp)
                # loading instructions (a 4-bit entry) belong at the top of the manifest, where load_trained looks
                res = {"result": result, "manifest": {k: result[k] for k in ("load_in_4bit",) if k in result}}
            else:
                res = run_phases(cfg, mod, params, ctx, out.tmp, checkpoint_dir_for(out.final))
        out.metrics.update(copy.deepcopy(res.get("phases", res.get("result", {}))))
        out.extra.update({"defense": cfg.defense.name, "family": cfg.defense.family, "data": str(data),
                          "backdoored_model": str(model_dir) if model_dir else None, **res["manifest"]})
    cleanup_checkpoints(out.final)
    return out.final
