"""Dynamic loss scaling for a float16 language model (V100s; the Megatron-11B release's own dtype).

The gradient that reaches the prompts passes back through every fp16 layer of the frozen LM, where small values
flush to zero. The loss is multiplied by a scale before backward and the encoders' gradients divided by it before
their step; a step whose gradients overflowed is skipped and the scale halved, and after `interval` clean steps
it doubles. Under tensor parallelism the overflow verdict is agreed across the group (one all-reduce of a flag),
so every rank keeps the same scale and the vocab-parallel backward stays consistent. bf16 needs none of this.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ptuning.parallel import ParallelContext


class LossScaler:
    def __init__(self, parallel: ParallelContext, scale: float = 2.0**16, interval: int = 1000):
        self.parallel, self.scale, self.interval, self.clean_steps = parallel, scale, interval, 0
        self.skipped = 0

    def backward_and_step(self, loss: torch.Tensor, optimizers: list[torch.optim.Optimizer]) -> bool:
        """Backward of the scaled loss, then the optimizers' steps on unscaled gradients; False if skipped."""
        (loss * self.scale).backward()
        grads = [p.grad for opt in optimizers for g in opt.param_groups for p in g["params"] if p.grad is not None]
        overflow = torch.zeros((), device=loss.device)
        for grad in grads:
            overflow = torch.maximum(overflow, (~torch.isfinite(grad)).any().float())
        group = self.parallel.tp_group
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(overflow, op=dist.ReduceOp.MAX, group=group)
        if overflow.item():  # one read-back per step, only in fp16
            self.scale /= 2
            self.clean_steps = 0
            self.skipped += 1
            return False
        for grad in grads:
            grad.div_(self.scale)
        for optimizer in optimizers:
            optimizer.step()
        self.clean_steps += 1
        if self.clean_steps >= self.interval:
            self.scale *= 2
            self.clean_steps = 0
        return True

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

