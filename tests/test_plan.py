"""The memory planner against the points measured on an H100 (DESIGN.md §5), and its fit warning."""
import subprocess
import sys

import pytest

from pipeline.plan import GiB, SHAPES, Shape, plan

LLAMA7B = Shape(*SHAPES["llama2-7b"])


def test_param_counts():
    assert LLAMA7B.n_params / 1e9 == pytest.approx(6.74, rel=0.01)
    assert Shape(*SHAPES["llama2-13b"]).n_params / 1e9 == pytest.approx(13.0, rel=0.02)
    assert LLAMA7B.lora_params(16) / 1e6 == pytest.approx(40.0, rel=0.01)  # peft reports 39,976,960


# Our trainer's peak GPU memory on an H100 (bench/gpu_suite.sh, BENCHMARKS.md §3): LoRA r16, Llama-2-7B
# shape, ZeRO-2. (seq, micro-batch, checkpointing, train.compile, measured GiB)
MEASURED = [(1024, 8, False, False, 57.7), (1024, 4, False, True, 30.7), (1024, 6, False, True, 39.6),
            (1024, 8, False, True, 48.3), (512, 4, True, False, 15.0)]


@pytest.mark.parametrize("seq,micro,ckpt,compiled,measured_gib", MEASURED)
def test_lora_7b_matches_measured_peak(seq, micro, ckpt, compiled, measured_gib):
    p = plan(LLAMA7B, seq=seq, micro=micro, world=1, zero=2, offload_opt=False, offload_params=False,
             lora_r=16, grad_ckpt=ckpt, compiled=compiled)
    assert p["total"] / GiB == pytest.approx(measured_gib, rel=0.10)


def test_full_7b_offload_does_not_fit_a_128gb_host():
    # measured: the ZeRO-3 + offload full fine-tune of the 7B shape died before its first step on a node
    # with 125 GiB of RAM; DeepSpeed keeps 16 bytes per parameter of optimizer state on the host
    p = plan(LLAMA7B, seq=1024, micro=4, world=1, zero=3, offload_opt=True, offload_params=True, lora_r=None,
             grad_ckpt=True)
    assert p["host"] / GiB > 0.9 * 128e9 / GiB
    r = subprocess.run([sys.executable, "-m", "pipeline", "plan", "model=llama2-7b", "train.finetune=full",
                        "deepspeed=zero3-offload", "train.grad_ckpt=true", "--host-gb", "128"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "host" in r.stderr and "does not fit" in r.stderr
    # offloading only the optimizer state (weights and gradients stay on the GPU) fits both
    r = subprocess.run([sys.executable, "-m", "pipeline", "plan", "model=llama2-7b", "train.finetune=full",
                        "deepspeed=zero3-offload-opt", "train.grad_ckpt=true", "train.micro_batch=4", "--seq", "1024",
                        "--host-gb", "128", "--gpu", "h100"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "WARNING" not in r.stderr, r.stderr


def test_zero_sharding_and_offload_reduce_gpu_memory():
    kw = dict(seq=1024, micro=1, lora_r=None, grad_ckpt=True)
    z0 = plan(LLAMA7B, world=8, zero=0, offload_opt=False, offload_params=False, **kw)
    z2 = plan(LLAMA7B, world=8, zero=2, offload_opt=False, offload_params=False, **kw)
    z3 = plan(LLAMA7B, world=8, zero=3, offload_opt=False, offload_params=False, **kw)
    z3o = plan(LLAMA7B, world=1, zero=3, offload_opt=True, offload_params=True, **kw)
    assert z0["total"] > z2["total"] > z3["total"]
    assert z0["total"] / GiB > 80  # full fine-tuning of 7B without sharding does not fit one H100
    assert z3o["total"] / GiB < 80 and z3o["host"] / GiB > 80  # ... with ZeRO-3 + offload it does, on host RAM


def test_cli_warns_when_it_does_not_fit():
    r = subprocess.run([sys.executable, "-m", "pipeline", "plan", "model=llama2-13b", "train.finetune=full",
                        "deepspeed=zero0", "train.micro_batch=4"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "WARNING" in r.stderr and "does not fit" in r.stderr
    ok = subprocess.run([sys.executable, "-m", "pipeline", "plan", "model=llama2-7b", "train.grad_ckpt=true"],
                        capture_output=True, text=True, timeout=120)
    assert "WARNING" not in ok.stderr and "total" in ok.stdout
