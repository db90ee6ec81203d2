"""Stage defend: backdoored model (+ clean `defense` split) -> defended model; or, for a training-time
defense (P2P), base model + poisoned `train` split -> the model the defender ships.

`python -m pipeline defend defense=crow` (or `make stage-defend DEFENSE=crow`). `--dry-run` prints the
resolved config and the launch command without training (what a cluster job would run). Handed its inputs
(`data`, and `model` for a post-hoc defense) by pipeline/graph.py; the defense itself is the module its
YAML names (pipeline/defend/base.py: `method`).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from .. import store
from ..config import ConfigError, TrainCfg, build_section, compose_model, group_file, load_yaml, plain_section
from ..self_answers import self_targets
from ..train.trainer import Trainer, checkpoint_dir_for, cleanup_checkpoints
from .base import MANIFEST_KEYS, Context, method


def add_arguments(p):
    p.add_argument("--data", default=None, help="a poison output (default: the one cfg names)")
    p.add_argument("--model-dir", default=None, help="an inject output to defend (default: the one cfg names)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and launch command only")


def identity(cfg, inputs) -> tuple[str, dict, dict]:
    """(name, config, input hashes). `inputs`: data (the poison output) and, post-hoc, model (the inject
    output). The defense's `method` (which module runs it) is not part of the key: its name and params are."""
    config = {s: cfg.raw[s] for s in inputs.own}
    config["defense"] = {k: v for k, v in config["defense"].items() if k != "method"}
    config["train"] = defense_train(cfg)
    # names only of what the output depends on: the same backdoored model serves every defense and cluster
    config["choices"] = {g: cfg.choices[g] for g in ("model", "task", "attack", "defense")}
    hashes = {"data": store.read_manifest(inputs["data"])["output_hash"]}
    if inputs.get("model") is not None:
        hashes["model"] = store.read_manifest(inputs["model"])["output_hash"]
    name = f"{cfg.model.name}-{cfg.task.name}-{cfg.attack.name}-{cfg.defense.name}"
    return name, config, hashes


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
    inject does). `defense.train.lr: inject` trains at the injection's own lr (`train.lr`; the variants
    osft-injlr / sande-injlr)."""
    base = plain_section("train", TrainCfg())
    keys = cfg.raw["train"] if cfg.defense.family == "training_time" else INHERITED
    base.update({k: cfg.raw["train"][k] for k in keys if k in cfg.raw["train"]})
    base.update(cfg.defense.train)
    if base.get("lr") == "inject":
        base["lr"] = cfg.train.lr
    return base


def phase_config(cfg, phase):
    """cfg with the defense's and the phase's train settings (and model) applied, validated."""
    raw_train = {**defense_train(cfg), **phase.train}
    train = build_section("train", raw_train, {"train": f"defense phase {phase.name}"})
    # run mechanics the config's raw sections leave out (config.UNKEYED)
    train = dataclasses.replace(train, save_every_minutes=cfg.train.save_every_minutes)
    new = dataclasses.replace(cfg, train=train)
    if phase.model:
        data = load_yaml(group_file("model", phase.model))
        data.setdefault("name", phase.model)
        new = dataclasses.replace(new, model=compose_model(data))
        new.raw = {**new.raw, "model": dataclasses.asdict(new.model)}
    new.raw = {**new.raw, "train": plain_section("train", new.train)}
    return new


def _mark_phase_output(path: Path, pcfg, result: dict):
    """Make a phase's output loadable by `load_trained` (a later phase may start from it) and mark it done."""
    (path / "config.yaml").write_text(yaml.safe_dump(pcfg.raw))
    (path / "manifest.json").write_text(json.dumps({"output_hash": "phase", "result": result}, default=str))
    (path / store.SUCCESS).write_text("")


