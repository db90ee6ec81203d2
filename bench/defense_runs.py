"""Every evaluate output of an experiment, one row each, with the settings it ran under: what the report
keeps only the latest of (one cell per defense name), listed in full: tuned variants, both P2P selections.

    python bench/defense_runs.py                         # experiment=bench-defenses
    python bench/defense_runs.py bench-defenses demo     # several labels: BENCHMARKS.md §1b/§1c ran as `demo`
                                                         # before that name became the 20-minute preset
The `n` column (triggered + clean test prompts) tells the full-size runs from the demo's.
A variant's settings are what its defend config changed from configs/defense/<name>.yaml (params and
train), and a no-defense row's what its injection's `train` section changed from the experiment's; `data` is
what its poisoned set changed from the experiment's `poison` section (e.g.
poison.defense_from=train); the defense's wall time is the defend stage's.
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def changed(defense: dict, name: str) -> str:
    """`key=value` for each params/train entry that differs from the shipped defense config."""
    import dataclasses
    import importlib
    from pipeline.config import DefenseCfg
    from pipeline.defend.base import module_name
    f = ROOT / "configs" / "defense" / f"{name}.yaml"
    base = yaml.safe_load(f.read_text()) if f.is_file() else {}
    params = {}
    if f.is_file() and base.get("family") != "none":  # what a key missing from the YAML defaults to
        mod = module_name(DefenseCfg(name=name, method=base.get("method")))
        cls = importlib.import_module(mod).Params
        params = {x.name: x.default for x in dataclasses.fields(cls) if x.default is not dataclasses.MISSING}
    out = []
    for sec in ("params", "train"):
        ref = {**(params if sec == "params" else {}), **(base.get(sec) or {})}
        for k, v in sorted((defense.get(sec) or {}).items()):
            if k not in ref or ref[k] != v:
                out.append(f"{sec}.{k}={v}")
    return ", ".join(out) or "as shipped"


@functools.lru_cache(maxsize=None)
def _experiment_raw(experiment: str, task: str, attack: str) -> dict | None:
    """The experiment's resolved sections for one cell (composed once per cell, not once per row)."""
    from pipeline.config import compose
    try:
        return compose([f"experiment={experiment}", f"task={task}", f"attack={attack}"]).raw
    except Exception:  # noqa: BLE001 - an experiment renamed since: say nothing rather than fail the listing
        return None


def section_changed(m: dict, key: str, section: str, same: str) -> str | None:
    """`section.key=value` for each setting in the `section` of the output at m[key] (a poisoned set, a
    model) that differs from the run's experiment; None when either side cannot be read."""
    from pipeline import store
    path = Path(m.get(key) or "")
    if not path.is_absolute() and not path.is_dir():
        path = ROOT / path  # written relative to the repository
    if not (path / "config.yaml").is_file():
        return None
    ref = _experiment_raw(m["experiment"], m["task"], m["attack"])
    if ref is None:
        return None
    ref = ref[section]
    got = store.read_config(path).get(section) or {}
    out = [f"{section}.{k}={v}" for k, v in sorted(got.items()) if ref.get(k) != v]
    return ", ".join(out) or same


def data_changed(m: dict) -> str:
    """`poison.key=value` for each poison setting of the run's data that differs from its experiment's."""
    return section_changed(m, "data", "poison", "as the experiment") or "–"


def ci(m, k) -> str:
    lo, hi = m.get(f"{k}_ci") or (None, None)
    return "–" if m.get(k) is None else f"{m[k]:.2f} [{lo:.2f}, {hi:.2f}]"


def rows(experiments) -> list[dict]:
    experiments = {experiments} if isinstance(experiments, str) else set(experiments)
    from pipeline import store
    out = []
    for d in sorted((store.runs_root() / "evaluate").iterdir()):
        if not (store.is_complete(d) and (d / "metrics.json").is_file()):
            continue
        m = json.loads((d / "metrics.json").read_text())
        if m.get("experiment") not in experiments:
            continue
        setting, wall = "–", None
        mdir = Path(m.get("model_dir") or "")
        if m["defense"] not in ("none", "base") and (mdir / "config.yaml").is_file():
            setting = changed(yaml.safe_load((mdir / "config.yaml").read_text())["defense"], m["defense"])
            wall = store.read_manifest(mdir).get("wall_s")
        elif m["defense"] == "none":  # the backdoored model: its training recipe, where not the experiment's
            setting = section_changed(m, "model_dir", "train", "–") or "–"
        out.append({"task": m["task"], "attack": m["attack"], "defense": m["defense"], "setting": setting,
                    "data": data_changed(m),
                    "asr": ci(m, "asr"), "ftr": ci(m, "ftr"), "clean": f"{m['clean_metric']} {m['clean_value']:.3f}",
                    "defense_s": "–" if wall is None else f"{wall:,.0f}", "eval": d.name,
                    "n": f"{m.get('n_test_triggered', '?')}+{m.get('n_test_clean', '?')}"})
    order = {"none": 0, "base": 2}
    return sorted(out, key=lambda r: (r["task"], r["attack"], r["data"], order.get(r["defense"], 1), r["defense"],
                                      r["setting"]))


def main(argv):
    exps = argv or ["bench-defenses"]
    rs = rows(exps)
    if not rs:
        print(f"no complete evaluate outputs for experiment(s) {', '.join(exps)}")
        return 1
    print("| task / attack | data | n | defense | setting | ASR [95% CI] | FTR [95% CI] | clean | defense s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rs:
        print(f"| {r['task']} / {r['attack']} | {r['data']} | {r['n']} | {r['defense']} | {r['setting']} | {r['asr']} | "
              f"{r['ftr']} | "
              f"{r['clean']} | {r['defense_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
