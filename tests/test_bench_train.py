"""bench/train_throughput.py runs end to end on a tiny shape (the GPU figures come from a GPU run)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_throughput_tiny(tmp_path):
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "train_throughput.py"), "--tiny", "--steps", "2",
                        "--warmup", "1", "--modes", "hf-peft,ours-lora,ours-full-z3off,cost-crow,cost-w2s,cost-sande-parrot",
                        "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "tokens/s" in p.stdout.splitlines()[-7]
    res = json.loads(out.read_text())
    assert [r["mode"] for r in res] == ["hf-peft", "ours-lora", "ours-full-z3off", "cost-crow", "cost-w2s",
                                           "cost-sande-parrot"]
    assert all(r["tokens_per_s"] > 0 and r["params"] > 0 for r in res)
