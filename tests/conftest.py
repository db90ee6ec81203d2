"""Fixtures shared by test modules: `trained_in_process` (the environment an in-process trainer leaves), and
`slurm`, a real one-node Slurm (slurm/local_cluster.sh) started once per test session for every module that
asks for it (tests/test_slurm.py, tests/test_slurm_real.py) and stopped at the end, even when a test fails.
Skipped, with the reason, where it cannot be started (not root, no apt-get or the packages cannot be
installed)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SLURM_SCRIPT = ROOT / "slurm" / "local_cluster.sh"


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """The cluster's directory; SLURM_CONF points at its slurm.conf while the session runs."""
    if os.geteuid() != 0:
        pytest.skip("the local Slurm needs root (it installs packages and starts daemons)")
    if not shutil.which("apt-get") and not shutil.which("slurmctld"):
        pytest.skip("no Slurm and no apt-get to install it")
    d = tmp_path_factory.mktemp("slurm")
    saved = os.environ.get("SLURM_CONF")
    try:
        # --watch: the cluster stops itself should this process die without running the finalizer
        p = subprocess.run(["bash", str(SLURM_SCRIPT), "start", str(d), "--watch", str(os.getpid())],
                           check=False, capture_output=True, text=True, timeout=600)
        if p.returncode == 3:
            pytest.skip(f"local Slurm unavailable: {p.stderr.strip().splitlines()[-1]}")
        assert p.returncode == 0, f"local_cluster.sh start failed:\n{p.stderr}"
        os.environ["SLURM_CONF"] = str(d / "slurm.conf")
        yield d
    finally:
        subprocess.run(["bash", str(SLURM_SCRIPT), "stop", str(d)], check=False, capture_output=True, timeout=120)
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved


@pytest.fixture
def trained_in_process(monkeypatch):
    """The environment of a process that has run a trainer in-process: init_distributed leaves RANK=0,
    WORLD_SIZE=1, LOCAL_RANK=0 and MASTER_ADDR set (DeepSpeed needs them). Jobs it submits must not inherit them."""
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
        monkeypatch.setenv(k, v)
