"""`prune`: Wanda unstructured pruning of the merged backdoored model (METHODS.md §6; Sun et al. 2023).

Every linear layer inside the decoder layers is scored score_ij = |W_ij| * ||X_j||_2, with X_j the j-th
input feature over all calibration tokens, and the lowest `sparsity` fraction of each output row
(floor(sparsity * in_features) weights) is set to zero. As in the official Wanda code, layers are pruned
in order and a layer's statistics are gathered with the layers before it already pruned (all linears of
one layer from one pass); each layer runs on the cached, pruned outputs of the one before (2L layer
passes), or, for layers that do not chain, on a fresh pass of the model's prefix. Calibration: `n_calib`
clean prompts of the defense split in the shared prompt format (choice: prompts only, no responses;
padding excluded). Output: full safetensors + tokenizer.
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


def _linears(layer) -> dict:
    return {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


def _stat_hooks(linears: dict, sq: dict, state: dict) -> list:
    """Forward hooks adding each linear's squared input features over the real (non-pad) tokens to sq."""
    def hook_for(name):
        def hook(mod, inp, out):
            x = inp[0].detach().to(torch.float64)
            m = state["mask"].to(x.device).reshape(-1).bool()
            sq[name] += x.reshape(-1, x.shape[-1])[m].pow(2).sum(0)
        return hook
    return [m.register_forward_hook(hook_for(n)) for n, m in linears.items()]


def _prune_layer(linears: dict, sq: dict, sparsity: float) -> tuple[int, int]:
    zeros = total = 0
    for n, m in linears.items():
        drop = wanda_mask(m.weight, sq[n].sqrt(), sparsity)
        m.weight.masked_fill_(drop.to(m.weight.device), 0)
        zeros += int(drop.sum())
        total += drop.numel()
    return zeros, total


def _hidden(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _prefix(model, ids, mask, device):
    """One forward of the model, up to where a hook raises _Stop."""
    try:
        model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    except _Stop:
        pass


def _chain_inputs(model, layers, batches, device) -> list | None:
    """Each batch's (args, kwargs) into the first decoder layer, when the layers chain: layer i's output is
    layer i+1's input (a decoder layer that adds its own residual, as Hugging Face's do). Checked on the
    first batch against the input the model itself hands layer 1; None when they do not chain (then every
    layer's statistics come from a pass of the model's prefix)."""
    if len(layers) < 2:
        return None
    caught, into_1 = [], []

    def first(mod, args, kwargs):
        caught.append((args, kwargs))

    def second(mod, args, kwargs):
        into_1.append(args[0] if args else kwargs.get("hidden_states"))
        raise _Stop

    hooks = [layers[0].register_forward_pre_hook(first, with_kwargs=True),
             layers[1].register_forward_pre_hook(second, with_kwargs=True)]
    try:
        for ids, mask in batches:
            _prefix(model, ids, mask, device)
    finally:
        for h in hooks:
            h.remove()
    if len(caught) != len(batches) or not into_1 or into_1[0] is None:
        return None
    args, kwargs = caught[0]
    out = _hidden(layers[0](*args, **kwargs))
    return caught if torch.is_tensor(out) and out.shape == into_1[0].shape and torch.equal(out, into_1[0]) else None


@torch.no_grad()
def wanda_prune(model, batches, sparsity: float, chain: bool = True) -> dict:
    """Prune `model` in place, layer by layer; returns counts. When the decoder layers chain (see
    `_chain_inputs`; `chain=False` never assumes it), each layer runs once on the cached outputs of the
    pruned layer before it and once more pruned, as the official Wanda code does: 2L layer passes instead
    of L passes of a growing prefix. The statistics are the same either way."""
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    n_lin, zeros, total = 0, 0, 0
    tokens = int(sum(int(mask.sum()) for _, mask in batches))
    cached = _chain_inputs(model, layers, batches, device) if chain else None
    for layer in layers:
        linears = _linears(layer)
        sq = {n: torch.zeros(m.in_features, dtype=torch.float64, device=device) for n, m in linears.items()}
        state = {}
        hooks = _stat_hooks(linears, sq, state)
        if cached is None:
            hooks.append(layer.register_forward_hook(_raise_stop))  # later layers are not needed for this one
        try:
            for bi, (ids, mask) in enumerate(batches):
                state["mask"] = mask
                if cached is not None:
                    args, kwargs = cached[bi]
                    layer(*args, **kwargs)
                    continue
                _prefix(model, ids, mask, device)
        finally:
            for h in hooks:
                h.remove()
        z, t = _prune_layer(linears, sq, sparsity)
        n_lin, zeros, total = n_lin + len(linears), zeros + z, total + t
        if cached is not None:  # the next layer's inputs: this layer's outputs, pruned
            cached = [_with_hidden(args, kwargs, _hidden(layer(*args, **kwargs))) for args, kwargs in cached]
    return {"n_layers": len(layers), "n_linears": n_lin, "calib_tokens": tokens,
            "pruned_fraction": zeros / max(1, total), "chained": cached is not None}


def _with_hidden(args: tuple, kwargs: dict, h) -> tuple:
    """The same layer call with `h` as its hidden states (positional or the `hidden_states` keyword)."""
    return ((h,) + tuple(args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": h})


def _raise_stop(mod, inp, out):
    raise _Stop


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
