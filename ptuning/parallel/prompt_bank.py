"""The prompt bank: every prompt encoder a rank trains, held as stacks, and where each unit's encoder lives.

A pack's units whose encoders have the same shape (kind, pseudo tokens, hidden) share one `EncoderStack`: their
parameters are the rows of one [K, P] tensor, and one batched forward and backward (ptuning/model/encoder_stack.py)
serve them all. Adam runs per unit on its row (torch's own fused Adam, so its updates are torch.optim.Adam's with
L2 weight decay): each unit keeps its learning rate (its ExponentialLR), step count, weight decay, dropout
generator and, under fp16, loss scale, so a unit's floats do not depend on which others share its stack. A unit
that stops early leaves its stack: the rows after it move up in place, unchanged, and nothing is re-allocated.

Under tensor parallelism a unit's encoder needs one home, because every rank of a group runs the same forward on
the same batch. Its OWNER holds its row, Adam state and best copy and writes its checkpoint; the other ranks hold
nothing of it. Each step the owners' prompt vectors (n_pseudo x hidden each, small) are summed into one table
across the group (one all-reduce; the others contribute zeros, so the sum is exact). On the way back every rank
already holds the same gradient for the vectors (the tensor-parallel layers all-reduce the gradient of their
inputs), so the owner back-propagates it into its rows and the others drop it.

    owner(i) = i mod tp_size      unit i of the group's list; the encoders spread evenly over the group

At tensor_parallel 1, or with parallel.shard_prompts false, every rank holds every encoder (peers start from the
same weights and take the same steps) and the group's first rank writes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.optim.adam import adam

from ptuning.model.encoder_stack import Layout, vectors
from ptuning.model.encoders import PromptEncoder
from ptuning.parallel.context import ParallelContext

BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, as the paper's code used them


@dataclass
class Settings:
    """What one unit's encoder trains with (its variant's prompt.* and train.*)."""
    lr: float
    weight_decay: float
    dropout: float  # prompt.lstm_dropout
    seed: int  # the dropout generator's


class EncoderStack(torch.nn.Module):
    """The encoders of one shape on one rank: rows [K, P] (a parameter, so that the LM fine-tuning modes can hand it
    to their own optimizer), and per unit its Adam state and dropout generator."""

    def __init__(self, layout: Layout, initial: list[dict[str, torch.Tensor]], settings: list[Settings],
                 device: torch.device):
        super().__init__()
        self.layout = layout
        rows = torch.empty(len(initial), layout.size, device=device)
        for row, state in zip(rows, initial):
            layout.pack(state, row)
        self.rows = torch.nn.Parameter(rows)
        self.settings = list(settings)
        self.steps = [torch.zeros((), device=device) for _ in settings]
        self.moments: tuple[torch.Tensor, torch.Tensor] | None = None  # Adam's exp_avg, exp_avg_sq: made at step 1
        # the backward writes the gradient here, step after step: on a CPU a fresh [K, P] tensor costs page faults
        self.grad_buffer: torch.Tensor | None = None
        # on the CPU, whatever the device: a generator's state then means the same on a GPU and a CPU, so a unit
        # resumes on either (the masks are small: drawn here, moved once a step)
        self.generators = [torch.Generator().manual_seed(s.seed) for s in settings]

    def __len__(self) -> int:
        return self.rows.shape[0]

    def forward(self, training: bool) -> torch.Tensor:
        """Every unit's prompt vectors, [K, n_pseudo, hidden]; dropout only in training, from each unit's own
        generator."""
        mask = None
        if training and self.layout.kind == "lstm" and any(s.dropout > 0 for s in self.settings):
            shape = (self.layout.n_pseudo, self.layout.hidden)
            mask = torch.stack([(torch.rand(shape, generator=g) >= s.dropout).float() / (1 - s.dropout)
                                if s.dropout > 0 else torch.ones(shape) for s, g in zip(self.settings, self.generators)])
            mask = mask.to(self.rows.device, self.rows.dtype)
        grads = None
        if training and torch.is_grad_enabled() and self.rows.grad is None:
            # the backward writes into the last step's gradient tensor; handed over, not shared, so that autograd
            # takes it as the gradient rather than copying it (an optimizer that zeroes in place rather than
            # releasing gets a fresh tensor each time)
            grads, self.grad_buffer = self.grad_buffer, None
            if grads is None or grads.shape != self.rows.shape:
                grads = torch.empty_like(self.rows.detach())
        return vectors(self.rows, self.layout, mask, grads)

    def release_grad(self) -> None:
        """The step is over: its gradient tensor is kept for the next backward to write into."""
        self.grad_buffer, self.rows.grad = self.rows.grad, None

    @torch.no_grad()
    def step(self, rows: list[int], scales: list[float] | None = None) -> None:
        """One Adam step for the given rows (scales: each row's loss scale, by which its gradient is divided)."""
        grad = self.rows.grad
        if grad is None or not rows:
            return
        if self.moments is None:
            self.moments = (torch.zeros_like(self.rows), torch.zeros_like(self.rows))
        exp_avg, exp_avg_sq = self.moments
        fused = self.rows.device.type in ("cpu", "cuda")
        # fp16: every row's scale in one device tensor, one copy a step (a scalar per call would be a sync each)
        on_device = None if scales is None else torch.tensor(scales).to(grad.device, non_blocking=True)
        calls: dict[tuple, list[int]] = {}  # rows with the same lr, weight decay and scale: one fused kernel
        for i in rows:
            s = self.settings[i]
            calls.setdefault((s.lr, s.weight_decay, scales[i] if scales else None), []).append(i)
        for (lr, weight_decay, scale), group in calls.items():
            adam([self.rows.data[i] for i in group], [grad[i] for i in group], [exp_avg[i] for i in group],
                 [exp_avg_sq[i] for i in group], [], [self.steps[i] for i in group], fused=fused,
                 grad_scale=None if on_device is None else on_device[group[0]],
                 amsgrad=False, beta1=BETAS[0], beta2=BETAS[1], lr=lr, weight_decay=weight_decay, eps=EPS,
                 maximize=False)

    def overflow(self) -> torch.Tensor:
        """Per row, 1.0 where its gradient holds an inf or a NaN (fp16 loss scaling)."""
        return (~torch.isfinite(self.rows.grad)).any(dim=1).float()

    @torch.no_grad()
    def remove(self, index: int) -> None:
        """Row `index` leaves: the later rows move up one, in place (their values unchanged)."""
        tensors = [self.rows.data] + (list(self.moments) if self.moments is not None else [])
        for tensor in tensors:
            for i in range(index, len(self) - 1):
                tensor[i].copy_(tensor[i + 1])
        keep = len(self) - 1
        # a new parameter over the same storage: autograd's accumulator of the old one keeps its shape
        self.rows = torch.nn.Parameter(self.rows.data[:keep])
        self.grad_buffer = None
        if self.moments is not None:
            self.moments = tuple(m[:keep] for m in self.moments)
        for per_row in (self.settings, self.steps, self.generators):
            del per_row[index]

    # ---- one unit's slice: checkpoints, best copies, prompt files ------------------------------------------------
    def weights(self, index: int) -> dict[str, torch.Tensor]:
        """The row's encoder as PromptEncoder's state dict, copied to host memory (a tensor each)."""
        return self._host(self.rows.detach()[index])

    def _host(self, row: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: t.to("cpu", copy=True) for name, t in self.layout.unpack(row).items()}

    @torch.no_grad()
    def load_weights(self, index: int, state: dict[str, torch.Tensor]) -> None:
        self.layout.pack(state, self.rows.data[index])

    def optimizer_state(self, index: int) -> dict:
        state = {"step": float(self.steps[index]), "lr": self.settings[index].lr}
        if self.moments is not None:
            state["exp_avg"] = self._host(self.moments[0][index])
            state["exp_avg_sq"] = self._host(self.moments[1][index])
        return state

    @torch.no_grad()
    def load_optimizer_state(self, index: int, state: dict) -> None:
        state = _from_torch_adam(state, self.layout)
        self.steps[index].fill_(state["step"])
        self.settings[index].lr = state["lr"]
        if "exp_avg" in state:
            if self.moments is None:
                self.moments = (torch.zeros_like(self.rows), torch.zeros_like(self.rows))
            self.layout.pack(state["exp_avg"], self.moments[0][index])
            self.layout.pack(state["exp_avg_sq"], self.moments[1][index])


def _from_torch_adam(state: dict, layout: Layout) -> dict:
    """A checkpoint written before the bank held torch.optim.Adam's state_dict of one PromptEncoder: its tensors are
    numbered in the module's parameter order."""
    if "param_groups" not in state:
        return state
    with torch.device("meta"):
        names = [n for n, _ in PromptEncoder(layout.n_pseudo, layout.hidden, layout.kind).named_parameters()]
    per = state["state"]
    out = {"lr": state["param_groups"][0]["lr"], "step": float(per[0]["step"]) if per else 0.0}
    if per:
        out["exp_avg"] = {names[i]: s["exp_avg"] for i, s in per.items()}
        out["exp_avg_sq"] = {names[i]: s["exp_avg_sq"] for i, s in per.items()}
    return out


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
