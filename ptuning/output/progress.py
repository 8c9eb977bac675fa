"""Progress: in a terminal, one bar of epochs over every unit (a unit stopped early counts its remaining epochs
as done) with the units finished and the time left; plain timestamped lines when output is not a terminal, where
each finished unit's line carries the same counts and estimate."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, mode: str = "auto", total: int = 0, epochs: int = 0, stream=None):
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bars" if self.stream.isatty() else "lines"
        self.mode = mode
        self.start = time.perf_counter()
        self.total, self.epochs = total, epochs
        self.units_done = self.epochs_done = 0
        self.first: tuple[float, int] | None = None  # (time, epochs) at the first count: the estimate's origin
        self.bar = None
        if mode == "bars" and epochs:
            from tqdm import tqdm

            self.bar = tqdm(total=epochs, desc="epochs", unit="ep", file=self.stream, dynamic_ncols=True,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} [{elapsed}<{remaining}] "
                                       "{postfix}")
            self.bar.set_postfix_str(f"units 0/{total}")

    def line(self, text: str) -> None:
        if self.mode == "off":
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
            return
        print(f"[{time.perf_counter() - self.start:7.1f}s] {text}", file=self.stream, flush=True)

    def advance(self, units_done: int, epochs_done: int) -> None:
        """The counts so far, over every unit of the run (the coordinator reads them from the output folder)."""
        if self.first is None:
            self.first = (time.perf_counter(), epochs_done)  # resumed work is not this run's speed
        self.units_done, epochs_done = units_done, min(epochs_done, self.epochs)
        if self.bar is not None:
            self.bar.update(epochs_done - self.epochs_done)
            self.bar.set_postfix_str(f"units {units_done}/{self.total}")
        self.epochs_done = epochs_done

    def eta(self) -> str:
        """'units 3/24, epochs 40/120, about 6 min left' from the pace since the first count."""
        counts = f"units {self.units_done}/{self.total}, epochs {self.epochs_done}/{self.epochs}"
        if self.first is None or self.epochs_done <= self.first[1]:
            return counts
        rate = (self.epochs_done - self.first[1]) / (time.perf_counter() - self.first[0])
        left = (self.epochs - self.epochs_done) / rate
        return counts + (f", about {left / 60:.0f} min left" if left >= 90 else f", about {left:.0f} s left")

    def unit_done(self, text: str) -> None:
        self.line(text if self.bar is not None else f"{text} [{self.eta()}]")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
