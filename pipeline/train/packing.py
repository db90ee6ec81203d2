"""Batching: padded batches, or packed rows with attention confined to each sample.

A packed row concatenates several samples; `position_ids` restart at 0 for every sample, and the model
gets no attention mask, so transformers builds a block-diagonal causal mask from the position resets
(no token attends across samples). `sample_ids` (-1 = padding) lets the loss average per sample.
"""
from __future__ import annotations

import torch


def pad_batch(examples: list[dict], pad_id: int) -> dict:
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    sample_ids = torch.full((len(examples), n), -1, dtype=torch.long)
    for i, e in enumerate(examples):  # right padding for training
        k = len(e["input_ids"])
        ids[i, :k] = torch.tensor(e["input_ids"])
        labels[i, :k] = torch.tensor(e["labels"])
        mask[i, :k] = 1
        sample_ids[i, :k] = i
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": pos,
            "sample_ids": sample_ids}


def pack_examples(examples: list[dict], max_len: int, pad_id: int) -> dict:
    """Greedy first-fit packing of `examples` into rows of at most `max_len` tokens."""
    rows: list[list[dict]] = []
    lens: list[int] = []
    for e in sorted(examples, key=lambda e: -len(e["input_ids"])):
        k = len(e["input_ids"])
        for r, used in enumerate(lens):
            if used + k <= max_len:
                rows[r].append(e)
                lens[r] += k
                break
        else:
            rows.append([e])
            lens.append(k)
    n = max(lens)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), -100, dtype=torch.long)
    pos = torch.zeros((len(rows), n), dtype=torch.long)
    sample_ids = torch.full((len(rows), n), -1, dtype=torch.long)
    sid = 0
    for r, row in enumerate(rows):
        o = 0
        for e in row:
            k = len(e["input_ids"])
            ids[r, o:o + k] = torch.tensor(e["input_ids"])
            labels[r, o:o + k] = torch.tensor(e["labels"])
            pos[r, o:o + k] = torch.arange(k)
            sample_ids[r, o:o + k] = sid
            sid += 1
            o += k
        if o < n:  # padding tail: its own "sample" of positions, labels ignored
            pos[r, o:] = torch.arange(n - o)
    return {"input_ids": ids, "labels": labels, "attention_mask": None, "position_ids": pos,
            "sample_ids": sample_ids}


def scored_positions(labels: torch.Tensor) -> torch.Tensor | None:
    """The positions t whose logits are scored (some row's label t+1 is not -100), over the whole batch; None
    when that is every position or none. Pass them as `logits_to_keep` and to `lm_loss(positions=...)`: the
    LM head then runs on the response tokens alone (here about a third of the positions) and each scored
    token's loss is the one the full logits give (tests/test_trainer.py)."""
    t = (labels[:, 1:] != -100).any(0).nonzero().squeeze(-1)
    return None if len(t) in (0, labels.shape[1] - 1) else t


def token_losses(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token cross-entropy of next-token prediction, 0 where the label is -100; shape [B, T-1], or
    [B, len(positions)] when `logits` holds only the positions' logits."""
    logits = (logits[:, :-1] if positions is None else logits).float()
    target = labels[:, 1:] if positions is None else labels[:, positions + 1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                             ignore_index=-100, reduction="none")
    return loss.view(target.shape)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, sample_ids: torch.Tensor, average: str = "token",
            per_sample: bool = False, positions: torch.Tensor | None = None):
    """Response-token LM loss averaged per token, or per sample then over samples. `positions`: `logits` are
    only those positions' (`scored_positions`, computed with `logits_to_keep`).

    With `per_sample=True` also returns {sample_id: mean loss} (used by the packing test)."""
    tl = token_losses(logits, labels, positions)
    nxt = slice(1, None) if positions is None else positions + 1
    valid = labels[:, nxt] != -100
    sids = sample_ids[:, nxt]
    ids = sids[valid]
    losses = tl[valid]
    uniq, inv = torch.unique(ids, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=losses.dtype, device=losses.device).index_add_(0, inv, losses)
    counts = torch.zeros(len(uniq), dtype=losses.dtype, device=losses.device).index_add_(0, inv, torch.ones_like(losses))
    if average == "sample":
        loss = (sums / counts.clamp(min=1)).mean() if len(uniq) else tl.sum() * 0
    else:
        loss = losses.sum() / valid.sum().clamp(min=1)
    if per_sample:
        return loss, {int(u): float(s / c) for u, s, c in zip(uniq, sums, counts)}
    return loss
