"""`quantize`: 4-bit NF4 with double quantisation (bitsandbytes), as CROW's evaluation loads it (METHODS.md §6).

Two ways (`mode`). `merged` (default): the defended model is the merged backdoored model in full precision
(out_dir/model, safetensors) plus the manifest entry `load_in_4bit: {quant_type, double_quant,
compute_dtype}`: evaluation loads the weights with that quantisation, so what is measured is the 4-bit model.
`adapter` (CROW's eval_scripts/*_quantize, where the injection was LoRA): the attacker's adapter is kept as
it is and only the base model is loaded in 4-bit under it (`pipeline.models.load_adapter_4bit`); an inject
output with full weights is refused. `apply` first checks that bitsandbytes imports (nothing is written otherwise), then loads the
written weights in 4-bit and runs them on a few clean prompts (`verify`), so a broken backend fails here
rather than in evaluation. On a CPU the compute dtype is float32 (bitsandbytes >= 0.45 has CPU kernels).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError

MANIFEST_KEY = "load_in_4bit"


class MissingBackendError(ConfigError):
    """The quantisation backend (bitsandbytes) is not installed or does not load."""


@dataclass
class Params:
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA | float32 | bfloat16 | float16
    verify: bool = True  # load the written model in 4-bit and compare it with full precision on clean prompts
    n_verify: int = 8
    mode: str = "merged"  # merged: the merged weights in 4-bit | adapter: the base in 4-bit, the LoRA adapter kept

    def __post_init__(self):
        if self.mode not in ("merged", "adapter"):
            raise ValueError(f"mode must be merged or adapter, got {self.mode!r}")
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be nf4 or fp4, got {self.quant_type!r}")
        if self.compute_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"compute_dtype must be auto, float32, bfloat16 or float16, got {self.compute_dtype!r}")


def require_bitsandbytes():
    """Import bitsandbytes or raise MissingBackendError saying how to install it."""
    try:
        import bitsandbytes
    except (ImportError, OSError, RuntimeError) as e:  # not installed, or its native library fails to load
        raise MissingBackendError(
            f"defense 'quantize' needs the Python package 'bitsandbytes' (4-bit NF4), which does not import "
            f"({type(e).__name__}: {e}); install it with `pip install 'bitsandbytes>=0.45'` "
            "(or `pip install -e '.[quantize]'`)") from None
    return bitsandbytes


def manifest_entry(params: Params) -> dict:
    return {"quant_type": params.quant_type, "double_quant": params.double_quant,
            "compute_dtype": params.compute_dtype}


from ..models import load_4bit, load_adapter_4bit, quantization_config  # noqa: E402,F401  (loading: models)


def load_quantized(output_dir: str | Path, device: str = "cpu"):
    """(model, tokenizer, model config) of a `quantize` defend output, as evaluation should load it."""
    from ..config import compose_model
    from ..models import check_safe_dir, load_tokenizer
    from ..store import read_config, read_manifest
    output_dir = Path(output_dir)
    mm = read_manifest(output_dir)
    entry = mm.get(MANIFEST_KEY) or (mm.get("metrics") or {}).get(MANIFEST_KEY)
    if not entry:
        raise ValueError(f"{output_dir}/manifest.json: no '{MANIFEST_KEY}' entry")
    mcfg = compose_model(read_config(output_dir)["model"])
    weights = output_dir / "model"
    check_safe_dir(weights, mcfg.allow_pickle, mcfg.trust_remote_code)
    return load_4bit(weights, entry, device), load_tokenizer(mcfg, path=str(weights)), mcfg


def count_4bit(model) -> int:
    import bitsandbytes as bnb
    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


@torch.no_grad()
def _verify(full, loader, tok, rows, template, n: int, device: str) -> dict:
    from ..prompts import encode_example
    q = loader()
    n4 = count_4bit(q)
    if n4 == 0:
        raise RuntimeError("quantize: no linear layer of the written model loaded as 4-bit")
    agree, total, diff = 0, 0, 0.0
    for r in rows[:n]:
        e = encode_example(tok, r["instruction"], r.get("input", ""), "", template)
        ids = torch.tensor([e["input_ids"][:e["prompt_len"]]], device=device)
        a = full(input_ids=ids).logits[0, -1].float()
        b = q(input_ids=ids).logits[0, -1].float()
        agree += int(a.argmax() == b.argmax())
        diff += float((a - b).abs().mean())
        total += 1
    del q
    return {"linears_4bit": n4, "verify_prompts": total,
            "next_token_agreement": agree / total if total else None,
            "mean_abs_logit_diff": diff / total if total else None}


def apply(params: Params, ctx, out_dir: Path) -> dict:
    require_bitsandbytes()  # before anything is written
    from ..models import load_trained
    device = "cuda" if torch.cuda.is_available() else "cpu"
    adapter = Path(ctx.model_dir) / "model" / "adapter_config.json"
    if params.mode == "adapter" and not adapter.is_file():
        raise ConfigError(f"defense.params.mode=adapter keeps the attacker's LoRA adapter over a 4-bit base, but "
                          f"{ctx.model_dir}/model holds full weights (a full fine-tuning injection): use mode=merged")
    target = Path(out_dir) / "model"
    entry = manifest_entry(params)
    res = {MANIFEST_KEY: entry, "mode": params.mode}
    if params.mode == "adapter":  # the adapter as the attacker left it; the base is quantised when loaded
        shutil.copytree(Path(ctx.model_dir) / "model", target)
        if not params.verify:  # nothing to load: the full-precision model serves only the comparison
            return res
        model, tok, mcfg = load_trained(ctx.model_dir, device=device)
        loader = lambda: load_adapter_4bit(target, mcfg, entry, device)  # noqa: E731
    else:
        model, tok, _ = load_trained(ctx.model_dir, device=device, merge=True)
        model.save_pretrained(target, safe_serialization=True)
        tok.save_pretrained(target)
        loader = lambda: load_4bit(target, entry, device)  # noqa: E731
    model.eval()
    if params.verify:
        res.update(_verify(model, loader, tok, ctx.defense_rows, ctx.cfg.model.chat_template, params.n_verify,
                           device))
    return res
