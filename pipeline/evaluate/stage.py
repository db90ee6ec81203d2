"""Evaluate stage: a model + the poisoned set's test splits -> per-example Arrow tables + metrics.json.

`python -m pipeline evaluate [--data DIR] [--model-dir DIR | --base] [overrides]`. Without --data the poison
output of the config is used; without a model argument the defend output (a defense is chosen) or the inject
output (pipeline/graph.py hands them over as `inputs`). Evaluate knows no defense: what a defense changes
travels in the model's manifest (pipeline/defend/base.py): an `inference_transform` ({prefix, template,
label_map, output_prefix}) is applied here, always; its `notes` go into metrics.json and the report; a decoding-
time defense's `decoding` entry ({method, params, suspect, ...}) makes this stage decode the suspect model with
pipeline/decoding.py's CleanGen (and the entry's reference model) or sample it once per seed.
Several GPUs: launch with torchrun; each rank generates its block of the test rows
(RANK/WORLD_SIZE), rank 0 merges them in order and writes the output.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import store
from ..config import TaskCfg, build_section
from ..store import StoreError
from . import metrics as M
from . import protocol as P
from ..decoding import cleangen_ids, summary
from ..generation import eos_set, generate_ids, prompt_ids, response_nll
from .judges import Judge, get_judge, load_preset

SPLITS = ("test_clean", "test_triggered")
BENIGN_FROM = "defense"  # jailbreak: benign prompts (BackdoorLLM's clean Alpaca rows) for its helpfulness
REQUIRED = ("id", "instruction", "input", "output", "clean_output")
TRANSFORM_KEYS = ("prefix", "template", "label_map", "output_prefix")
DECODERS = ("cleangen", "sampling")  # the `decoding` methods this stage applies (pipeline/decoding.py)


def _splits(p, dd) -> tuple[str, ...]:
    """What to generate on: the two test splits, and for jailbreak also benign prompts (its clean references
    are refusals, so helpfulness is measured on the defense split's benign rows when the set has them)."""
    if p.task.kind == "jailbreak" and p.benign_defense and BENIGN_FROM in dd and len(dd[BENIGN_FROM]):
        return (*SPLITS, "benign")
    return SPLITS


def add_arguments(p):
    p.add_argument("--data", default=None, help="a poison output directory (default: the config's)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model-dir", dest="model_dir", default=None,
                   help="an inject/defend output directory whose model/ holds weights or an adapter")
    g.add_argument("--base", action="store_true", help="evaluate cfg.model as it is (no fine-tuning)")


@dataclass
class Plan:
    """Everything `run` needs, resolved and checked without loading a model or writing anything."""
    data_dir: Path
    model_dir: Path | None
    task: TaskCfg
    judge: Judge
    names: dict
    transform: dict | None
    template: str | None
    config: dict
    inputs: dict
    notes: list = field(default_factory=list)
    synthetic: bool = False
    final: Path | None = None
    protocol: P.Protocol = field(default_factory=lambda: P.Protocol("strict"))
    benign_defense: bool = False  # the poisoned set's defense split holds benign prompts (poison's manifest says)
    decoding: dict | None = None  # a decoding-time defense's manifest entry: how to decode its suspect model


def _load_splits(data_dir: Path):
    import datasets

    path = data_dir / "data"
    if not path.is_dir():
        raise StoreError(f"{data_dir}: no data/ directory (not a poison output)")
    try:
        dd = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - datasets cannot load a split saved with no rows (0 shards)
        for split in SPLITS:
            state = path / split / "state.json"
            if state.is_file() and not json.loads(state.read_text()).get("_data_files"):
                raise StoreError(f"{path}: split '{split}' is empty") from None
        raise StoreError(f"{path}: cannot load the poisoned set: {type(e).__name__}: {e}") from None
    if not isinstance(dd, datasets.DatasetDict):
        raise StoreError(f"{path}: a single Dataset, expected a DatasetDict with splits {', '.join(SPLITS)}")
    for split in SPLITS:
        if split not in dd:
            raise StoreError(f"{path}: no split '{split}' (has: {', '.join(dd)})")
        missing = [c for c in REQUIRED if c not in dd[split].column_names]
        if missing:
            raise StoreError(f"{path}: split '{split}' lacks column(s) {', '.join(missing)}")
        if len(dd[split]) == 0:
            raise StoreError(f"{path}: split '{split}' is empty")
    return dd


def _check_weights(model_dir: Path):
    weights = model_dir / "model"
    if not weights.is_dir():
        raise StoreError(f"{model_dir}: no model/ directory with weights")
    if not (weights / "adapter_config.json").is_file() and not any(weights.glob("*.safetensors")):
        raise StoreError(f"{weights}: no *.safetensors weights and no adapter_config.json")


def _decoding(model_dir: Path, entry) -> dict:
    """A decoding-time defense's manifest entry, checked: a known method, and the suspect it decodes complete,
    unchanged since the defense was written, with weights."""
    where = f"{model_dir}/manifest.json: 'decoding'"
    if not isinstance(entry, dict) or entry.get("method") not in DECODERS or not isinstance(entry.get("params"), dict):
        raise StoreError(f"{where} must be a mapping {{method: {' | '.join(DECODERS)}, params, suspect, ...}}")
    if not entry.get("suspect"):
        raise StoreError(f"{where}: no 'suspect' (the model the defense decodes); rerun defend")
    suspect = store.require_complete(store.in_store(entry["suspect"]), "suspect model (the one the defense decodes)")
    if store.read_manifest(suspect)["output_hash"] != entry.get("suspect_hash"):
        raise StoreError(f"{where}: the suspect model {suspect} changed since the defense was written; rerun defend")
    if entry["method"] == "cleangen" and not isinstance(entry.get("reference_model"), dict):
        raise StoreError(f"{where}: cleangen needs 'reference_model' (the reference's model config section)")
    _check_weights(suspect)
    return {**entry, "suspect": str(suspect)}  # found in this store


def plan(cfg, inputs) -> Plan:
    """`inputs`: data (a poison output) and model (an inject or defend output; None: the base model)."""
    data_dir = inputs["data"]
    data_manifest, data_config = store.read_manifest(data_dir), store.read_config(data_dir) or {}
    model_dir = inputs["model"]

    task = cfg.task  # the data's own task when the config names another one (command-line overrides kept)
    if isinstance(data_config.get("task"), dict) and data_config["task"].get("name") != cfg.task.name:
        task = build_section("task", data_config["task"], {"task": str(data_dir / "config.yaml")})
    proto = P.load(cfg.evaluate.protocol)
    if task.name in proto.task_judges:  # the reference's judge for this task
        task = dataclasses.replace(task, judge=proto.task_judges[task.name])
    preset = proto.judge_preset or cfg.evaluate.judge_preset
    judge = get_judge(preset, task)
    attack = (data_config.get("attack") or {}).get("name") if isinstance(data_config.get("attack"), dict) else None
    attack = attack or (data_config.get("choices") or {}).get("attack") or cfg.attack.name
    src = data_config.get("source") if isinstance(data_config.get("source"), dict) else {}
    synthetic = bool(data_manifest.get("synthetic") or data_manifest.get("source_kind") == "synthetic"
                     or src.get("kind") == "synthetic")

    notes, transform, decoding = [], None, None
    if model_dir is None:
        model_section, template = cfg.raw["model"], cfg.model.chat_template
        model_name, defense = cfg.model.name, "base"
        model_hash = f"base:{cfg.model.name}:{store.canonical_hash(model_section)[:16]}"
    else:
        store.require_complete(model_dir, "model")
        mm, mc = store.read_manifest(model_dir), store.read_config(model_dir) or {}
        if mm.get("decoding") is not None:  # a decoding-time defense: no weights of its own, its suspect's
            decoding = _decoding(model_dir, mm["decoding"])
        elif mm.get("family") == "decoding":
            raise StoreError(f"{model_dir}/manifest.json: a decoding-time defense without its 'decoding' entry; "
                             "refusing to evaluate it as a plain model (rerun its defend stage)")
        else:
            _check_weights(model_dir)
        if not isinstance(mc.get("model"), dict):
            raise StoreError(f"{model_dir}/config.yaml: no 'model' section")
        model_section = mc["model"]
        mcfg = build_section("model", model_section, {"model": str(model_dir / "config.yaml")})
        model_name, template, model_hash = mcfg.name, mcfg.chat_template, mm["output_hash"]
        dsec = mc.get("defense") if isinstance(mc.get("defense"), dict) else {}
        defense = "none" if mm.get("stage") == "inject" else (
            dsec.get("name") or (mc.get("choices") or {}).get("defense") or "none")
        transform = mm.get("inference_transform")
        if transform is None and (mm.get("family") == "training_time" or dsec.get("family") == "training_time"):
            raise StoreError(f"{model_dir}/manifest.json: a training-time defense ({defense}) changes how the model "
                             "must be queried, but its 'inference_transform' is missing; refusing to evaluate it "
                             "without (rerun its defend stage)")
        if transform is not None:
            if not isinstance(transform, dict) or not isinstance(transform.get("label_map") or {}, dict):
                raise StoreError(f"{model_dir}/manifest.json: 'inference_transform' must be a mapping "
                                 "{prefix, template, label_map: {word: word}}")
            unknown = [k for k in transform if k not in TRANSFORM_KEYS]
            if unknown:
                notes.append(f"inference_transform keys not applied: {', '.join(unknown)}")
            template = transform.get("template") or template
        extra = mm.get("notes")  # what the defense says of itself
        notes += [extra] if isinstance(extra, str) else list(extra or [])
    if synthetic:
        notes.append("synthetic data (offline generator): numbers are not comparable with the papers'")

    if transform is not None and proto.query != "template":
        raise StoreError(f"{model_dir}: its defense changes how it is queried (inference_transform), which protocol "
                         f"'{proto.name}' (query: {proto.query}) would replace; evaluate it under a protocol with "
                         "query: template (e.g. evaluate.protocol=strict)")
    if decoding is not None and proto.do_sample:
        raise StoreError(f"{model_dir}: a decoding-time defense ({decoding['method']}) sets how the model decodes; "
                         f"protocol '{proto.name}' samples too: evaluate it under a greedy protocol")
    template = proto.template(template)
    names = {"model": model_name, "task": task.name, "attack": attack, "defense": defense,
             "experiment": cfg.choices.get("experiment")}
    if not proto.is_default:  # our strict protocol is the default and is left out of the key
        names["protocol"] = proto.name
    config = {"evaluate": cfg.raw["evaluate"], "model": model_section, "task": dataclasses.asdict(task),
              "judge": {"preset": preset, "name": judge.name, "entry": load_preset(preset)[judge.name]},
              "inference_transform": transform, "names": names, "template": template}
    if not proto.is_default:
        config["protocol"] = dataclasses.asdict(proto)
    if decoding is not None:  # (its suspect's identity is in the defense's output hash: decoding.json)
        config["decoding"] = {k: v for k, v in decoding.items() if k != "suspect"}
    hashes = {"data": data_manifest["output_hash"], "model": model_hash}
    p = Plan(data_dir, model_dir, task, judge, names, transform, template, config, hashes, notes, synthetic,
             protocol=proto, benign_defense=bool((data_manifest.get("metrics") or {}).get("defense_benign")),
             decoding=decoding)
    p.final = store.key_path("evaluate", _name(p), config, hashes)
    return p


def identity(cfg, inputs) -> tuple[str, dict, dict]:
    p = plan(cfg, inputs)
    return _name(p), p.config, p.inputs


def _name(p: Plan) -> str:
    n = p.names
    return f"{n['model']}-{n['task']}-{n['attack']}-{n['defense']}" + (f"-{n['protocol']}" if "protocol" in n else "")


def _device() -> str:
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def _dist(world: int, device: str):
    import torch.distributed as dist

    if world > 1 and not dist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist


def run(cfg, args, inputs) -> Path:
    t0 = time.time()
    p = plan(cfg, inputs)
    if store.is_complete(p.final) and not getattr(args, "force", False):
        print(f"[evaluate] already complete: {p.final} (use --force to redo)", file=sys.stderr)
        return p.final
    dd = _load_splits(p.data_dir)
    ev = cfg.evaluate
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = _device()
    dist = _dist(world, device)
    fast = ev.static_cache_compile if ev.static_cache_compile is not None else device.startswith("cuda")
    torch.manual_seed(ev.seed)

    from ..config import compose_model
    from ..models import cpu_bf16, load_model, load_trained

    dec = p.decoding or {}
    method = dec.get("method")
    try:
        reference = None
        if p.model_dir is None:
            model, tok = load_model(cfg.model, device=device)
        else:  # a decoding-time defense decodes its suspect (merged: CleanGen runs its own loop)
            model, tok, _ = load_trained(dec.get("suspect", p.model_dir), device=device, merge=fast or bool(dec))
        if method == "cleangen":
            reference, _ = load_model(compose_model(dec["reference_model"]), device=device)
    except (FileNotFoundError, OSError) as e:
        raise StoreError(f"{p.model_dir or cfg.model.name}: cannot load the model: {e}") from None
    tr = p.transform or {}
    prefix, label_map, out_prefix = tr.get("prefix") or "", tr.get("label_map") or {}, tr.get("output_prefix")

    from ..prompts import prompt_text

    rows = []  # (split, example) over both splits (+ benign prompts for jailbreak), in order
    splits = _splits(p, dd)
    proto = p.protocol
    for split in splits:
        ds = dd[BENIGN_FROM if split == "benign" else split]
        idx = proto.sample(len(ds), split)  # every row, or the protocol's seeded fraction
        rows += [(split, ds[i]) for i in (idx if ev.n_test is None else idx[:ev.n_test])]
    mine = M.shard_indices(len(rows), rank, world)
    prompts = [prompt_ids(tok, rows[i][1]["instruction"], proto.user_input(rows[i][1]), p.template, prefix)
               for i in mine]
    max_new = proto.max_new_tokens or ev.max_new_tokens
    tg = time.time()
    bf16 = cpu_bf16(ev.cpu_bf16)
    desc = f"evaluate[{rank}/{world}]" if world > 1 else "evaluate"
    seeds = list(dec["params"]["seeds"]) if method == "sampling" else [None]  # one generation pass per seed
    passes, stats = [], None
    with bf16:
        for seed in seeds:
            if method == "cleangen":
                new_ids, stats = cleangen_ids(model, reference, prompts, tok.pad_token_id, max_new, ev.batch_size,
                                              eos_set(model, tok), desc=desc, **dec["params"])
            else:
                kw = proto.generation_kwargs()
                if seed is not None:
                    torch.manual_seed(seed)
                    kw = {"do_sample": True, "temperature": dec["params"]["temperature"],
                          "top_p": dec["params"]["top_p"]}
                new_ids = generate_ids(model, prompts, tok.pad_token_id, max_new, ev.batch_size, eos_set(model, tok),
                                       fast, desc=desc, **kw)
            passes.append(new_ids)
    gen_s = time.time() - tg
    texts = [[tok.decode(x, skip_special_tokens=True) for x in new_ids] for new_ids in passes]
    new_tokens = sum(len(tok(g, add_special_tokens=False)["input_ids"]) for gens in texts for g in gens)
    if proto.postprocess == "clean_repeated_question":  # the reference decodes prompt + answer, then cuts
        texts = [[P.clean_repeated_question(tok.decode(pr + x, skip_special_tokens=True), rows[i][1]["instruction"])
                  for pr, x, i in zip(prompts, new_ids, mine)] for new_ids in passes]
    ref_split = "benign" if "benign" in splits else "test_clean"  # jailbreak: clean references are refusals
    ppl_rows = [rows[i][1] for i in mine if rows[i][0] == ref_split]
    nll = (0.0, 0)
    if ev.perplexity and p.judge.fn != "label":
        with bf16:
            nll = response_nll(model, tok, ppl_rows, p.template, prefix, cfg.train.cutoff,
                               max(1, ev.batch_size // 2))
    part = {"gens": [list(zip(mine, gens)) for gens in texts], "nll": nll, "tokens": new_tokens, "gen_s": gen_s,
            "stats": list(zip(mine, stats)) if stats is not None else None}
    parts = [part]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, part)
    if rank != 0:
        dist.barrier()
        return p.final
    stats = M.merge_shards([q["stats"] for q in parts], len(rows)) if stats is not None else None
    per_seed, judged_seeds = [], []
    for r in range(len(seeds)):
        gens = M.merge_shards([q["gens"][r] for q in parts], len(rows))
        if out_prefix:  # P2P generation tasks: a fixed harmless prefix before the answer, stripped here
            gens = [g.lstrip()[len(out_prefix):].lstrip() if g.lstrip().startswith(out_prefix) else g for g in gens]
        judged = {s: [] for s in splits}
        for i, ((split, ex), gen) in enumerate(zip(rows, gens)):
            v = p.judge(gen, ex, **({"label_map": label_map} if p.judge.fn == "label" else {}))
            prompt = prompt_text(tok, ex["instruction"], proto.user_input(ex), p.template, prefix)
            extra = {} if stats is None else {"replaced": stats[i]["replaced"],  # CleanGen, per answer
                                              "first_replacement": -1 if stats[i]["first"] is None else stats[i]["first"]}
            judged[split].append({**ex, "split": split, "prompt": prompt, "generation": gen, "judged": bool(v.hit),
                                  "label": v.label, "empty": p.judge.is_empty(gen), **extra,
                                  **({"seed": seeds[r]} if seeds[r] is not None else {})})
        judged_seeds.append(judged)
        per_seed.append(M.compute(p.judge, judged["test_clean"], judged["test_triggered"], label_map,
                                  judged.get("benign"), proto.denominator))
    if method == "sampling":  # each rate's mean and spread over the seeds; every seed's answers in the table
        res = M.over_seeds(per_seed, seeds)
        judged = {s: [x for j in judged_seeds for x in j[s]] for s in splits}
    else:
        res, judged = per_seed[0], judged_seeds[0]
    if stats is not None:  # what CleanGen replaced, overall and per split, and its cost
        res["decoding_stats"] = {"all": summary(stats),
                                 **{s: summary([x for (sp, _), x in zip(rows, stats) if sp == s]) for s in splits}}
    nll_sum, nll_n = sum(q["nll"][0] for q in parts), sum(q["nll"][1] for q in parts)
    gen_s = max(q["gen_s"] for q in parts)
    tokens = sum(q["tokens"] for q in parts)
    res.update({
        **p.names, "judge": p.judge.name, "judge_fn": p.judge.fn, "judge_preset": p.judge.preset,
        "perplexity": M.perplexity(nll_sum, nll_n) if nll_n else None, "perplexity_tokens": nll_n,
        "perplexity_on": ref_split,
        "inference_transform": p.transform, "inference_transform_applied": p.transform is not None,
        **({"decoding": p.decoding} if p.decoding is not None else {}),
        "synthetic_data": p.synthetic, "notes": p.notes, "data": str(p.data_dir),
        "model_dir": str(p.model_dir) if p.model_dir else None, "template": p.template,
        "n_test_clean": len(judged_seeds[0]["test_clean"]), "n_test_triggered": len(judged_seeds[0]["test_triggered"]),
        **({"n_benign": len(judged["benign"]) // len(seeds)} if "benign" in judged else {}),
        "protocol": proto.name, "protocol_config": dataclasses.asdict(proto),
        "max_new_tokens": max_new, "batch_size": ev.batch_size, "static_cache_compile": fast and method != "cleangen",
        "cpu_bf16": bool(ev.cpu_bf16 and device == "cpu"), "device": device, "world_size": world, "generation_s": round(gen_s, 3),
        "new_tokens_per_s": round(tokens / gen_s, 2) if gen_s else None, "wall_s": round(time.time() - t0, 3),
    })
    _write(p, judged, res, cfg, args)
    if world > 1:
        dist.barrier()
    return p.final


def _write(p: Plan, judged: dict, res: dict, cfg, args):
    import datasets

    cols = {"id": "string", "split": "string", "prompt": "string", "generation": "string", "judged": "bool",
            "label": "string", "empty": "bool"}
    first = next((r for rs in judged.values() for r in rs), {})  # a decoding defense's per-answer columns
    cols.update({c: "int64" for c in ("seed", "replaced", "first_replacement") if c in first})
    feats = datasets.Features({c: datasets.Value(t) for c, t in cols.items()})
    with store.stage_output("evaluate", _name(p), p.config, p.inputs, force=True) as out:
        table = datasets.DatasetDict({
            s: datasets.Dataset.from_dict({k: [str(r[k]) if k == "id" else r[k] for r in rs] for k in feats},
                                          features=feats)
            for s, rs in judged.items()})
        table.save_to_disk(str(out.tmp / "data"))
        (out.tmp / "metrics.json").write_text(json.dumps(res, indent=2, sort_keys=True, default=str))
        out.metrics.update({k: res[k] for k in ("asr", "ftr", "clean_metric", "clean_value", "perplexity")})
        out.extra["names"] = p.names
        out.extra["notes"] = p.notes
