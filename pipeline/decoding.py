"""Decoding-time defenses, below the stages: CleanGen (Li et al. 2024, arXiv 2406.12257) batched with KV caches,
and the summary of what it did. Evaluate runs it with the parameters of a defended model's manifest entry
`decoding` (pipeline/defend/base.py); the `sampling` baseline is `generation.generate_ids` with do_sample.

CleanGen as its official code does it (uw-nsl/CleanGen cleangen.py, `CleanGen.decode`; configs/defense/cleangen.yaml
cites the lines): the suspect model drafts tokens greedily, keeping each one's probability; after k drafts the
reference model scores those k positions in one forward pass; the first draft whose score p_suspect / p_reference
>= alpha is replaced by the reference's most probable token at that position, the drafts after it are dropped,
and drafting resumes after the replacement. A generation ends when the suspect drafts EOS, when a replacement is
EOS, or when max_new_tokens tokens are out; the last, partial block is then left unchecked, as in the code
(`verify_tail` checks it, and drafting goes on if a token of it is replaced).

Batching: every row of a batch drafts in lock step (the code resets its draft count at every check, replaced or
not), so all rows are checked at the same steps. Each model keeps one KV cache for the batch; a row's dropped
drafts stay in it as masked slots (attention mask 0) and each row's tokens get its own positions, so a row
attends to exactly its own sequence, as the code's one-prompt, no-cache loop does.
"""
from __future__ import annotations

import inspect

import torch
from tqdm.auto import tqdm


class _Cached:
    """One model's KV cache over a batch whose rows grow and shrink independently (see the module doc)."""

    def __init__(self, model, n: int, pad_id: int):
        from transformers import DynamicCache

        self.model, self.pad_id, self.cache = model, pad_id, DynamicCache()
        self.device = next(model.parameters()).device
        # transformers >= 5.24 names the argument `cache` (and deprecates `past_key_values`)
        params = inspect.signature(model.forward).parameters
        self.arg = "cache" if "cache" in params else "past_key_values"
        self.keep_arg = "logits_to_keep" in params  # the LM head on the last positions only
        self.mask = torch.zeros((n, 0), dtype=torch.long, device=self.device)
        self.slots: list[list[int]] = [[] for _ in range(n)]  # the cache slot of each of a row's tokens, in order
        self.passes = [0] * n  # forward passes that carried tokens of the row

    def feed(self, chunks: list[list[int]], keep: int) -> torch.Tensor:
        """Run the model on each row's next tokens (a row with none gets masked padding): float logits of the last
        `keep` positions [n, keep, V], each row's tokens right-aligned."""
        n, width, base = len(chunks), max(map(len, chunks)), self.mask.shape[1]
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        pos = torch.zeros((n, width), dtype=torch.long)
        for b, c in enumerate(chunks):
            if c:
                off, first = width - len(c), len(self.slots[b])
                ids[b, off:], mask[b, off:] = torch.tensor(c), 1
                pos[b, off:] = torch.arange(first, first + len(c))
                self.slots[b] += range(base + off, base + width)
                self.passes[b] += 1
        self.mask = torch.cat([self.mask, mask.to(self.device)], 1)
        out = self.model(input_ids=ids.to(self.device), attention_mask=self.mask, position_ids=pos.to(self.device),
                         use_cache=True, **{self.arg: self.cache}, **({"logits_to_keep": keep} if self.keep_arg else {}))
        return out.logits[:, -keep:].float()

    def keep(self, b: int, n: int):
        """Keep row b's first n tokens; the slots of the rest are masked out for good."""
        self.mask[b, self.slots[b][n:]] = 0
        del self.slots[b][n:]