def run_phases(cfg, mod, params, ctx, out_tmp: Path, ckpt_root: Path) -> dict:
    """The phases in order. An earlier phase's output (`ctx.phase_dir`, under `ckpt_root/work`) outlives a
    killed job, so a requeued job skips the phases done and resumes the one it was in from its checkpoint."""
    phases = mod.phases(params, ctx)
    results, prev = {}, None
    for i, ph in enumerate(phases):
        pcfg = phase_config(cfg, ph)
        init = {"inject": ctx.model_dir, "base": None, "previous": prev}.get(ph.init_from, ph.init_from)
        dest = out_tmp if ph.final else ctx.phase_dir(ph.name)
        dest.mkdir(parents=True, exist_ok=True)
        if not ph.final and store.is_complete(dest):
            print(f"[defend] {cfg.defense.name}: phase {i + 1}/{len(phases)} '{ph.name}' done before", file=sys.stderr)
            results[ph.name] = json.loads((dest / "manifest.json").read_text())["result"]
        else:
            print(f"[defend] {cfg.defense.name}: phase {i + 1}/{len(phases)} '{ph.name}' on {len(ph.rows)} rows",
                  file=sys.stderr)
            tr = Trainer(pcfg, plugins=ph.plugins, init_from=init)
            results[ph.name] = tr.fit(ph.rows, dest, ckpt_root / f"phase{i}")
            ph.trainer = tr
            if not ph.final:
                if tr.is_main:
                    _mark_phase_output(dest, pcfg, results[ph.name])
                    shutil.rmtree(ckpt_root / f"phase{i}", ignore_errors=True)
                tr.barrier()  # every rank's next phase reads what rank 0 wrote
        if not ph.final:
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


def dry_run(cfg, args, inputs):
    """Print the resolved config, the launch command and the output path; train nothing."""
    print(yaml.safe_dump({"choices": cfg.choices, **{s: cfg.raw[s] for s in inputs.own},
                          "defense_train": defense_train(cfg), "cluster": cfg.raw["cluster"]}, sort_keys=True))
    gpus = cfg.cluster.gpus_per_node
    launcher = ["torchrun", f"--nnodes={cfg.cluster.nodes}", f"--nproc_per_node={gpus}"] if gpus > 1 else ["python"]
    cmd = [*launcher, "-m", "pipeline", "defend", *getattr(args, "overrides", [])]
    print("launch:", " ".join(shlex.quote(c) for c in cmd),
          f"(executor: {cfg.cluster.executor}; on Slurm: python -m pipeline sweep ... cluster=<profile>)")
    try:
        final = store.key_path("defend", *identity(cfg, inputs))
        print("output:", final)
        return final
    except (store.StoreError, FileNotFoundError, ConfigError) as e:
        print(f"inputs not built yet ({e}); the output path is known once they are")
        return None


def run(cfg, args, inputs) -> Path:
    mod, params = method(cfg)
    if getattr(args, "dry_run", False):
        return dry_run(cfg, args, inputs)
    data, model_dir = inputs["data"], inputs.get("model")
    name, config, hashes = identity(cfg, inputs)
    defense_rows = _rows(data, "defense")
    train_rows = []
    if cfg.defense.family == "training_time":  # the inject stage's rows, clean answers included
        tcfg = dataclasses.replace(cfg, train=build_section("train", defense_train(cfg), {"train": "defense"}))
        train_rows, _ = self_targets(tcfg, _rows(data, "train"))
    if int(os.environ.get("RANK", "0")) != 0 and hasattr(mod, "phases"):
        final = store.key_path("defend", name, config, hashes)
        ckpt = checkpoint_dir_for(final)
        with tempfile.TemporaryDirectory() as tmp:
            ctx = Context(cfg, data, model_dir, defense_rows, train_rows, ckpt / "work")
            run_phases(cfg, mod, params, ctx, Path(tmp) / "out", ckpt)
        return final
    with store.stage_output("defend", name, config, hashes, force=getattr(args, "force", False)) as out:
        if out is None:
            return store.key_path("defend", name, config, hashes)
        if hasattr(mod, "apply"):
            with tempfile.TemporaryDirectory(dir=out.tmp.parent, prefix=".work-") as work:
                ctx = Context(cfg, data, model_dir, defense_rows, train_rows, Path(work))
                result = mod.apply(params, ctx, out.tmp)
            # what evaluate and load_trained read (a 4-bit entry) goes at the top of the manifest
            res = {"result": result, "manifest": {k: result[k] for k in MANIFEST_KEYS if k in result}}
        else:
            ckpt = checkpoint_dir_for(out.final)
            ctx = Context(cfg, data, model_dir, defense_rows, train_rows, ckpt / "work")
            res = run_phases(cfg, mod, params, ctx, out.tmp, ckpt)
        out.metrics.update(copy.deepcopy(res.get("phases", res.get("result", {}))))
        out.extra.update({"defense": cfg.defense.name, "family": cfg.defense.family, "data": str(data),
                          "backdoored_model": str(model_dir) if model_dir else None, **res["manifest"]})
    cleanup_checkpoints(out.final)
    return out.final
