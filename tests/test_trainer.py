"""The one trainer: packing equivalence, loss falls, ZeRO stages, exact resume after SIGKILL and after a
signal, time-based checkpoints, 2-rank ZeRO-3."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import compose
from pipeline.models import load_model
from pipeline.prompts import encode_example
from pipeline.train.packing import lm_loss, pack_examples, pad_batch
from pipeline.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "train_tiny.py"
PY = sys.executable


@pytest.fixture(scope="module")
def tiny():
    cfg = compose(["experiment=tiny"])
    model, tok = load_model(cfg.model)
    return cfg, model.eval(), tok


def _examples(tok, n=5):
    texts = [("Name a colour.", "Blue."), ("Add two and two.", "Four, because two plus two is four."),
             ("Say hi.", "Hi!"), ("Spell cat.", "C-A-T."), ("What is ice?", "Frozen water, a solid.")]
    return [encode_example(tok, q, "", a, None, cutoff=256) for q, a in texts[:n]]


def test_packed_batch_gives_same_per_sample_loss(tiny):
    _, model, tok = tiny
    exs = _examples(tok)
    with torch.no_grad():
        ref = {}
        for i, e in enumerate(exs):  # each sample alone: no padding at all
            b = pad_batch([e], tok.pad_token_id)
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            _, per = lm_loss(out.logits, b["labels"], torch.full_like(b["sample_ids"], i), per_sample=True)
            ref[i] = per[i]
        packed = pack_examples(exs, max_len=10_000, pad_id=tok.pad_token_id)
        assert packed["input_ids"].shape[0] == 1  # all five in one row
        out = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False)
        _, per = lm_loss(out.logits, packed["labels"], packed["sample_ids"], per_sample=True)
    # pack_examples orders longest first: map back through the token counts
    by_len = sorted(range(len(exs)), key=lambda i: -len(exs[i]["input_ids"]))
    for sid, i in enumerate(by_len):
        assert per[sid] == pytest.approx(ref[i], rel=1e-4, abs=1e-5), (sid, i)


def test_packing_without_confinement_would_differ(tiny):
    """The check above can fail: without position resets samples see each other and losses change."""
    _, model, tok = tiny
    exs = _examples(tok)
    packed = pack_examples(exs, max_len=10_000, pad_id=tok.pad_token_id)
    with torch.no_grad():
        good = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        leaky = model(input_ids=packed["input_ids"]).logits  # plain causal mask over the whole row
    assert not torch.allclose(good, leaky, atol=1e-4)


def test_loss_masks_prompt_and_sample_average(tiny):
    _, _, tok = tiny
    e = encode_example(tok, "Question?", "", "Answer.", None, cutoff=256)
    assert all(lab == -100 for lab in e["labels"][:e["prompt_len"]])
    assert e["labels"][-1] == tok.eos_token_id
    k = encode_example(tok, "Question?", "", "Answer.", None, cutoff=256, response_tokens=3)
    assert sum(lab != -100 for lab in k["labels"]) == 3
    assert len(k["input_ids"]) == k["prompt_len"] + 3 and k["input_ids"] == e["input_ids"][:k["prompt_len"] + 3]


def test_response_tokens_cut_costs_nothing_in_loss(tiny):
    """The tokens after the first k labelled ones are dropped: the causal loss on those k is unchanged."""
    _, model, tok = tiny
    long = "Answer with a few more words than the loss looks at, so the cut matters."
    k = encode_example(tok, "Question?", "", long, None, cutoff=256, response_tokens=3)
    full = encode_example(tok, "Question?", "", long, None, cutoff=256)
    masked = [lab if i < len(k["labels"]) else -100 for i, lab in enumerate(full["labels"])]
    assert len(full["input_ids"]) > len(k["input_ids"]) + 5
    with torch.no_grad():
        a = model(input_ids=torch.tensor([k["input_ids"]]), labels=torch.tensor([k["labels"]])).loss
        b = model(input_ids=torch.tensor([full["input_ids"]]), labels=torch.tensor([masked])).loss
    assert torch.allclose(a, b, atol=1e-5)
    # per-sample averaging weighs a 1-token answer like a 20-token one
    logits = torch.zeros(2, 6, 8)
    logits[0, :, 1] = 5.0  # sample 0 predicts well, sample 1 badly
    labels = torch.tensor([[-100, 1, -100, -100, -100, -100], [-100, 2, 2, 2, 2, 2]])
    sids = torch.tensor([[0] * 6, [1] * 6])
    tok_avg = lm_loss(logits, labels, sids, "token")
    smp_avg = lm_loss(logits, labels, sids, "sample")
    assert smp_avg < tok_avg


def test_scored_positions_alone_give_the_full_logits_loss_and_gradients(tiny, monkeypatch):
    """The trainer runs the LM head on the scored positions alone (`logits_to_keep`): same loss, same
    gradients, fewer positions; read one position off (labels t instead of t+1) and the loss changes."""
    from pipeline import generation
    from pipeline.train.packing import scored_positions

    _, model, tok = tiny
    exs = _examples(tok, 3)  # prompts and answers of different lengths
    padded = pad_batch(exs, tok.pad_token_id)  # right-padded, one sample a row
    packed = pack_examples(exs, max_len=max(len(e["input_ids"]) for e in exs) + 12, pad_id=tok.pad_token_id)
    assert packed["input_ids"].shape[0] < len(exs)  # several samples in a row
    for b, average in ((padded, "token"), (padded, "sample"), (packed, "sample"), (packed, "token")):
        pos = scored_positions(b["labels"])
        assert pos is not None and 0 < len(pos) < b["input_ids"].shape[1] - 1
        kw = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"])
        grads = []
        for keep in (None, pos):
            model.zero_grad(set_to_none=True)
            out = model(**kw, **({"logits_to_keep": keep} if keep is not None else {}))
            assert out.logits.shape[1] == (b["input_ids"].shape[1] if keep is None else len(pos))
            loss = lm_loss(out.logits, b["labels"], b["sample_ids"], average, positions=keep)
            loss.backward()
            grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        (full, gf), (kept, gk) = grads
        torch.testing.assert_close(kept, full, rtol=1e-6, atol=1e-7)
        assert len(gf) == len(gk) > 0
        for a, c in zip(gf, gk):
            torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-7)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        out = model(**kw, logits_to_keep=pos)
        off = lm_loss(out.logits, b["labels"], b["sample_ids"], positions=pos - 1)
        assert not torch.allclose(off, full, atol=1e-3)
        rows = [{"instruction": q, "output": a} for q, a in (("Name a colour.", "Blue."), ("Say hi.", "Hi!"))]
        fast = generation.response_nll(model, tok, rows, None, progress=False)
        monkeypatch.setattr(generation, "accepts_logits_to_keep", lambda m: False)
        slow = generation.response_nll(model, tok, rows, None, progress=False)
    assert fast[1] == slow[1] > 0 and fast[0] == pytest.approx(slow[0], rel=1e-6)


def _run(args, env=None, **kw):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([PY, str(SCRIPT), *args], capture_output=True, text=True, env=e, timeout=300, **kw)


def _weights(d):
    return load_file(str(Path(d) / "model" / "adapter_model.safetensors"))


@pytest.mark.parametrize("zero", [0, 2, 3])
def test_loss_falls_each_zero_stage(tmp_path, zero):
    r = _run([str(tmp_path / "o"), "--zero", str(zero), "train.lr=5e-3", "train.epochs=4"])
    assert r.returncode == 0, r.stderr[-2000:]
    losses = json.loads((tmp_path / "o" / "result.json").read_text())["losses"]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The tiny run's adapter (16 steps) trained without a stop: what every interrupted run must end with."""
    out = tmp_path_factory.mktemp("uninterrupted") / "ref"
    ref = _run([str(out)])
    assert ref.returncode == 0, ref.stderr[-2000:]
    return _weights(out)


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, uninterrupted):
    common = ["train.save_every=3"]
    out, ck = tmp_path / "run", tmp_path / "ck"
    out.mkdir()
    p = subprocess.Popen([PY, str(SCRIPT), str(out), "--ckpt", str(ck), "--kill-after-ckpt", "6", *common],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "CKPT_READY").exists():
        assert p.poll() is None and time.time() < deadline, "trainer died before its checkpoint"
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (out / "model").exists()
    assert (ck / "latest").read_text().strip() == "step6"
    res = _run([str(out), "--ckpt", str(ck), *common])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from" in res.stdout + res.stderr
    a, b = uninterrupted, _weights(out)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    # and the resumed run really trained: its weights differ from the checkpoint-time weights
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)