@torch.no_grad()
def _cleangen_batch(suspect, reference, prompts, pad_id, max_new, eos, k, alpha, max_drafts, verify_tail):
    n = len(prompts)
    S, R = _Cached(suspect, n, pad_id), _Cached(reference, n, pad_id)
    seqs, start = [list(p) for p in prompts], [len(p) for p in prompts]
    p_draft = [[] for _ in range(n)]  # the suspect's probability of each unchecked draft
    state = ["draft"] * n  # draft | tail (ended, its last drafts unchecked: verify_tail) | done
    replaced, first = [0] * n, [None] * n
    for _ in range(max_drafts):  # the code's `for i in range(self.m)`: one draft per step
        check = [b for b in range(n) if state[b] == "tail" or (state[b] == "draft" and len(p_draft[b]) == k)]
        if check:  # the reference scores every unchecked draft in one pass (it sees all but the last token)
            logits = R.feed([seqs[b][len(R.slots[b]):-1] if b in check else [] for b in range(n)], k)
            for b in check:
                d, L = len(p_draft[b]), len(seqs[b])
                probs = torch.softmax(logits[b, -d:], -1)  # row j predicts draft j
                drafts = torch.tensor(seqs[b][L - d:], device=probs.device)
                score = torch.stack(p_draft[b]) / probs[torch.arange(d, device=probs.device), drafts]
                hits = (score >= alpha).nonzero()
                p_draft[b] = []
                if len(hits):
                    g = int(hits[0])
                    at, tok = L - d + g, int(probs[g].argmax())
                    seqs[b] = seqs[b][:at] + [tok]
                    S.keep(b, at)
                    R.keep(b, at)
                    replaced[b] += 1
                    first[b] = at - start[b] if first[b] is None else first[b]
                    state[b] = "done" if tok in eos or len(seqs[b]) - start[b] >= max_new else "draft"
                elif state[b] == "tail":
                    state[b] = "done"
        if "draft" not in state:
            break
        logits = S.feed([seqs[b][len(S.slots[b]):] if state[b] == "draft" else [] for b in range(n)], 1)[:, -1]
        p, tok = torch.softmax(logits, -1).max(-1)  # greedy draft and its probability
        for b in (b for b in range(n) if state[b] == "draft"):
            seqs[b].append(int(tok[b]))
            p_draft[b].append(p[b])
            if seqs[b][-1] in eos or len(seqs[b]) - start[b] >= max_new:
                state[b] = "tail" if verify_tail else "done"
    out = []
    for b in range(n):
        new = seqs[b][start[b]:]
        ids = next((new[:j] for j, t in enumerate(new) if t in eos), new)
        out.append((ids, {"replaced": replaced[b], "first": first[b], "tokens": len(new),
                          "suspect_passes": S.passes[b], "reference_passes": R.passes[b]}))
    return out


def cleangen_ids(suspect, reference, prompts: list[list[int]], pad_id: int, max_new_tokens: int, batch_size: int,
                 eos_ids: set, k: int = 4, alpha: float = 20.0, max_drafts: int = 2048, verify_tail: bool = False,
                 desc: str = "cleangen", progress: bool = True) -> tuple[list[list[int]], list[dict]]:
    """CleanGen continuations of `prompts` (new token ids, cut at EOS) in the order given, and per answer its
    statistics: `replaced` (tokens replaced), `first` (answer index of the first replaced token, None if none),
    `tokens` (tokens emitted, EOS included), `suspect_passes` and `reference_passes` (forward passes)."""
    suspect.eval()
    reference.eval()
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # batches of similar length
    out: list = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        res = _cleangen_batch(suspect, reference, [prompts[i] for i in idx], pad_id, max_new_tokens, set(eos_ids),
                              k, alpha, max_drafts, verify_tail)
        for i, r in zip(idx, res):
            out[i] = r
        bar.update(len(idx))
    bar.close()
    return [o[0] for o in out], [o[1] for o in out]


def summary(stats: list[dict]) -> dict:
    """What CleanGen did over answers' statistics (`cleangen_ids`): replaced tokens per answer, the fraction of
    answers with a replacement, the mean answer index of the first replacement (0 = the first answer token), the
    code's ratio (replacements / tokens, averaged over answers), and forward passes per emitted token (plain greedy
    decoding: 1)."""
    n, tokens = len(stats), sum(s["tokens"] for s in stats)
    firsts = [s["first"] for s in stats if s["first"] is not None]
    sp, rp = sum(s["suspect_passes"] for s in stats), sum(s["reference_passes"] for s in stats)
    return {"answers": n, "new_tokens": tokens,
            "replaced_per_answer": sum(s["replaced"] for s in stats) / n if n else None,
            "answers_replaced": len(firsts) / n if n else None,
            "first_replacement_mean": sum(firsts) / len(firsts) if firsts else None,
            "replacement_ratio": sum(s["replaced"] / max(1, s["tokens"]) for s in stats) / n if n else None,
            "forward_passes_per_token": (sp + rp) / tokens if tokens else None,
            "suspect_passes_per_token": sp / tokens if tokens else None,
            "reference_passes_per_token": rp / tokens if tokens else None}
