"""The prompt encoders' share of a step: K units' encoders forward and backward plus their Adam, as the prompt bank
does it (one stack: batched products, Adam per unit on its row) against one nn.LSTM encoder and one fused
torch Adam per unit (the trainer before the bank), side by side in one run.

    python benchmarks/bank.py [--units 8,24,123] [--hidden 576,768] [--reps 5] [--threads N]

hidden 576 with 6 pseudo tokens is SmolLM2-135M's causal template (3, 3, 0); hidden 768 with 9 is BERT-base's
(3, 3, 3). The LM's gradient into the vectors is stood in for by a fixed random tensor. Peak memory is the
process's resident set, from the kernel.
"""
from __future__ import annotations

import argparse
import gc
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ptuning.model.stacked import Layout  # noqa: E402
from ptuning.model.encoders import PromptEncoder  # noqa: E402
from ptuning.train.stack import EncoderStack, Settings  # noqa: E402


def median_seconds(fn, reps: int) -> float:
    fn()  # warm-up (Adam's state is made at the first step)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def looped(k: int, n_pseudo: int, hidden: int, grad: torch.Tensor, reps: int) -> tuple[float, float]:
    torch.manual_seed(0)
    encoders = [PromptEncoder(n_pseudo, hidden, "lstm") for _ in range(k)]
    optimizers = [torch.optim.Adam(e.parameters(), lr=1e-3, weight_decay=5e-4, fused=True) for e in encoders]

    def forward_backward() -> None:
        torch.autograd.backward([e() for e in encoders], list(grad))

    def adam() -> None:
        for opt in optimizers:
            opt.step()

    def step() -> None:
        forward_backward()
        adam()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)

    total = median_seconds(step, reps)
    forward_backward()
    optimizer = median_seconds(adam, reps)
    return total, optimizer


def stacked(k: int, n_pseudo: int, hidden: int, grad: torch.Tensor, reps: int) -> tuple[float, float]:
    torch.manual_seed(0)
    layout = Layout.of("lstm", n_pseudo, hidden)
    init = PromptEncoder(n_pseudo, hidden, "lstm").state_dict()
    stack = EncoderStack(layout, [init] * k, [Settings(1e-3, 5e-4, 0.0, i) for i in range(k)], torch.device("cpu"))
    rows = list(range(k))

    def step() -> None:
        stack(training=True).backward(grad)
        stack.step(rows)
        stack.release_grad()

    total = median_seconds(step, reps)
    stack(training=True).backward(grad)
    optimizer = median_seconds(lambda: stack.step(rows), reps)
    return total, optimizer


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--units", default="8,24,123")
    parser.add_argument("--hidden", default="576,768")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--which", default="looped,stacked", help="one of them alone where both do not fit")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| hidden | pseudo tokens | units | looped step ms (Adam) | stacked step ms (Adam) | stacked / looped |")
    print("|---:|---:|---:|---:|---:|---:|")
    for hidden in (int(h) for h in args.hidden.split(",")):
        n_pseudo = 6 if hidden == 576 else 9
        for k in (int(u) for u in args.units.split(",")):
            grad = torch.randn(k, n_pseudo, hidden)
            figures = {}
            for name, fn in (("looped", looped), ("stacked", stacked)):
                if name in args.which:
                    figures[name] = fn(k, n_pseudo, hidden, grad, args.reps)
                    gc.collect()
            cells = [f"{figures[n][0] * 1e3:.1f} ({figures[n][1] * 1e3:.1f})" if n in figures else "-"
                     for n in ("looped", "stacked")]
            ratio = f"{figures['stacked'][0] / figures['looped'][0]:.2f}" if len(figures) == 2 else "-"
            print(f"| {hidden} | {n_pseudo} | {k} | {cells[0]} | {cells[1]} | {ratio} |", flush=True)
    print(f"peak resident memory {peak_gib():.1f} GiB")


if __name__ == "__main__":
    main()
