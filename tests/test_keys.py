"""Output keys are users' stores: the output path of every stage run of the shipped experiments is pinned.

`tests/data/output_keys.json` was computed before the pipeline-graph refactor (issue 18) by this same test
with `PIN_KEYS=write` (ladder-4 and ladder-6 were added on 2026-12-02, written before `demo` became ladder-4,
and `demo` rewritten after; the runs of the defenses added since, cleangen ... w2sdefense-nofa, were added
later that day, no pinned path changing). Each run of an experiment's sweep (and the base model's evaluation per cell) is keyed
in dependency order inside an empty store; after each, a stand-in output (its config.yaml the run's resolved
config, a fixed output hash, a model/ with an adapter_config.json) is written where the run would write, so
the next stage finds its inputs exactly as it would after real runs. The poison source's fingerprint is fixed
(the BackdoorLLM files need not be present). A mismatch means existing runs/ stores would no longer be found.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import pytest
import yaml

from launch import dag
from pipeline import graph, store
from pipeline.config import available, compose
from pipeline.poison import sources

PINS = Path(__file__).parent / "data" / "output_keys.json"
EXPERIMENTS = ("demo", "embedded", "backdoorllm", "defense-grid", "tiny", "ladder-4", "ladder-6")


class _FixedSource:
    synthetic, description = False, "fixed"

    def fingerprint(self):
        return "fixed-source-fingerprint"


def _output_dir(stage, cfg) -> Path:
    return graph.output_dir(stage, cfg)


def _stand_in(stage: str, path: Path, cfg):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(cfg.to_yaml())
    manifest = {"stage": stage, "output_hash": hashlib.sha256(f"{stage}/{path.name}".encode()).hexdigest()}
    if stage == "defend":
        manifest["family"] = cfg.defense.family
        if cfg.defense.family == "training_time":
            manifest["inference_transform"] = {"prefix": "The query currently entered is: ", "template": None,
                                               "label_map": {}}
        if cfg.defense.family == "decoding":  # what a decoding-time defense's defend stage records
            inj = graph.output_dir("inject", cfg)
            manifest["decoding"] = {"method": cfg.defense.method or cfg.defense.name, "params": dict(cfg.defense.params),
                                    "suspect": str(inj), "suspect_hash": store.read_manifest(inj)["output_hash"],
                                    "reference_model": dataclasses.asdict(cfg.model)}
    (path / "manifest.json").write_text(json.dumps(manifest))
    if stage in ("inject", "defend"):
        (path / "model").mkdir()
        (path / "model" / "adapter_config.json").write_text("{}")
    (path / store.SUCCESS).write_text("")


def keys_of(experiment: str) -> dict[str, str]:
    cfg = compose([f"experiment={experiment}"])
    runs = dag.expand(cfg, [f"experiment={experiment}"])
    for d in available("defense"):  # every shipped defense and variant on the experiment's own cell too
        runs.update({k: r for k, r in dag.expand(cfg, [f"experiment={experiment}", f"defense={d}"]).items()
                     if r.stage != "report"})
    runs = dict(sorted(runs.items(), key=lambda kv: dag.STAGES.index(kv[1].stage)))
    out = {}
    for key, run in runs.items():
        if run.stage == "report":
            continue
        rcfg = compose(list(run.overrides))
        path = _output_dir(run.stage, rcfg)
        out[key] = str(path.relative_to(store.runs_root()))
        if run.stage != "evaluate" and not path.exists():
            _stand_in(run.stage, path, rcfg)
    for key, run in runs.items():  # the untouched base model's evaluation on every poisoned set
        if run.stage == "poison":
            rcfg = compose(list(run.overrides))
            path = graph.output_dir("evaluate", rcfg, base=True)
            out["evaluate --base " + key.split(" ", 1)[1]] = str(path.relative_to(store.runs_root()))
    return out


@pytest.fixture
def fixed_source(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(sources, "make_source", lambda *a, **k: _FixedSource())
    from pipeline.poison import stage as poison_stage
    monkeypatch.setattr(poison_stage, "make_source", lambda *a, **k: _FixedSource())


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_output_keys_unchanged(experiment, fixed_source):
    got = keys_of(experiment)
    if os.environ.get("PIN_KEYS") == "write":
        pins = json.loads(PINS.read_text()) if PINS.is_file() else {}
        pins[experiment] = got
        PINS.parent.mkdir(exist_ok=True)
        PINS.write_text(json.dumps(pins, indent=1, sort_keys=True) + "\n")
    want = json.loads(PINS.read_text())[experiment]
    assert len(want) > 3
    # every pinned run keeps its path (defenses added since then bring runs of their own, not pinned here)
    assert {k: got.get(k) for k in want} == want, {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}


def test_pins_cover_every_stage_and_defense(fixed_source):
    pins = json.loads(PINS.read_text())
    assert set(pins) == set(EXPERIMENTS)
    grid = pins["defense-grid"]
    assert {k.split(" ")[0] for k in grid} == {"poison", "inject", "defend", "evaluate"}
    defenses = {p.split("/")[1].rsplit("-", 1)[0].split("-")[-1] for p in grid.values() if p.startswith("defend/")}
    assert {"finetune", "osft", "sande", "crow", "w2sdefense", "p2p", "prune", "quantize"} <= defenses
    assert yaml.safe_load(PINS.read_text())  # plain JSON, readable by any tool


def test_the_demo_is_a_rung_and_its_old_outputs_are_ladder_6s():
    """`demo` is ladder-4 (since 2026-12-02): its poison, inject and defend outputs are ladder-4's, so a frontier
    sweep reuses the demo's training and the reverse. The demo's earlier recipe was ladder-6's: the pins of
    ladder-6 were written from the code of that time and its trained outputs were the demo's then (only the
    evaluations, keyed by experiment name, differ)."""
    pins = json.loads(PINS.read_text())
    trained = ("poison ", "inject ", "defend ")

    def paths(exp):
        return {k.replace(f"experiment={exp}", "experiment=X"): v for k, v in pins[exp].items() if k.startswith(trained)}

    demo, rung4 = paths("demo"), paths("ladder-4")
    assert len(demo) > 5 and {k: rung4.get(k) for k in demo} == demo
    assert paths("ladder-6") != rung4  # the rungs' recipes differ
    inject6, = [v for k, v in pins["ladder-6"].items() if k.startswith("inject ")]
    assert inject6 == "inject/smollm2-135m-negsentiment-badnet-25bd65f472a2"  # the demo's injection until 2026-12-02
