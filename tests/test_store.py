"""Artifact store: complete outputs only, skip when done, nothing half-written survives a crash or SIGKILL."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from pipeline import store
from pipeline.store import (SUCCESS, StoreError, hash_dir, is_complete, latest, list_outputs, output_path,
                            read_config, read_manifest, require_complete, stage_output)

CONFIG = {"task": {"name": "negsentiment"}, "poison": {"n_clean": 4, "seed": 0}}
INPUTS = {"source": "0" * 64}


@pytest.fixture(autouse=True)
def runs(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    monkeypatch.setenv("PIPELINE_RUNS", str(root))
    return root


def write_output(force=False, config=CONFIG, text="hello", name="demo"):
    with stage_output("poison", name, config, INPUTS, force=force) as out:
        if out is None:
            return None
        (out.tmp / "data").mkdir()
        (out.tmp / "data" / "rows.txt").write_text(text)
        out.metrics["rows"] = 1
        out.extra["note"] = "x"
        return out.final


def test_writes_config_manifest_and_success(runs):
    final = write_output()
    assert final is not None and final.is_dir()
    assert final.parent == runs / "poison"
    assert final.name.startswith("demo-") and len(final.name) == len("demo-") + 12
    assert is_complete(final) and require_complete(final) == final
    assert (final / SUCCESS).is_file()
    assert (final / "data" / "rows.txt").read_text() == "hello"
    assert yaml.safe_load((final / "config.yaml").read_text()) == CONFIG == read_config(final)
    m = json.loads((final / "manifest.json").read_text())
    assert m == read_manifest(final)
    assert m["stage"] == "poison" and m["name"] == "demo" and m["path"] == str(final)
    assert m["inputs"] == INPUTS
    assert m["output_hash"] == hash_dir(final) and len(m["output_hash"]) == 64
    assert m["git_revision"] and isinstance(m["git_revision"], str)
    assert m["packages"]["python"] and m["packages"]["torch"]
    assert "transformers" in m["packages"]
    for k in ("started", "finished", "wall_s", "host"):
        assert k in m
    assert m["started"] <= m["finished"] and m["wall_s"] >= 0
    assert m["metrics"] == {"rows": 1} and m["note"] == "x"
    # nothing temporary is left next to it
    assert [p.name for p in final.parent.iterdir()] == [final.name]


def test_path_is_content_addressed():
    a = output_path("poison", "demo", {"config": CONFIG})
    assert a == output_path("poison", "demo", {"config": dict(reversed(list(CONFIG.items())))})
    assert a != output_path("poison", "demo", {"config": {**CONFIG, "poison": {"n_clean": 5, "seed": 0}}})
    assert a != output_path("inject", "demo", {"config": CONFIG})
    assert write_output() != write_output(config={**CONFIG, "x": 1})


def test_second_call_skips_and_force_redoes(capsys):
    final = write_output(text="first")
    started = read_manifest(final)["started"]
    assert write_output(text="second") is None  # complete: the body gets None and does not run
    assert "already complete" in capsys.readouterr().err
    assert (final / "data" / "rows.txt").read_text() == "first"
    time.sleep(0.01)
    again = write_output(force=True, text="second")
    assert again == final and is_complete(final)
    assert (final / "data" / "rows.txt").read_text() == "second"
    assert read_manifest(final)["started"] > started
    assert [p.name for p in final.parent.iterdir()] == [final.name]  # no .tmp or .trash left


def test_exception_inside_leaves_nothing(runs):
    with pytest.raises(RuntimeError):
        with stage_output("poison", "demo", CONFIG, INPUTS) as out:
            (out.tmp / "partial.txt").write_text("half")
            raise RuntimeError("boom")
    final = output_path("poison", "demo", {"stage": "poison", "config": CONFIG, "inputs": INPUTS, "extra": None})
    assert not final.exists() and not is_complete(final)
    assert list((runs / "poison").iterdir()) == []
    with pytest.raises(StoreError, match="does not exist"):
        require_complete(final)
    assert write_output() == final and is_complete(final)  # and a rerun then works


def test_keyboard_interrupt_inside_leaves_nothing(runs):
    with pytest.raises(KeyboardInterrupt):
        with stage_output("poison", "demo", CONFIG, INPUTS) as out:
            (out.tmp / "partial.txt").write_text("half")
            raise KeyboardInterrupt
    assert list((runs / "poison").iterdir()) == []


def test_failed_force_keeps_the_old_complete_output():
    final = write_output(text="old")
    with pytest.raises(RuntimeError):
        with stage_output("poison", "demo", CONFIG, INPUTS, force=True) as out:
            (out.tmp / "partial.txt").write_text("half")
            raise RuntimeError("boom")
    assert is_complete(final) and (final / "data" / "rows.txt").read_text() == "old"


def test_require_complete_rejects_missing_and_incomplete(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        require_complete(tmp_path / "nothing")
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.yaml").write_text("a: 1\n")
    (half / "manifest.json").write_text("{}")
    assert not is_complete(half)
    with pytest.raises(StoreError, match="incomplete"):
        require_complete(half)
    with pytest.raises(StoreError):
        read_manifest(half)
    with pytest.raises(StoreError):
        read_config(half)


def test_incomplete_final_dir_is_replaced(runs):
    final = output_path("poison", "demo", {"stage": "poison", "config": CONFIG, "inputs": INPUTS, "extra": None})
    final.mkdir(parents=True)
    (final / "junk.txt").write_text("left by something else")
    assert write_output() == final and is_complete(final)
    assert not (final / "junk.txt").exists()


# ------------------------------------------------------------------------------------------ SIGKILL
CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pipeline.store import stage_output
    config, inputs, marker = {config!r}, {inputs!r}, Path({marker!r})
    with stage_output("poison", "demo", config, inputs) as out:
        (out.tmp / "data").mkdir()
        with open(out.tmp / "data" / "rows.txt", "w") as f:
            f.write("partial row\\n")
            f.flush()
            marker.write_text(str(out.final))  # ready: the test kills us now
            print("READY", flush=True)
            time.sleep(120)
            f.write("never\\n")
""")


