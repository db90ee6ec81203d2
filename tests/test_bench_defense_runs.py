"""bench/defense_runs.py lists every evaluate output of an experiment with the settings its defense changed."""
import json
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.config import compose

ROOT = Path(__file__).resolve().parents[1]


def _out(d: Path, files: dict):
    d.mkdir(parents=True)
    for name, text in files.items():
        (d / name).write_text(text)
    (d / "_SUCCESS").write_text("")


def test_defense_runs_lists_variants_with_their_settings(tmp_path):
    ref = compose(["experiment=bench-defenses", "task=sst2", "attack=badnet"]).raw  # what the runs differ from
    runs = tmp_path / "runs"
    shipped = yaml.safe_load((ROOT / "configs" / "defense" / "osft.yaml").read_text())
    variants = {"a": shipped, "b": {**shipped, "train": {**shipped["train"], "lr": 1e-4}}}
    for tag, dcfg in variants.items():
        mdir = runs / "defend" / f"m-osft-{tag}"
        _out(mdir, {"config.yaml": yaml.safe_dump({"defense": {"name": "osft", **dcfg}}),
                    "manifest.json": json.dumps({"wall_s": 100.0})})
        poison = ref["poison"]
        data = runs / "poison" / f"p-{tag}"
        _out(data, {"config.yaml": yaml.safe_dump({"poison": {**poison, "defense_from": "train"} if tag == "b"
                                                   else poison})})
        m = {"experiment": "bench-defenses", "task": "sst2", "attack": "badnet", "defense": "osft", "model_dir": str(mdir),
             "data": str(data),
             "asr": 0.5 if tag == "b" else 1.0, "asr_ci": [0.4, 0.6], "ftr": 0.0, "ftr_ci": [0.0, 0.07],
             "clean_metric": "accuracy", "clean_value": 0.8}
        _out(runs / "evaluate" / f"e-{tag}", {"metrics.json": json.dumps(m), "manifest.json": "{}"})
    train = ref["train"]
    inj = runs / "inject" / "m-none"
    _out(inj, {"config.yaml": yaml.safe_dump({"train": {**train, "epochs": 9.0}})})
    none = {"experiment": "bench-defenses", "task": "sst2", "attack": "badnet", "defense": "none", "model_dir": str(inj),
            "asr": 1.0, "asr_ci": [0.9, 1.0], "ftr": 0.0, "ftr_ci": [0.0, 0.07], "clean_metric": "accuracy",
            "clean_value": 0.8}
    _out(runs / "evaluate" / "e-none", {"metrics.json": json.dumps(none), "manifest.json": "{}"})
    other = {"experiment": "other", "task": "sst2", "attack": "badnet", "defense": "none", "asr": 1.0,
             "clean_metric": "accuracy", "clean_value": 0.8}
    _out(runs / "evaluate" / "e-other", {"metrics.json": json.dumps(other), "manifest.json": "{}"})
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "defense_runs.py")], capture_output=True,
                       text=True, timeout=120, env={"PIPELINE_RUNS": str(runs), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    rows = [line for line in p.stdout.splitlines() if line.startswith("| sst2")]
    assert len(rows) == 3  # both variants of osft and the backdoored model, not the other experiment's output
    assert any("| none | train.epochs=9.0 |" in r for r in rows)  # the backdoored model, with its recipe
    assert any("as shipped" in r and "1.00 [0.40, 0.60]" in r and "| as the experiment |" in r for r in rows)
    assert any("train.lr=0.0001" in r and "0.50 [0.40, 0.60]" in r and "| poison.defense_from=train |" in r
               for r in rows)