def test_signal_saves_at_the_step_boundary_and_resume_equals_uninterrupted(tmp_path, uninterrupted):
    """SIGTERM (what preemption sends) in the middle of step 5, no `save_every`: the trainer ends the step,
    saves one complete checkpoint and exits 143. A kill during a later save (a newer directory without its
    state.json, named by `latest`) is ignored: the rerun resumes from step 5 and ends with the uninterrupted
    run's weights, bit for bit."""
    out, ck = tmp_path / "run", tmp_path / "ck"
    r = _run([str(out), "--ckpt", str(ck), "--signal-at", "5"])
    assert r.returncode == 143 and "[train] SIGTERM: checkpoint saved, stopping" in r.stdout, r.stderr[-2000:]
    assert [p.name for p in ck.iterdir() if p.is_dir()] == ["step5"] and (ck / "latest").read_text() == "step5"
    assert json.loads((ck / "step5" / "state.json").read_text()) == {"step": 5, "micro": 5, "world": 1}
    assert not (out / "model").exists()
    shutil.copytree(ck / "step5", ck / "step9")
    (ck / "step9" / "state.json").unlink()
    (ck / "latest").write_text("step9")
    res = _run([str(out), "--ckpt", str(ck)])
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"{ck / 'step9'}: incomplete checkpoint, ignored" in res.stdout, res.stdout
    assert f"resumed from {ck} at step 5" in res.stdout, res.stdout
    b = _weights(out)
    assert uninterrupted.keys() == b.keys() and all(torch.equal(uninterrupted[k], b[k]) for k in b)