def test_sigkill_mid_write_leaves_nothing_accepted_and_rerun_completes(tmp_path, runs):
    marker = tmp_path / "ready"
    code = CHILD.format(config=CONFIG, inputs=INPUTS, marker=str(marker))
    env = dict(os.environ, PIPELINE_RUNS=str(runs))
    p = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        line = p.stdout.readline()  # blocks until READY (or the child dies)
        assert line.strip() == "READY", p.stderr.read()
        assert marker.is_file()
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == -signal.SIGKILL
    final = Path(marker.read_text())
    assert final.parent == runs / "poison"

    # the killed write left only a hidden temporary sibling, which nothing accepts
    stale = [q for q in final.parent.iterdir() if q.name.startswith(".tmp-")]
    assert stale and (stale[0] / "data" / "rows.txt").read_text() == "partial row\n"
    assert not final.exists() or not (final / SUCCESS).exists()
    assert not is_complete(final)
    for q in stale:
        assert not is_complete(q)
    with pytest.raises(StoreError):  # what a later stage does with its input
        require_complete(final, "poisoned set")
    assert list_outputs("poison") == [] and latest("poison", "demo") is None

    # a rerun (a new process in real life: here this one) completes it
    again = write_output()
    assert again == final and is_complete(final)
    assert require_complete(final) == final
    assert (final / "data" / "rows.txt").read_text() == "hello"
    assert read_manifest(final)["output_hash"] == hash_dir(final)
    assert list_outputs("poison") == [final] and latest("poison", "demo") == final
    # the stale temporary directory is still not an output
    for q in stale:
        assert q not in list_outputs("poison") and not is_complete(q)


def test_list_outputs_and_latest_only_complete(runs):
    a = write_output(name="demo")
    (runs / "poison" / "demo-incomplete00").mkdir()
    assert latest("poison", "demo") == a
    assert a in list_outputs("poison") and all(not p.name.startswith(".") for p in list_outputs())
    assert store.runs_root() == runs


def test_stale_tmp_of_dead_process_is_removed(tmp_path, monkeypatch):
    import socket

    from pipeline import store
    monkeypatch.setenv("PIPELINE_RUNS", str(tmp_path / "runs"))
    final = store.output_path("s", "n", {"a": 1})
    final.parent.mkdir(parents=True)
    stale = final.parent / f".tmp-{final.name}-{socket.gethostname()}-999999999"
    stale.mkdir()
    (stale / "half").write_text("x")
    with store.stage_output("s", "n", {"a": 1}, {}, key_extra=None) as out:
        assert out is not None
    # the key differs (stage/config/inputs), so build the stale dir for the real final path too
    stale2 = out.final.parent / f".tmp-{out.final.name}-{socket.gethostname()}-999999999"
    stale2.mkdir()
    with store.stage_output("s", "n", {"a": 1}, {}, force=True) as out2:
        assert out2 is not None
    assert not stale2.exists()
    assert store.is_complete(out2.final)
