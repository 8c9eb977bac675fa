"""One stack: the prompt encoders of one shape (kind, pseudo tokens, hidden) that one rank holds, as the rows of one
[K, P] tensor (ptuning/model/stacked.py computes them all at once), with each unit's own Adam state, learning rate,
step count, weight decay, dropout generator and, under fp16, loss scale.

Adam runs per unit on its row: torch's fused Adam, so its updates are torch.optim.Adam's with L2 weight decay
(rows that share lr, weight decay and scale share one kernel call). A unit that stops early leaves its stack:
the rows after it move up in place, unchanged, and nothing is re-allocated. A unit's slice (its weights, Adam
state and generator, in PromptEncoder's names, on the host) is what its checkpoint, best copy and prompt files
hold, and loads into any row of any stack.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.optim.adam import adam

from ptuning.model.encoders import PromptEncoder
from ptuning.model.stacked import Layout, vectors

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
