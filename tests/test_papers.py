"""The paper presets (configs/experiment/{crow,backdoorllm,sande,p2p,w2s}-paper.yaml): the one command that reproduces a
paper's table on a Slurm cluster, shown by a dry run (the jobs, their arrays and dependencies, nothing
written) and by the memory plan of its training jobs (each fits one 80 GB GPU)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import compose

ROOT = Path(__file__).resolve().parent.parent
BDL = ROOT.parent / "shared" / "data" / "backdoorllm"
needs_bdl = pytest.mark.skipif(not (BDL / "README.md").is_file(), reason=f"BackdoorLLM data not found at {BDL}")
CMD = {p: ["cluster=slurm-gpu", "cluster.gpus_per_node=1"]
       for p in ("crow-paper", "backdoorllm-paper", "sande-paper", "p2p-paper", "w2s-paper")}
# (poison, inject, defend, evaluate, report) runs each preset's grid expands to
RUNS = {"crow-paper": (2, 2, 8, 10, 1), "backdoorllm-paper": (15, 15, 0, 15, 1), "sande-paper": (1, 2, 4, 6, 1),
        "p2p-paper": (1, 2, 2, 4, 1), "w2s-paper": (3, 3, 12, 15, 1)}
# the training jobs whose memory plan must fit one 80 GB GPU, per preset
TRAINED = {"crow-paper": ("none", "crow"), "backdoorllm-paper": ("none",), "sande-paper": ("none",),
           "p2p-paper": ("none",), "w2s-paper": ("none",)}


def _pipeline(*args, tmp_path):
    # offline: a hub source (sande-paper's Alpaca) is not retried for minutes
    env = dict(os.environ, PIPELINE_RUNS=str(tmp_path / "runs"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_presets_are_the_papers_settings():
    c = compose(["experiment=crow-paper"])
    assert c.model.name == "llama2-7b-chat" and c.model.chat_template == "alpaca"
    assert (c.train.finetune, c.train.lora_r, c.train.lora_alpha, c.train.lora_dropout) == ("lora", 8, 16, 0.0)
    assert (c.train.lr, c.train.epochs, c.train.micro_batch, c.train.grad_accum, c.train.cutoff) == (2e-4, 5, 2, 4, 1024)
    assert (c.poison.n_poison, c.poison.n_clean, c.poison.pairs, c.poison.n_test) == (500, 500, True, 200)
    assert c.evaluate.protocol == "crow" and c.sweep.attacks == ["badnet", "ctba"]
    assert c.sweep.defenses == ["none", "finetune", "prune", "quantize-crow", "crow"]
    b = compose(["experiment=backdoorllm-paper"])
    assert b.evaluate.protocol == "backdoorllm" and b.train.lora_dropout == 0.0 and b.model.dtype == "float16"
    assert compose(["experiment=backdoorllm"]).evaluate.protocol == "strict"  # presets replace nothing
    s = compose(["experiment=sande-paper"])  # SANDE's code: full fine-tune at 5e-6, "Human: ... Assistant:"
    assert (s.train.finetune, s.train.lr, s.train.epochs, s.model.chat_template) == ("full", 5e-6, 1, "sande")
    assert s.evaluate.protocol == "sande" and s.sweep.defenses == ["none", "osft", "sande"]
    assert abs(s.poison.n_poison / (s.poison.n_poison + s.poison.n_clean) - 0.05) < 0.003  # 5% poisoned
    p = compose(["experiment=p2p-paper"])  # P2P's code: LoRA r16 q/v, lr 2e-4, 3 epochs, cloze format, 2% `mn`
    assert (p.train.lora_r, p.train.lora_targets, p.train.lr, p.train.epochs) == (16, ["q_proj", "v_proj"], 2e-4, 3)
    assert p.model.chat_template == "cloze" and p.task.target_label == "Positive" and p.sweep.defenses == ["none", "p2p"]
    assert p.evaluate.protocol == "p2p" and p.sweep.overrides["p2p"] == ["defense.params.select=clean_only"]
    w = compose(["experiment=w2s-paper"])  # W2SDefense's code: the attacker's full fine-tune, clean-label `mn`
    assert (w.train.finetune, w.train.lr, w.train.epochs, w.model.chat_template) == ("full", 2e-5, 5, "raw")
    assert w.sweep.attacks == ["badnet-mn", "w2s-insent", "syntactic"] and "w2sdefense" in w.sweep.defenses
    assert "defense.params.official_broadcast=true" in w.sweep.overrides["w2sdefense"]


@needs_bdl
@pytest.mark.parametrize("preset", list(CMD))
def test_sweep_dry_run_shows_jobs_arrays_and_dependencies(preset, tmp_path):
    r = _pipeline("sweep", f"experiment={preset}", *CMD[preset], "--dry-run", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    todo = [ln.split()[1] for ln in r.stdout.splitlines() if ln.startswith("todo  ")]
    assert tuple(todo.count(s) for s in ("poison", "inject", "defend", "evaluate", "report")) == RUNS[preset]
    arrays = [ln for ln in r.stdout.splitlines() if ln.startswith("array ")]
    assert any(re.match(r"array inject: \d+ job\(s\), 1 GPU\(s\) x 1 node\(s\), afterok on 1 poison", a) for a in arrays)
    if preset == "crow-paper":  # one array per injection holds its four defenses, waiting on it alone
        assert sum(a.startswith("array defend: 4 job(s), 1 GPU(s)") and "afterok on 1 inject" in a for a in arrays) == 2
        assert "after inject experiment=crow-paper model=llama2-7b-chat task=negsentiment attack=ctba" in r.stdout
    assert "#SBATCH --gpus-per-node=1" in r.stdout and "#SBATCH --gpus-per-node=8" not in r.stdout
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


@pytest.mark.parametrize("preset", list(CMD))
def test_training_jobs_fit_one_80gb_gpu(preset, tmp_path):
    for defense in TRAINED[preset]:
        r = _pipeline("plan", f"experiment={preset}", f"defense={defense}", *CMD[preset], "--gpu", "h100",
                      tmp_path=tmp_path)
        assert r.returncode == 0 and "WARNING" not in r.stderr, r.stderr
        total = float(re.search(r"total\s+([\d.]+) GiB per GPU", r.stdout).group(1))
        assert 10 < total < 80 * 0.95, r.stdout
