"""SIGTERM / SIGUSR1 as a request to stop cleanly (SLURM's warning before the time limit, a preemption):
the step in flight finishes, every relation under way is checkpointed where it stands, and the run ends; the
same command resumes it.

Ranks of one tensor-parallel group must stop after the SAME step, or one would wait forever in the next step's
collectives for a peer that has left: each step they agree on the flag (ParallelContext.agree: one all-reduce of
a CPU integer over gloo, microseconds, no GPU sync).
"""
from __future__ import annotations

import signal
import threading

from ptuning.parallel.context import ParallelContext

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignal:
    def __init__(self, parallel: ParallelContext):
        self.parallel = parallel
        self.received: int | None = None  # the signal number, once one arrived (here or at a peer)
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def requested(self) -> bool:
        """Whether to stop after this step: this rank got a signal, or (tensor parallel) any peer did."""
        agreed = self.parallel.agree(self.received or 0)
        if agreed and self.received is None:
            self.received = agreed
        return bool(agreed)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "-"
