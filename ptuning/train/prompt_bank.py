"""The prompt bank: every prompt encoder a rank trains, held as stacks, and where each unit's encoder lives.

A pack's units whose encoders have the same shape (kind, pseudo tokens, hidden) share one stack
(ptuning/train/stack.py: the rows of one [K, P] tensor, one batched forward and backward, Adam per unit), so a
unit's floats do not depend on which others share its stack.

Under tensor parallelism a unit's encoder needs one home, because every rank of a group runs the same forward on
the same batch. Its OWNER holds its row, Adam state and best copy and writes its checkpoint; the other ranks hold
nothing of it. Each step the owners' prompt vectors (n_pseudo x hidden each, small) are summed into one table
across the group (one all-reduce; the others contribute zeros, so the sum is exact). On the way back every rank
already holds the same gradient for the vectors (the tensor-parallel layers all-reduce the gradient of their
inputs), so the owner back-propagates it into its rows and the others drop it.

    owner(i) = i mod tp_size      unit i of the replica's list; the encoders spread evenly over the group

At tensor_parallel 1, or with parallel.shard_prompts false, every rank holds every encoder (peers start from the
same weights and take the same steps) and the group's first rank writes.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ptuning.model.stacked import Layout
from ptuning.parallel.context import ParallelContext
from ptuning.train.stack import EncoderStack, Settings


class PromptBank:
    def __init__(self, parallel: ParallelContext, shard: bool, hidden: int, device: torch.device):
        self.parallel, self.hidden, self.device = parallel, hidden, device
        self.sharded = shard and parallel.tp_size > 1 and parallel.tp_group is not None
        self.stacks: list[EncoderStack] = []
        self.where: dict[str, tuple[EncoderStack, int]] = {}  # unit id -> its stack and row, on its owner

    # ---- homes ---------------------------------------------------------------------------------------------------
    def owner(self, index: int) -> int:
        """The tensor-parallel rank that writes unit `index`'s files (and, sharded, holds its encoder)."""
        return index % self.parallel.tp_size if self.sharded else 0

    def holds(self, index: int) -> bool:
        """Whether this rank keeps unit `index`'s encoder."""
        return not self.sharded or self.owner(index) == self.parallel.tp_rank

    def writes(self, index: int) -> bool:
        return self.owner(index) == self.parallel.tp_rank

    # ---- the units of a pack -------------------------------------------------------------------------------------
    def build(self, units: list[tuple[str, Layout, dict[str, torch.Tensor], Settings]]) -> None:
        """The bank now holds these encoders (unit id, layout, initial weights, settings: the units of a pack that
        this rank holds), one stack per shape; whatever it held before is released."""
        self.stacks, self.where = [], {}
        by_shape: dict[Layout, list] = {}  # Layout.of gives one object per shape
        for unit in units:
            by_shape.setdefault(unit[1], []).append(unit)
        for layout, members in by_shape.items():
            stack = EncoderStack(layout, [m[2] for m in members], [m[3] for m in members], self.device)
            self.stacks.append(stack)
            for i, (uid, *_) in enumerate(members):
                self.where[uid] = (stack, i)

    def has(self, uid: str) -> bool:
        return uid in self.where

    def stack_of(self, uid: str) -> EncoderStack:
        return self.where[uid][0]

    def drop(self, uid: str) -> None:
        """A unit leaves its stack; no other unit's floats change."""
        stack, index = self.where.pop(uid)
        stack.remove(index)
        for other, (s, i) in self.where.items():
            if s is stack and i > index:
                self.where[other] = (s, i - 1)
        if not len(stack):
            self.stacks.remove(stack)

    # ---- a step ----------------------------------------------------------------------------------------------------
    def vectors(self, uids: list[str], sizes: list[int], training: bool = False) -> list[torch.Tensor]:
        """Each listed unit's prompt vectors on every rank of the group; differentiable into the rows this rank
        holds. sizes[i]: unit i's pseudo-token count (for the units another rank holds)."""
        computed = {id(stack): stack(training) for stack in {id(self.where[u][0]): self.where[u][0]
                                                             for u in uids if u in self.where}.values()}
        # a rank that holds none of them must still run backward: the tensor-parallel layers' backward has
        # collectives its peers wait for, so the placeholders ask for a gradient too
        local = [computed[id(self.where[u][0])][self.where[u][1]] if u in self.where else
                 torch.zeros(n, self.hidden, device=self.device, requires_grad=torch.is_grad_enabled())
                 for u, n in zip(uids, sizes)]
        if not self.sharded or not local:
            return local
        table = torch.cat(local)
        full = table.detach().clone()
        dist.all_reduce(full, group=self.parallel.tp_group)
        # the value is the group's table; the gradient reaches only the vectors this rank computed
        table = full + (table - table.detach())
        return list(table.split(sizes))

    def step(self, uids: list[str], scales: dict[str, float] | None = None) -> None:
        """One Adam step for each listed unit this rank holds (scales: each unit's fp16 loss scale); then every
        stack's gradients are released."""
        by_stack: dict[int, list[int]] = {}
        for uid in uids:
            if uid in self.where:
                stack, index = self.where[uid]
                by_stack.setdefault(id(stack), []).append(index)
        for stack in self.stacks:
            rows = by_stack.get(id(stack), [])
            per_row = None
            if scales is not None:
                per_row = [1.0] * len(stack)
                for uid, (s, i) in self.where.items():
                    if s is stack and uid in scales:
                        per_row[i] = scales[uid]
            stack.step(rows, per_row)
        self.zero_grad()

    def overflow(self, uids: list[str]) -> torch.Tensor:
        """1.0 for each listed unit whose gradient overflowed on this rank (0 where another rank holds it)."""
        flags = {id(s): s.overflow() for s in self.stacks if s.rows.grad is not None}
        return torch.stack([flags[id(self.where[u][0])][self.where[u][1]] if u in self.where
                            and id(self.where[u][0]) in flags else torch.zeros((), device=self.device)
                            for u in uids]) if uids else torch.zeros(0, device=self.device)

    def zero_grad(self) -> None:
        for stack in self.stacks:
            stack.release_grad()

    def gradient(self, uid: str) -> torch.Tensor:
        """A unit's gradient since the last step, its row of the stack's (flat, PromptEncoder's numbers in the
        layout's order)."""
        stack, index = self.where[uid]
        return stack.rows.grad[index]

    # ---- one unit's state ------------------------------------------------------------------------------------------
    def weights(self, uid: str) -> dict[str, torch.Tensor]:
        stack, index = self.where[uid]
        return stack.weights(index)

    def load_weights(self, uid: str, state: dict[str, torch.Tensor]) -> None:
        stack, index = self.where[uid]
        stack.load_weights(index, state)

    def optimizer_state(self, uid: str) -> dict:
        stack, index = self.where[uid]
        return stack.optimizer_state(index)

    def load_optimizer_state(self, uid: str, state: dict) -> None:
        stack, index = self.where[uid]
        stack.load_optimizer_state(index, state)

    def generator_state(self, uid: str) -> torch.Tensor:
        stack, index = self.where[uid]
        return stack.generators[index].get_state()

    def load_generator_state(self, uid: str, state: torch.Tensor) -> None:
        stack, index = self.where[uid]
        stack.generators[index].set_state(state)

    def decay_lr(self, uid: str, gamma: float) -> None:
        """ExponentialLR, once per epoch of the unit."""
        stack, index = self.where[uid]
        stack.settings[index].lr *= gamma
