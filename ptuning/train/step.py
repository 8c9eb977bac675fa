"""One training step of a pack: every unit's next micro-batch through the LM together, one backward, then each
unit's optimizer step: the prompt bank's Adam per unit, or, when the LM trains too, the unit's LMTuning
optimizer (or DeepSpeed engine). Under fp16 each unit's loss carries its own scale and an overflow skips only
that unit's step (ptuning/train/precision.py). ExponentialLR's decay, once per epoch of a unit, is here too."""
from __future__ import annotations

import torch

from ptuning.train.prompt_bank import PromptBank
from ptuning.train.finetune import LMTuning
from ptuning.train.packed import PackedLM
from ptuning.train.precision import LossScaler
from ptuning.train.unit_run import UnitRun


class Step:
    def __init__(self, forward: PackedLM, bank: PromptBank, scaler: LossScaler | None, lm: LMTuning | None,
                 cfg):
        self.forward, self.bank, self.scaler, self.lm, self.cfg = forward, bank, scaler, lm, cfg

    def loss(self, runs: list[UnitRun], scales: dict[str, float] | None = None) -> torch.Tensor:
        """The next micro-batch of every unit, packed: the sum over units of each one's mean row loss (times its
        fp16 loss scale)."""
        vectors = self.forward.vectors(runs, training=True)
        rows = [r.next_batch(self.cfg.train.batch_size) for r in runs]
        return self.forward.loss(vectors, rows, [scales[r.unit.id] if scales else 1.0 for r in runs])

    def __call__(self, runs: list[UnitRun]) -> None:
        if self.cfg.protocol.lm_dropout and self.lm is None:  # the reference's model.train(): the LM's dropout
            self.forward.backbone.dropout(True)
        if runs[0].engine is not None:  # DeepSpeed: one unit at a time (LM fine-tuning), its own fp16 scaling
            self.lm.step(runs[0].engine, self.loss(runs))
            return
        uids = [r.unit.id for r in runs]
        scales = {u: self.scaler.scale(u) for u in uids} if self.scaler is not None else None
        self.loss(runs, scales).backward()
        stepping = uids
        if self.scaler is not None:
            verdict = self.scaler.verdict(uids, self._overflow(runs))
            stepping = [u for u, ok in zip(uids, verdict) if ok]
        if self.lm is None:
            self.bank.step(stepping, scales)
            return
        optimizer = runs[0].optimizer  # one unit at a time while the LM trains
        if optimizer is not None:
            if stepping:
                if scales is not None:
                    for grad in _grads(optimizer):
                        grad.div_(scales[uids[0]])
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def _overflow(self, runs: list[UnitRun]) -> torch.Tensor:
        """1.0 for each unit whose gradient overflowed on this rank."""
        if self.lm is None:
            return self.bank.overflow([r.unit.id for r in runs])
        flag = torch.zeros((), device=self.forward.backbone.device)
        for grad in _grads(runs[0].optimizer) if runs[0].optimizer is not None else []:
            flag = torch.maximum(flag, (~torch.isfinite(grad)).any().float())
        return flag.reshape(1)

    def decay_lr(self, run: UnitRun) -> None:
        """ExponentialLR (the unit's train.lr_decay), once per epoch of this unit."""
        gamma = run.cfg.train.lr_decay
        if self.lm is not None:
            if run.optimizer is not None:
                for group in run.optimizer.param_groups:
                    group["lr"] *= gamma
        elif self.bank.has(run.unit.id):
            self.bank.decay_lr(run.unit.id, gamma)


def _grads(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