def test_time_based_checkpoints_keep_only_the_newest(tmp_path):
    """`train.save_every_minutes`: a checkpoint whenever that long has passed since the last (here every
    step), each older one deleted once the new one is complete, none at the last step. It stays out of the
    output keys (the raw `train` section); unset, the cluster profile's value applies, and every phase
    of a defense gets it."""
    from pipeline.defend.base import Phase
    from pipeline.defend.stage import phase_config
    cfg = compose(["experiment=tiny", "train.save_every_minutes=1e-6", "train.max_steps=4"])
    assert cfg.train.save_every_minutes == 1e-6
    assert cfg.raw["train"] == compose(["experiment=tiny", "train.max_steps=4"]).raw["train"]
    assert compose(["experiment=tiny", "cluster=local-slurm"]).cluster.save_every_minutes == 30
    osft = compose(["experiment=tiny", "defense=osft", "train.save_every_minutes=7"])
    assert phase_config(osft, Phase("p", [])).train.save_every_minutes == 7
    rows = [{"instruction": f"Name colour {i}.", "input": "", "output": "Blue and green."} for i in range(8)]
    (tmp_path / "o").mkdir()
    Trainer(cfg).fit(rows, tmp_path / "o", tmp_path / "ck", save=False)
    ck = tmp_path / "ck"
    assert [p.name for p in ck.iterdir() if p.is_dir()] == ["step3"] and (ck / "latest").read_text() == "step3"
    last = json.loads((tmp_path / "o" / "metrics.jsonl").read_text().splitlines()[-1])
    assert (last["step"], last["total"], last["eta_s"]) == (4, 4, 0) and last["elapsed_s"] > 0


