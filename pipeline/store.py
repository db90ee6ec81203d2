"""Artifact store: content-addressed stage outputs under `runs/<stage>/<name>-<hash12>/`.

Each output directory holds the stage's data, `config.yaml` (resolved), `manifest.json` (input hashes,
output hash, git revision, package versions, host, times, metrics) and `_SUCCESS`. Everything is written
into a temporary sibling (`.tmp-...`), `_SUCCESS` last, and the directory is renamed into place, so a
killed job never leaves anything that `is_complete` accepts. A later stage reads only complete outputs.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

SUCCESS = "_SUCCESS"
PACKAGES = ("torch", "transformers", "peft", "deepspeed", "datasets", "pyarrow", "submitit", "safetensors")


class StoreError(Exception):
    """An input that is missing or incomplete, or an output that cannot be written."""


def runs_root() -> Path:
    return Path(os.environ.get("PIPELINE_RUNS", "runs"))


def store_relative(path: Path) -> str:
    """`path` as a manifest names another output: relative to the store root when it lies inside it (so a
    store copied or mounted elsewhere still finds it), else absolute. `in_store` reads it back."""
    p, root = Path(path).resolve(), runs_root().resolve()
    return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)


def in_store(name: str) -> Path:
    """The output a manifest names (`store_relative`'s string): under the current store root unless absolute
    (or, as manifests written before store_relative named it, a path relative to the working directory)."""
    p = Path(name)
    if p.is_absolute() or (not (runs_root() / p).exists() and p.exists()):
        return p
    return runs_root() / p


def write_json_atomic(path: Path, obj, **dump_kw) -> None:
    """`obj` as JSON at `path`, whole or not at all: written to a sibling temporary file, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, **dump_kw))
    os.replace(tmp, path)


def canonical_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def hash_dir(path: Path, skip=("config.yaml", "manifest.json", SUCCESS)) -> str:
    """sha256 over relative paths and contents of every file under `path` (store metadata excluded)."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if not p.is_file() or p.name in skip:
            continue
        h.update(str(p.relative_to(path)).encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def hash_path(path: Path) -> str:
    path = Path(path)
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return hash_dir(path)


def git_revision() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev or "unknown") + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict:
    from importlib import metadata
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def is_complete(path) -> bool:
    return Path(path, SUCCESS).is_file()


def require_complete(path, what: str = "input") -> Path:
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{what} {path} does not exist: run the stage that builds it first")
    if not is_complete(path):
        raise StoreError(f"{what} {path} is incomplete (no {SUCCESS}): it was interrupted; rerun its stage")
    return path


def read_manifest(path) -> dict:
    return json.loads(Path(require_complete(path), "manifest.json").read_text())


def read_config(path) -> dict:
    return yaml.safe_load(Path(require_complete(path), "config.yaml").read_text())


@dataclass
class StageOutput:
    """Where a stage writes (`tmp`) and what goes into its manifest (`metrics`, `extra`)."""
    stage: str
    final: Path
    tmp: Path
    metrics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


def output_path(stage: str, name: str, key_obj) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return runs_root() / stage / f"{safe}-{canonical_hash(key_obj)[:12]}"


def key_path(stage: str, name: str, config: dict, inputs: dict, extra=None) -> Path:
    """The one rule from a stage's identity to its output directory (pipeline/graph.py asks it; so does
    `stage_output`): the hash of (stage, resolved config, input hashes, extra)."""
    return output_path(stage, name, {"stage": stage, "config": config, "inputs": inputs, "extra": extra})


@contextlib.contextmanager
def stage_output(stage: str, name: str, config: dict, inputs: dict[str, str], force: bool = False,
                 key_extra=None):
    """Context manager: yields a StageOutput, or None when a complete output exists (and not force).

    `config` is the resolved config written to config.yaml; the directory key is the hash of
    (stage, config, inputs, key_extra). `inputs` maps input role -> content hash.
    """
    final = key_path(stage, name, config, inputs, key_extra)
    if is_complete(final) and not force:
        print(f"[{stage}] already complete: {final} (use --force to redo)", file=sys.stderr)
        yield None
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(final)
    tmp = final.parent / f".tmp-{final.name}-{socket.gethostname()}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    out = StageOutput(stage=stage, final=final, tmp=tmp)
    started = time.time()
    try:
        yield out
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=True))
        manifest = {
            "stage": stage, "name": name, "path": str(final),
            "inputs": inputs, "output_hash": hash_dir(tmp),
            "git_revision": git_revision(), "packages": package_versions(),
            "host": socket.gethostname(), "argv": sys.argv,
            "started": _dt.datetime.fromtimestamp(started, _dt.timezone.utc).isoformat(),
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "wall_s": round(time.time() - started, 3),
            "metrics": out.metrics, **out.extra,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        (tmp / SUCCESS).write_text("")
        _fsync_dir(tmp)
        if final.exists():  # --force over an older complete (or a stale incomplete) output
            trash = final.parent / f".trash-{final.name}-{os.getpid()}"
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
        print(f"[{stage}] wrote {final}", file=sys.stderr)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_stale(final: Path):
    """Delete temporary directories of this output left by killed processes of this host."""
    host = socket.gethostname()
    for d in final.parent.glob(f".tmp-{final.name}-{host}-*"):
        try:
            pid = int(d.name.rsplit("-", 1)[1])
            os.kill(pid, 0)  # still running: leave it
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def list_outputs(stage: str | None = None) -> list[Path]:
    root = runs_root()
    stages = [stage] if stage else sorted(p.name for p in root.iterdir() if p.is_dir()) if root.exists() else []
    out = []
    for s in stages:
        d = root / s
        if d.is_dir():
            out += sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
    return out


def latest(stage: str, prefix: str) -> Path | None:
    """The most recently finished complete output of `stage` whose name starts with `prefix`."""
    cands = [p for p in list_outputs(stage) if p.name.startswith(prefix) and is_complete(p)]
    return max(cands, key=lambda p: (p / SUCCESS).stat().st_mtime) if cands else None
