"""Ranking metrics with the answer restricted to an allowed vocabulary, computed without sorting the vocabulary."""
from __future__ import annotations

import torch
import torch.distributed as dist

TOP = 10  # the answers a prediction file keeps per fact


def restricted_ranks(logits: torch.Tensor, labels: torch.Tensor, allowed: torch.Tensor,
                     shard=None) -> torch.Tensor:
    """1-based rank of each label among the allowed ids. Ties break by id, as argmax does, so rank 1 is exactly
    `argmax(logits masked to allowed) == label`.

    With a vocab shard (tensor parallelism) the logits are this rank's slice of the vocabulary: the gold logit
    and the count of ids ahead of it are summed across the group, so nothing is gathered and every rank gets
    the same ranks as the full logits would give."""
    logits = logits.float()
    start = 0 if shard is None else shard.start
    local_allowed = allowed[start:start + logits.shape[1]]
    local_labels = labels - start
    owned = (local_labels >= 0) & (local_labels < logits.shape[1])
    gold = logits.gather(1, local_labels.clamp(0, logits.shape[1] - 1)[:, None]).squeeze(1)
    gold = torch.where(owned, gold, torch.zeros_like(gold))
    if shard is not None:
        dist.all_reduce(gold, group=shard.group)
    masked = logits.masked_fill(~local_allowed, float("-inf"))
    ids = torch.arange(start, start + logits.shape[1], device=logits.device)
    ahead = (masked > gold[:, None]) | ((masked == gold[:, None]) & (ids[None, :] < labels[:, None]))
    count = ahead.sum(dim=1)
    if shard is not None:
        dist.all_reduce(count, group=shard.group)
    return count + 1


def restricted_top(logits: torch.Tensor, allowed: torch.Tensor, k: int, shard=None) -> torch.Tensor:
    """The k best allowed ids of each row, best first, ties by id as in restricted_ranks (so the first is the
    label exactly where its rank is 1). With a vocab shard each rank's k best are gathered across the group."""
    logits = logits.float()
    start = 0 if shard is None else shard.start
    local = allowed[start:start + logits.shape[1]].nonzero().squeeze(1)
    # a stable sort keeps equal logits in id order
    values, order = logits[:, local].sort(dim=1, descending=True, stable=True)
    values, ids = values[:, :k], local[order[:, :k]] + start
    if values.shape[1] < k:  # fewer allowed ids than k on this shard: pad, so every rank gathers one shape
        fill = k - values.shape[1]
        values = torch.cat([values, values.new_full((len(values), fill), float("-inf"))], dim=1)
        ids = torch.cat([ids, ids.new_full((len(ids), fill), -1)], dim=1)
    if shard is not None:
        values = _gather(values, shard.group)
        ids = _gather(ids, shard.group)
        by_id = ids.argsort(dim=1, stable=True)  # then by logit, stably: the order is (logit desc, id asc)
        values, ids = values.gather(1, by_id), ids.gather(1, by_id)
        best = values.argsort(dim=1, descending=True, stable=True)[:, :k]
        ids = ids.gather(1, best)
    return ids


def _gather(t: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, shard=None) -> torch.Tensor:
    """Per-row cross-entropy over the whole vocabulary; vocab-parallel (megatron-core's) with a shard."""
    if shard is None:
        return torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return vocab_parallel_cross_entropy(logits, labels)


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


def figures(ranks: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """The figures a record keeps of a set of ranks: {prefix}p@1, {prefix}p@10, {prefix}mrr."""
    summary = summarize_ranks(ranks)
    return {f"{prefix}{key}": summary[key] for key in ("p@1", "p@10", "mrr")}
