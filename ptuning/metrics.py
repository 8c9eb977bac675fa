"""Ranking metrics with the answer restricted to an allowed vocabulary, computed without sorting the vocabulary."""
from __future__ import annotations

import torch


def restricted_ranks(logits: torch.Tensor, labels: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """1-based rank of each label among the allowed ids. Ties break by id, as argmax does, so rank 1 is exactly
    `argmax(logits masked to allowed) == label`."""
    logits = logits.float()
    masked = logits.masked_fill(~allowed, float("-inf"))
    gold = logits.gather(1, labels[:, None])
    ids = torch.arange(logits.shape[1], device=logits.device)
    ahead = (masked > gold) | ((masked == gold) & (ids[None, :] < labels[:, None]))
    return ahead.sum(dim=1) + 1


def summarize_ranks(ranks: torch.Tensor) -> dict[str, float]:
    """P@1, P@10 and MRR of a set of ranks (empty -> zeros)."""
    if ranks.numel() == 0:
        return {"p@1": 0.0, "p@10": 0.0, "mrr": 0.0, "n": 0}
    ranks = ranks.float()
    return {
        "p@1": float((ranks == 1).float().mean()),
        "p@10": float((ranks <= 10).float().mean()),
        "mrr": float((1.0 / ranks).mean()),
        "n": int(ranks.numel()),
    }
