"""Dynamic loss scaling for a float16 language model (V100s; the Megatron-11B release's own dtype), per unit.

The gradient that reaches the prompts passes back through every fp16 layer of the frozen LM, where small values
flush to zero. Each unit's loss is multiplied by its own scale before backward and its encoder's gradient divided
by it in its Adam step; a unit whose gradient overflowed skips its step and halves its scale, and after `interval`
clean steps its scale doubles. One unit's overflow never touches another's step or scale (its facts share batch
rows only with each other, so an inf cannot cross into another unit's backward). Under tensor parallelism the
verdicts are agreed across the group (one all-reduce of the per-unit flags), so every rank keeps the same scales
and the vocab-parallel backward stays consistent. bf16 needs none of this.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ptuning.parallel.context import ParallelContext


class LossScaler:
    def __init__(self, parallel: ParallelContext, scale: float = 2.0**16, interval: int = 1000):
        self.parallel, self.initial, self.interval = parallel, scale, interval
        self.units: dict[str, dict] = {}  # unit id -> {"scale", "clean_steps"}
        self.skipped = 0  # unit steps skipped, over every unit

    def _of(self, uid: str) -> dict:
        return self.units.setdefault(uid, {"scale": self.initial, "clean_steps": 0})

    def scale(self, uid: str) -> float:
        return self._of(uid)["scale"]

    def verdict(self, uids: list[str], overflow: torch.Tensor) -> list[bool]:
        """Which units step (overflow[i]: 1.0 where unit i's gradient overflowed on this rank); halves the scale of
        each that overflowed, doubles it after `interval` clean steps."""
        group = self.parallel.tp_group
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(overflow, op=dist.ReduceOp.MAX, group=group)
        ok = []
        for uid, flag in zip(uids, overflow.tolist()):  # one read-back per step, only in fp16
            state = self._of(uid)
            if flag:
                state["scale"] /= 2
                state["clean_steps"] = 0
                self.skipped += 1
            else:
                state["clean_steps"] += 1
                if state["clean_steps"] >= self.interval:
                    state["scale"] *= 2
                    state["clean_steps"] = 0
            ok.append(not flag)
        return ok

    def state_dict(self, uid: str) -> dict:
        return dict(self._of(uid))

    def load_state_dict(self, uid: str, state: dict) -> None:
        self.units[uid] = {"scale": float(state["scale"]), "clean_steps": int(state["clean_steps"])}
