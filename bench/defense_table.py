"""The defense table: tasks x attacks x (no defense + every defense), then the report.

    python bench/defense_table.py                                   # the full grid (GPU cluster sized)
    python bench/defense_table.py experiment=defense-grid-cpu       # 2 tasks x 2 attacks at demo size (CPU)
Any config override applies (model=..., cluster=..., deepspeed=...). Complete outputs are reused, so a run
that was stopped goes on where it left off. Prints the wall time and the table; the files are under
runs/report/.
"""
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv):
    exp = next((a.split("=", 1)[1] for a in argv if a.startswith("experiment=")), "defense-grid")
    overrides = [f"experiment={exp}", *(a for a in argv if not a.startswith("experiment="))]
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "pipeline", "sweep", *overrides, "--wait"], cwd=ROOT)
    wall = time.time() - t
    rep = subprocess.run([sys.executable, "-m", "pipeline", "report", f"experiment={exp}"], cwd=ROOT,
                         capture_output=True, text=True)
    print(rep.stdout + rep.stderr)
    print(f"sweep wall time: {wall / 60:.1f} min (exit {r.returncode})")
    return r.returncode or rep.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
