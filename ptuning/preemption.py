"""SIGTERM / SIGUSR1 as a request to stop cleanly (SLURM's warning before the time limit, a preemption, Ctrl-\\):
the step in flight finishes, every relation under way is checkpointed where it stands, and the run ends; the
same command resumes it.

Ranks of one tensor-parallel group must stop after the SAME step, or one would wait forever in the next step's
collectives for a peer that has left: each step they agree on the flag with one all-reduce of a CPU integer
over a gloo group (microseconds; no GPU sync).
"""
from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

from ptuning.parallel import ParallelContext

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignal:
    def __init__(self, parallel: ParallelContext):
        self.parallel = parallel
        self.received: int | None = None  # the signal number, once one arrived
        self._previous: dict[int, object] = {}
        self._group = None

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        if self.parallel.tp_size > 1 and self.parallel.tp_group is not None and self._group is None:
            self._group = control_group(self.parallel)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def requested(self) -> bool:
        """Whether to stop after this step: this rank got a signal, or (tensor parallel) any peer did."""
        if self._group is None:
            return self.received is not None
        flag = torch.tensor([0 if self.received is None else int(self.received)], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        if flag.item() and self.received is None:
            self.received = int(flag.item())
        return bool(flag.item())

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "-"


def control_group(parallel: ParallelContext):
    """A gloo group of this rank's tensor-parallel peers (the tensor-parallel group itself when it is gloo).
    Every rank creates every group, in the same order, as torch.distributed requires."""
    if dist.get_backend(parallel.tp_group) == "gloo":
        return parallel.tp_group
    tp, world = parallel.tp_size, parallel.world_size
    groups = [dist.new_group(list(range(start, start + tp)), backend="gloo") for start in range(0, world, tp)]
    return groups[parallel.rank // tp]
