"""Batched greedy generation (left padding, KV cache, length bucketing) and response perplexity.

Prompts are token ids made by `pipeline.prompts.encode_example`, the function training uses, so the model
sees exactly the training format. Generation always sorts prompts by length (batches of similar length waste
little padding) and restores the order; with `static_cache_compile` (on CUDA) it also uses a static KV cache of
one size for the whole run, so `generate` compiles the decode step once (torch.compile, CUDA graphs), and pads
the last batch to the full batch size so no shape changes.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .models import accepts_logits_to_keep, autocast_reuses_casts
from .prompts import encode_example
from .train.packing import scored_positions

NO_CUTOFF = 1 << 30


def prompt_ids(tok, instruction: str, input: str | None, template: str | None, prefix: str = "") -> list[int]:
    """Token ids of the prompt exactly as training builds them (BOS included where training adds one)."""
    enc = encode_example(tok, instruction, input, "", template=template, cutoff=NO_CUTOFF, prefix=prefix)
    return enc["input_ids"][:enc["prompt_len"]]


def left_pad(batch: list[list[int]], pad_id: int, device) -> dict:
    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, x in enumerate(batch):
        if x:
            ids[i, width - len(x):] = torch.tensor(x, dtype=torch.long)
            mask[i, width - len(x):] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _trim(seq: list[int], eos_ids: set, pad_id: int | None) -> list[int]:
    for j, t in enumerate(seq):
        if t in eos_ids:
            seq = seq[:j]
            break
    while seq and seq[-1] == pad_id:
        seq = seq[:-1]
    return seq


def eos_set(model, tok) -> set:
    eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
    eos = eos if isinstance(eos, list) else [eos]
    return {e for e in eos + [tok.eos_token_id] if e is not None}


@torch.no_grad()
def generate_ids(model, prompts: list[list[int]], pad_id: int, max_new_tokens: int, batch_size: int,
                 eos_ids: set | None = None, static_cache_compile: bool = False, desc: str = "generate",
                 progress: bool = True, **gen_kwargs) -> list[list[int]]:
    """Greedy continuations (new token ids, cut at the first EOS) of `prompts`, in the order given
    (`gen_kwargs` may ask for sampling instead: do_sample, temperature, top_p)."""
    if not prompts:
        return []
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # longest first: memory errors come early
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, use_cache=True, pad_token_id=pad_id)
    kw.update(gen_kwargs)  # a protocol's sampling settings
    if static_cache_compile:
        kw.update(cache_implementation="static", max_cache_len=len(prompts[order[0]]) + max_new_tokens)
    out: list = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False)
    with autocast_reuses_casts(model):
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            batch = [prompts[i] for i in idx]
            if static_cache_compile and len(batch) < batch_size:  # one batch shape for the compiled step
                batch = batch + [batch[-1]] * (batch_size - len(batch))
            enc = left_pad(batch, pad_id, device)
            gen = model.generate(**enc, **kw)[:, enc["input_ids"].shape[1]:].tolist()
            for i, seq in zip(idx, gen):
                out[i] = _trim(seq, eos_ids or set(), pad_id)
            bar.update(len(idx))
    bar.close()
    return out


def generate_texts(model, tok, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
                   static_cache_compile: bool = False, desc: str = "generate", progress: bool = True,
                   **gen_kwargs) -> list[str]:
    ids = generate_ids(model, prompts, tok.pad_token_id, max_new_tokens, batch_size, eos_set(model, tok),
                       static_cache_compile, desc, progress, **gen_kwargs)
    return [tok.decode(x, skip_special_tokens=True) for x in ids]


@torch.no_grad()
def response_nll(model, tok, rows: list[dict], template: str | None, prefix: str = "", cutoff: int = 1024,
                 batch_size: int = 8, progress: bool = True) -> tuple[float, int]:
    """Summed negative log-likelihood and token count of the reference responses (`clean_output`, else
    `output`, + EOS) given their prompts: the held-out perplexity of a generation task is exp(sum / count)."""
    model.eval()
    device = next(model.parameters()).device
    encs = [encode_example(tok, r["instruction"], r.get("input"), r.get("clean_output") or r.get("output") or "",
                           template=template, cutoff=cutoff, prefix=prefix) for r in rows]
    keep = accepts_logits_to_keep(model)
    encs = sorted((e for e in encs if any(lab != -100 for lab in e["labels"][1:])), key=lambda e: -len(e["input_ids"]))
    nll, count = 0.0, 0
    with autocast_reuses_casts(model):
        for s in tqdm(range(0, len(encs), batch_size), desc="perplexity", disable=not progress, leave=False):
            batch = encs[s:s + batch_size]
            width = max(len(e["input_ids"]) for e in batch)
            ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, e in enumerate(batch):
                n = len(e["input_ids"])
                ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
            pos = scored_positions(labels) if keep else None  # the LM head on the response tokens alone
            kw = {"logits_to_keep": pos.to(device)} if pos is not None else {}
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **kw).logits.float()
            tgt = (labels[:, 1:] if pos is None else labels[:, pos + 1]).to(device)
            logits = logits[:, :-1] if pos is None else logits
            loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=-100, reduction="sum")
            nll += loss.item()
            count += int((tgt != -100).sum())
    return nll, count
