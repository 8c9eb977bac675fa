"""Progress: a bar of finished relations in a terminal, plain timestamped lines when output is not a terminal."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, mode: str = "auto", total: int = 0, stream=None):
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bars" if self.stream.isatty() else "lines"
        self.mode = mode
        self.start = time.perf_counter()
        self.bar = None
        if mode == "bars" and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="relations", unit="rel", file=self.stream, dynamic_ncols=True)

    def line(self, text: str) -> None:
        if self.mode == "off":
            return
        if self.bar is not None:
            self.bar.set_postfix_str(text[:60])
            return
        print(f"[{time.perf_counter() - self.start:7.1f}s] {text}", file=self.stream, flush=True)

    def relation_done(self, text: str) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.write(text, file=self.stream)
        else:
            self.line(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
