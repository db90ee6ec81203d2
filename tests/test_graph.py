"""pipeline/graph.py: the one place that knows the pipeline's shape. No stage imports another; a sweep run's
identity is the graph's; a defense is exactly its module and its YAML (built here in a temporary directory
and run through defend and evaluate); what it changes reaches evaluate only through its manifest."""
from __future__ import annotations

import argparse
import ast
import json
import re
import textwrap
from pathlib import Path

import pytest

from launch import dag
from pipeline import graph, store
from pipeline.config import compose

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "pipeline"
# each stage's own files: what belongs to it (a library inside a stage package belongs to that stage)
STAGE_FILES = {"poison": ["poison"], "inject": ["inject.py"], "defend": ["defend"], "evaluate": ["evaluate"],
               "report": ["report.py"]}


def _modules_of(stage: str) -> set[str]:
    out = set()
    for f in STAGE_FILES[stage]:
        p = PKG / f
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p]
        for q in files:
            rel = q.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out.add(".".join(parts))
    return out


def _imports(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved, at any depth)."""
    tree = ast.parse(path.read_text())
    rel = path.relative_to(ROOT).with_suffix("")
    pkg = list(rel.parts[:-1])
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = pkg[:len(pkg) - node.level + 1] if node.level else []
            mod = ".".join([*base, *(node.module.split(".") if node.module else [])])
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def test_no_stage_imports_another_stage_statically_or_by_string():
    owner = {m: s for s in STAGE_FILES for m in _modules_of(s)}
    bad = []
    for stage in STAGE_FILES:
        for f in STAGE_FILES[stage]:
            p = PKG / f
            for q in (sorted(p.rglob("*.py")) if p.is_dir() else [p]):
                text = q.read_text()
                for m in _imports(q):
                    other = owner.get(m)
                    if other and other != stage:
                        bad.append(f"{q.relative_to(ROOT)} imports {m} (stage {other})")
                    if m.startswith(("pipeline.graph", "pipeline.cli", "launch")):
                        bad.append(f"{q.relative_to(ROOT)} imports {m} (above the stages)")
                for m in owner:  # by string: importlib, __import__, a module path in a literal
                    if owner[m] != stage and re.search(rf"[\"']{re.escape(m)}[\"']", text):
                        bad.append(f"{q.relative_to(ROOT)} names {m} in a string")
                if re.search(r"\bimportlib\b", text) and q.name == "stage.py":
                    bad.append(f"{q.relative_to(ROOT)} uses importlib")
    # and nothing shared (config, store, models, prompts, generation, train/) imports any stage
    for q in sorted(PKG.rglob("*.py")):
        mod = ".".join(q.relative_to(ROOT).with_suffix("").parts)
        if mod in owner or mod in ("pipeline.graph", "pipeline.cli", "pipeline.__main__"):
            continue
        bad += [f"{q.relative_to(ROOT)} (shared) imports {m}" for m in _imports(q) if m in owner]
    assert not bad, "\n".join(bad)


def test_no_importlib_lookup_of_stages_remains():
    for q in [PKG / "cli.py", PKG / "graph.py", ROOT / "launch" / "dag.py", ROOT / "launch" / "status.py",
              *(PKG / "evaluate").rglob("*.py")]:
        assert "import_module" not in q.read_text(), q


def test_the_graph_is_the_sweeps_shape():
    assert dag.STAGES == graph.ORDER == ("poison", "inject", "defend", "evaluate", "report")
    # the identities the sweep keyed its runs by before the graph existed (runs/sweeps/*/state.json keys)
    poison = {"experiment", "task", "attack", "source", "poison"}
    inject = poison | {"model", "train", "deepspeed"}
    assert dag.SECTIONS == {"poison": poison, "inject": inject, "defend": inject | {"defense"},
                            "evaluate": inject | {"defense", "evaluate"}, "report": {"experiment", "report"}}
    assert graph.waits_on("defend", "post_hoc") == ["inject"] and graph.waits_on("defend", "training_time") == ["poison"]
    assert graph.waits_on("evaluate", "none") == ["inject", "poison"]
    assert graph.waits_on("evaluate", "post_hoc") == ["defend", "poison"]


def test_a_missing_input_names_the_stage_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_RUNS", str(tmp_path / "runs"))
    cfg = compose(["experiment=tiny", "defense=crow"])
    with pytest.raises(store.StoreError, match="poisoned set .* does not exist: run the stage"):
        graph.output_dir("inject", cfg)
    inputs = graph.Inputs("defend", cfg)
    assert list(inputs) == ["data", "model"] and inputs.own[-1] == "defense"
    assert list(graph.Inputs("defend", compose(["experiment=tiny", "defense=p2p"]))) == ["data"]
    assert graph.Inputs("evaluate", cfg, base=True)._producers == {"data": "poison", "model": "defend"}


# --------------------------------------------------------------------------- a defense from two files
TOY_YAML = """\
# A toy defense: plain fine-tuning for one step, and a query prefix it asks evaluate to apply.
method: toy_defense_mod
family: post_hoc
params: {prefix: "Toy says: "}
train: {lr: 1.0e-3, max_steps: 1, micro_batch: 2, grad_accum: 1}
"""
TOY_MODULE = '''
"""A defense outside the package: a Params dataclass, a plugin, phases()."""
from dataclasses import dataclass

from pipeline.defend.base import Phase
from pipeline.train.plugins import Plugin


@dataclass
class Params:
    prefix: str = ""


class Tag(Plugin):
    name = "toy"

    def __init__(self, prefix):
        self.prefix = prefix

    def transform(self, rows):
        return [{**r, "prefix": self.prefix} for r in rows]

    def save(self, trainer, out_dir):
        return {"notes": ["toy defense: one step of fine-tuning"],
                "inference_transform": {"prefix": self.prefix, "template": None, "label_map": {}}}


def phases(params, ctx):
    return [Phase("toy", ctx.defense_rows, [Tag(params.prefix)], init_from="inject")]
'''


def test_a_defense_is_its_module_and_its_yaml(tmp_path, monkeypatch):
    from test_defend_prune_quantize import make_data  # tests/ is on sys.path (rootdir conftest)
    lab = tmp_path / "lab"
    (lab / "defense").mkdir(parents=True)
    (lab / "defense" / "toy.yaml").write_text(TOY_YAML)
    (lab / "toy_defense_mod.py").write_text(textwrap.dedent(TOY_MODULE))
    assert sorted(str(p.relative_to(lab)) for p in lab.rglob("*") if p.is_file()) == [
        "defense/toy.yaml", "toy_defense_mod.py"]
    monkeypatch.syspath_prepend(str(lab))
    monkeypatch.setenv("PIPELINE_CONFIG_PATH", str(lab))
    monkeypatch.setenv("PIPELINE_RUNS", str(tmp_path / "runs"))
    data = make_data()
    inj = graph.run("inject", compose(["experiment=tiny", "train.max_steps=1"]),
                    argparse.Namespace(data=str(data), force=False))
    cfg = compose(["experiment=tiny", "defense=toy"])
    ns = argparse.Namespace(data=str(data), model_dir=str(inj), force=False, dry_run=False)
    out = graph.run("defend", cfg, ns)
    man = store.read_manifest(out)
    assert man["inference_transform"]["prefix"] == "Toy says: " and man["defense"] == "toy"
    assert graph.output_dir("defend", cfg, args=ns) == out
    ev = graph.run("evaluate", cfg, argparse.Namespace(data=str(data), model_dir=str(out), base=False, force=False))
    m = json.loads((ev / "metrics.json").read_text())
    assert m["defense"] == "toy" and m["inference_transform_applied"]
    assert "toy defense: one step of fine-tuning" in m["notes"]
    import datasets
    prompts = datasets.load_from_disk(str(ev / "data"))["test_clean"]["prompt"]
    assert prompts and all("Toy says: " in p for p in prompts)


def test_an_unknown_defense_module_is_a_config_error(tmp_path, monkeypatch):
    from pipeline.config import ConfigError
    from pipeline.defend.base import method
    (tmp_path / "defense").mkdir()
    (tmp_path / "defense" / "ghost.yaml").write_text("method: no_such_defense_module\nfamily: post_hoc\n")
    monkeypatch.setenv("PIPELINE_CONFIG_PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="ghost.yaml: defense.method: no module 'no_such_defense_module'"):
        method(compose(["experiment=tiny", "defense=ghost"]))
    # a variant is a YAML alone: it names a shipped module
    mod, params = method(compose(["experiment=tiny", "defense=sande-p"]))
    assert mod.__name__ == "pipeline.defend.sande" and params.known_tokens == 2


def test_given_data_reaches_the_model_it_names_but_not_a_defenses_backdoored_model(monkeypatch, tmp_path):
    """`evaluate --data X` reads the model trained (or defended) on X; `defend --data X` defends the config's
    own backdoored model with X's defense split, as before the graph existed."""
    calls = []

    def fake_output_dir(stage, cfg, given=None, base=False, args=None):
        calls.append((stage, (given or {}).get("data")))
        d = tmp_path / stage
        d.mkdir(exist_ok=True)
        (d / store.SUCCESS).write_text("")
        return d
    monkeypatch.setattr(graph, "output_dir", fake_output_dir)
    x = tmp_path / "X"
    x.mkdir()
    (x / store.SUCCESS).write_text("")
    graph.Inputs("defend", compose(["experiment=tiny", "defense=crow"]), {"data": str(x)})["model"]
    graph.Inputs("evaluate", compose(["experiment=tiny"]), {"data": str(x)})["model"]
    graph.Inputs("evaluate", compose(["experiment=tiny", "defense=crow"]), {"data": str(x)})["model"]
    assert calls == [("inject", None), ("inject", str(x)), ("defend", str(x))]