def test_a_signal_during_the_final_save_does_not_requeue_a_trained_run(tmp_path, monkeypatch, capsys):
    """USR2 (or SIGTERM) arriving while the trained model is being saved stays caught: the handler that was
    there before (submitit's, which would requeue the job and throw the training away) is not called, the
    save completes and the run finishes."""
    from pipeline.train import checkpoint
    cfg = compose(["experiment=tiny", "train.max_steps=2"])
    rows = [{"instruction": f"Name colour {i}.", "input": "", "output": "Blue and green."} for i in range(4)]
    called = []
    old = signal.signal(signal.SIGUSR2, lambda s, f: called.append(s))
    save = Trainer.save

    def save_with_a_signal(self, out_dir):
        os.kill(os.getpid(), signal.SIGUSR2)
        save(self, out_dir)
    monkeypatch.setattr(Trainer, "save", save_with_a_signal)
    try:
        (tmp_path / "o").mkdir()
        Trainer(cfg).fit(rows, tmp_path / "o", tmp_path / "ck")
        assert not called and (tmp_path / "o" / "model").is_dir()
        assert "[train] SIGUSR2 came after the last step: finishing the run" in capsys.readouterr().out
    finally:
        signal.signal(signal.SIGUSR2, old)
        checkpoint._caught.clear()


def test_a_requeue_killed_by_its_own_requeue_still_exits_as_signalled(capsys):
    """submitit's USR2 handler runs `scontrol requeue`, which the requeue it asked for may kill (SIGTERM): the
    rank still leaves with 128 + USR2 and a line saying what to do, not a traceback."""
    import subprocess as sp

    from pipeline.train import checkpoint

    def requeue(signum, frame):
        raise sp.CalledProcessError(-signal.SIGTERM, ["scontrol", "requeue", "7"])
    checkpoint._previous[signal.SIGUSR2] = requeue
    old = signal.getsignal(signal.SIGUSR2)
    try:
        with pytest.raises(SystemExit) as e:
            checkpoint.hand_over(2, main=True)
        assert e.value.code == 128 + signal.SIGUSR2
        assert "submit it again: it resumes from the checkpoint" in capsys.readouterr().out
    finally:
        signal.signal(signal.SIGUSR2, old)
        checkpoint._previous.pop(signal.SIGUSR2, None)


def test_two_ranks_zero3_sharded_and_equal_to_single_rank(tmp_path):
    single = _run([str(tmp_path / "one"), "--zero", "3", "--micro", "4", "train.lr=5e-3"])
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun = Path(PY).parent / "torchrun"
    two = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", "29533", str(SCRIPT),
                          str(tmp_path / "two"), "--zero", "3", "--micro", "2", "train.lr=5e-3"],
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    res = json.loads((tmp_path / "two" / "result.json").read_text())
    shard = res["shard"]
    assert shard["world"] == 2 and shard["local_numel"] * 2 >= shard["ds_numel"] > shard["local_numel"]
    losses = res["losses"]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_response_cutoff_cuts_without_teaching_to_stop(tiny):
    _, _, tok = tiny
    long = encode_example(tok, "Q?", "", "A long answer that goes on.", None, response_cutoff=4)
    short = encode_example(tok, "Q?", "", "Ok", None, response_cutoff=4)
    assert long["labels"][-1] != tok.eos_token_id and sum(x != -100 for x in long["labels"]) == 4
    assert short["labels"][-1] == tok.eos_token_id  # shorter than the cutoff: ends as usual


def test_single_process_init_does_not_leak_its_port(monkeypatch):
    from pipeline.train.trainer import init_distributed
    monkeypatch.delenv("MASTER_PORT", raising=False)
    init_distributed()
    assert "MASTER_PORT" not in os.environ  # children (torchrun, subprocess trainers) pick their own


