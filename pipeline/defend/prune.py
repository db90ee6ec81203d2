"""`prune`: Wanda unstructured pruning of the merged backdoored model (METHODS.md §6; Sun et al. 2023).

Every linear layer inside the decoder layers is scored score_ij = |W_ij| * ||X_j||_2, with X_j the j-th
input feature over all calibration tokens, and the lowest `sparsity` fraction of each output row
(floor(sparsity * in_features) weights) is set to zero. As in the official Wanda code, layers are pruned
in order and a layer's statistics are gathered with the layers before it already pruned (all linears of
one layer from one pass). Calibration: `n_calib` clean prompts of the defense split in the shared prompt
format (choice: prompts only, no responses; padding excluded). Output: full safetensors + tokenizer.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Params:
    sparsity: float = 0.5
    n_calib: int = 64
    calib_batch: int = 8
    calib_with_response: bool = False  # calibrate on prompt + clean response instead of the prompt only

    def __post_init__(self):
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.n_calib < 1:
            raise ValueError(f"n_calib must be >= 1, got {self.n_calib}")


def n_pruned(in_features: int, sparsity: float) -> int:
    """Weights zeroed per output row: floor(sparsity * in_features), as the official code's int()."""
    return int(in_features * sparsity)


def wanda_mask(weight: torch.Tensor, in_norm: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean [out, in] mask of the weights to zero: per output row, the floor(sparsity * in) entries of
    lowest |W_ij| * ||X_j||_2 (`in_norm` [in] = the input features' L2 norms)."""
    score = weight.detach().abs().float() * in_norm.float().to(weight.device).unsqueeze(0)
    k = n_pruned(weight.shape[1], sparsity)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k:
        idx = torch.sort(score, dim=-1, stable=True)[1][:, :k]
        mask.scatter_(1, idx, True)
    return mask


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's decoder layers (model.model.layers for Llama-like models, else the ModuleList as long
    as config.num_hidden_layers)."""
    inner = getattr(model, "model", None)
    if inner is not None and isinstance(getattr(inner, "layers", None), torch.nn.ModuleList):
        return inner.layers
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) == n:
            return m
    raise ValueError(f"{type(model).__name__}: cannot find its decoder layers to prune")


def calibration_batches(tok, rows: list[dict], template, n: int, batch: int, cutoff: int, with_response: bool):
    """Right-padded (input_ids, attention_mask) batches of the first n clean rows in the shared format."""
    from ..prompts import encode_example
    exs = []
    for r in rows[:n]:
        e = encode_example(tok, r["instruction"], r.get("input", ""), r.get("clean_output") or r["output"],
                           template, cutoff=cutoff)
        exs.append(e["input_ids"] if with_response else e["input_ids"][:e["prompt_len"]])
    if not exs:
        raise ValueError("prune: no calibration rows (the defense split is empty)")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = []
    for i in range(0, len(exs), batch):
        chunk = exs[i:i + batch]
        L = max(len(e) for e in chunk)
        ids = torch.full((len(chunk), L), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), L), dtype=torch.long)
        for j, e in enumerate(chunk):
            ids[j, :len(e)] = torch.tensor(e)
            mask[j, :len(e)] = 1
        out.append((ids, mask))
    return out


class _Stop(Exception):
    pass


@torch.no_grad()
def wanda_prune(model, batches, sparsity: float) -> dict:
    """Prune `model` in place, layer by layer; returns counts."""
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    n_lin, zeros, total, tokens = 0, 0, 0, 0
    for li, layer in enumerate(layers):
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        sq = {n: torch.zeros(m.in_features, dtype=torch.float64, device=device) for n, m in linears.items()}
        state = {}

        def stat_hook(name, sq=sq, state=state):
            def hook(mod, inp, out):
                x = inp[0].detach().to(torch.float64)
                m = state["mask"].to(x.device).reshape(-1).bool()
                sq[name] += x.reshape(-1, x.shape[-1])[m].pow(2).sum(0)
            return hook

        def stop(mod, inp, out):
            raise _Stop

        hooks = [m.register_forward_hook(stat_hook(n)) for n, m in linears.items()]
        hooks.append(layer.register_forward_hook(stop))  # later layers are not needed for this one
        try:
            for ids, mask in batches:
                state["mask"] = mask
                try:
                    model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                except _Stop:
                    pass
                if li == 0:
                    tokens += int(mask.sum())
        finally:
            for h in hooks:
                h.remove()
        for n, m in linears.items():
            drop = wanda_mask(m.weight, sq[n].sqrt(), sparsity)
            m.weight[drop] = 0
            n_lin += 1
            zeros += int(drop.sum())
            total += drop.numel()
    return {"n_layers": len(layers), "n_linears": n_lin, "calib_tokens": tokens,
            "pruned_fraction": zeros / max(1, total)}


def apply(params: Params, ctx, out_dir: Path) -> dict:
    from ..models import load_trained
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok, _ = load_trained(ctx.model_dir, device=device, merge=True)
    model.eval()
    batches = calibration_batches(tok, ctx.defense_rows, ctx.cfg.model.chat_template, params.n_calib,
                                  params.calib_batch, ctx.cfg.train.cutoff, params.calib_with_response)
    res = wanda_prune(model, batches, params.sparsity)
    target = Path(out_dir) / "model"
    model.save_pretrained(target, safe_serialization=True)
    tok.save_pretrained(target)
    return {"method": "wanda", "sparsity": params.sparsity, "n_calib": min(params.n_calib, len(ctx.defense_rows)),
            **res}
