"""Rank-aware prompt encoders: which rank of a tensor-parallel group holds each relation's prompt encoder.

Every rank of a tensor-parallel group runs the same forward on the same batch, so a relation's encoder needs one
home. Its OWNER holds the encoder, its optimizer, its best copy and writes its checkpoint; the other ranks hold
nothing of it. Each step the owners' prompt vectors (n_pseudo x hidden each, small) are summed into one table
across the group (one all-reduce; the other ranks contribute zeros, so the sum is exact). On the way back every
rank of the group already holds the same gradient for the vectors (the tensor-parallel layers all-reduce the
gradient of their inputs), so the owner back-propagates it into its encoder and the others drop it.

    owner(i) = i mod tp_size      relation i of the trained list; the encoders spread evenly over the group

At tensor_parallel 1, or with parallel.shard_prompts false, every rank holds every encoder (the replicated
layout: peers start from the same weights and take the same steps) and the group's first rank writes.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ptuning.parallel import ParallelContext


class PromptBank:
    def __init__(self, parallel: ParallelContext, shard: bool, hidden: int, device: torch.device):
        self.parallel, self.hidden, self.device = parallel, hidden, device
        self.sharded = shard and parallel.tp_size > 1 and parallel.tp_group is not None

    def owner(self, index: int) -> int:
        """The tensor-parallel rank that writes relation `index`'s files (and, sharded, holds its encoder)."""
        return index % self.parallel.tp_size if self.sharded else 0

    def holds(self, index: int) -> bool:
        """Whether this rank keeps relation `index`'s encoder."""
        return not self.sharded or self.owner(index) == self.parallel.tp_rank

    def writes(self, index: int) -> bool:
        return self.owner(index) == self.parallel.tp_rank

    def vectors(self, encoders: list[torch.nn.Module | None], sizes: list[int]) -> list[torch.Tensor]:
        """Every relation's prompt vectors on every rank of the group; differentiable into the encoders this rank
        holds. encoders[i] is None where this rank does not hold relation i (sizes[i]: its pseudo-token count)."""
        # a rank that holds none of them must still run backward: the tensor-parallel layers' backward has
        # collectives its peers wait for, so the placeholders ask for a gradient too
        local = [enc() if enc is not None else
                 torch.zeros(n, self.hidden, device=self.device, requires_grad=torch.is_grad_enabled())
                 for enc, n in zip(encoders, sizes)]
        if not self.sharded or not local:
            return local
        table = torch.cat(local)
        full = table.detach().clone()
        dist.all_reduce(full, group=self.parallel.tp_group)
        # the value is the group's table; the gradient reaches only the vectors this rank computed
        table = full + (table - table.detach())
        return list(table.split(sizes))