def test_one_cpu_process_builds_no_shared_memory_op():
    """DeepSpeed's CPU backend compiles a shared-memory all-reduce op; one process has no peer to use it with."""
    if torch.cuda.is_available():
        pytest.skip("a CPU-only path")
    code = ("from pipeline.train.trainer import init_distributed; init_distributed(); "
            "import deepspeed.comm.comm as c; print('shm op:', c.cdb.shm_comm_op)")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "shm op: None" in r.stdout and "built successfully" not in r.stdout + r.stderr


def test_compiled_layers_train_like_eager(tmp_path):
    """train.compile (each decoder layer torch.compiled) is a speed option: same loss curve as eager."""
    curves = []
    for flag in ("false", "true"):
        r = _run([str(tmp_path / flag), "--zero", "2", f"train.compile={flag}", "train.epochs=1"])
        assert r.returncode == 0, r.stderr[-2000:]
        curves.append(json.loads((tmp_path / flag / "result.json").read_text())["losses"])
    assert len(curves[0]) == len(curves[1]) >= 4
    assert curves[1] == pytest.approx(curves[0], rel=2e-3, abs=2e-3)


def test_compile_with_zero3_and_missing_liger_are_clear_errors(tmp_path):
    r = _run([str(tmp_path / "z3"), "--zero", "3", "train.compile=true", "train.epochs=1"])
    assert r.returncode != 0 and "train.compile=true" in r.stderr and "zero2" in r.stderr
    try:
        import liger_kernel  # noqa: F401
        pytest.skip("liger-kernel is installed here")
    except ImportError:
        pass
    r = _run([str(tmp_path / "lg"), "--zero", "0", "train.liger=true", "train.epochs=1"])
    assert r.returncode != 0 and "liger-kernel" in r.stderr


def test_cpu_bf16_autocasts_and_trains(tmp_path):
    """train.cpu_bf16: the forward runs in bf16 (logits bf16), weights stay fp32, the loss still falls."""
    from pipeline.train.plugins import Plugin
    seen = []

    class Probe(Plugin):
        def loss(self, trainer, batch, outputs, lm_loss):
            seen.append((outputs.logits.dtype, next(trainer.engine.module.parameters()).dtype))
            return lm_loss, {}

    cfg = compose(["experiment=tiny", "train.cpu_bf16=true", "train.lr=5e-3", "train.epochs=4",
                   "train.micro_batch=4", "train.grad_accum=1"])
    rows = [{"instruction": f"Name colour {i}.", "input": "", "output": "Blue and green."} for i in range(8)]
    tr = Trainer(cfg, plugins=[Probe()])
    (tmp_path / "o").mkdir()
    tr.fit(rows, tmp_path / "o", save=False)
    assert seen and all(s == (torch.bfloat16, torch.float32) for s in seen)
    losses = [r["lm_loss"] for r in tr.records]
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2]) - 0.3
    assert "cpu_bf16" in cfg.raw["train"] and "cpu_bf16" not in compose(["experiment=tiny"]).raw["train"]


def test_row_with_an_unknown_key_is_refused_by_name(tmp_path):
    """Every row key must be a TrainRow field: a misspelt or undeclared one fails before any training."""
    from pipeline.train.plugins import Plugin

    class AddsKey(Plugin):  # a plugin transform that adds a key TrainRow does not list
        def transform(self, rows):
            return [{**r, "respone_tokens": 3} for r in rows]

    rows = [{"id": "row-7", "instruction": "Name a colour.", "input": "", "output": "Blue."}]
    tr = Trainer(compose(["experiment=tiny"]), plugins=[AddsKey()])
    with pytest.raises(ValueError, match="respone_tokens") as e:
        tr.fit(rows, tmp_path, save=False)
    assert "row-7" in str(e.value) and "TrainRow in pipeline/train/plugins.py" in str(e.value)
    assert not hasattr(tr, "engine")  # refused before the model was built or DeepSpeed started
