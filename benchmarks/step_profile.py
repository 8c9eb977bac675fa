"""Where a packed training step's time goes: a torch.profiler breakdown of one step into batch building, the LM's
forward and backward, the prompt encoders' forward and backward, and the optimizer, with the host syncs counted.

    python benchmarks/step_profile.py [--units 1,8,24] [--model smollm2-135m] [--reps 3]

The step is the trainer's, cut at the prompt vectors: the encoders' output is detached into leaves, the LM's
loss is back-propagated to those leaves, then the leaves' gradient into the encoders (the same arithmetic as
Trainer.step, which runs it as one backward). The LM's forward and backward on the same packed batch, with no
encoders and no optimizer, is the yardstick: step / (LM forward + backward) says how close the step is to what
the frozen LM alone costs. On a GPU the times are the device's, and the host's waits for the device (syncs) are
counted. SmolLM2-135M with the quick start's template, 8 relations x 3 seeds, 8 facts a unit.
`make gpu-check` runs the same profile at Megatron-11B and BERT-base shapes (profile() below).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile as torch_profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHASES = ("encoders forward", "LM forward", "LM backward", "encoders backward", "optimizer")
# what a GPU waits on: each is the host stopping for the device's queue
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def phased_step(trainer, runs, batch: int) -> None:
    """One step of the runs, in profiler ranges."""
    for run in runs:
        run.cursor = 0  # the same facts every step
    with record_function("step::encoders forward"):
        vectors = trainer.forward.vectors(runs, training=True)
    leaves = [v.detach().requires_grad_() if v is not None else None for v in vectors]
    rows = [run.next_batch(batch) for run in runs]
    with record_function("step::LM forward"):
        loss = trainer.forward.loss(leaves, rows, [1.0] * len(runs))
    with record_function("step::LM backward"):
        loss.backward()
    with record_function("step::encoders backward"):
        torch.autograd.backward([v for v in vectors if v is not None],
                                [leaf.grad for leaf in leaves if leaf is not None])
    with record_function("step::optimizer"):
        trainer.bank.step([run.unit.id for run in runs])


def profile(trainer, runs, batch: int = 8, reps: int = 3) -> dict:
    """Milliseconds per step in each phase (device time on a GPU, host time on a CPU), the batch building inside
    the LM forward, the whole step, and the host syncs per step."""
    device = trainer.backbone.device
    cuda = device.type == "cuda"
    for _ in range(2):  # warm-up: Adam's state, kernels' first calls
        phased_step(trainer, runs, batch)
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(reps):
            with record_function("step::whole"):
                phased_step(trainer, runs, batch)
            if cuda:
                torch.cuda.synchronize()
    events = {e.key: e for e in prof.key_averages()}

    def ms(key: str) -> float:
        event = events.get(key)
        if event is None:
            return 0.0
        total = event.device_time_total if cuda else event.cpu_time_total
        return total / 1e3 / reps

    out = {phase: ms(f"step::{phase}") for phase in PHASES}
    out["batch building (in LM forward)"] = ms("ptuning::collate")
    out["whole step"] = ms("step::whole") if not cuda else sum(out[p] for p in PHASES)
    out["LM only"] = out["LM forward"] + out["LM backward"]
    out["step / LM only"] = out["whole step"] / out["LM only"] if out["LM only"] else float("nan")
    if cuda:  # on a CPU there is no device queue to wait for
        out["host syncs per step"] = sum(events[n].count for n in SYNCS if n in events) / reps
    return out


def main() -> None:
    from common import trainer_and_tasks
    from ptuning.model.backbone import backbone_dtype
    from ptuning.config import load_config
    from ptuning.data.lama import find_layout, select_relations
    from ptuning.config.sweep import units, variants

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--units", default="1,8,24")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--data-dir", default=os.environ.get("LAMA_DATA", "../shared/lama"))
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(None, [f"model.name={args.model}", "model.dtype=auto", "prompt.template=[3,3,0]",
                             "train.batch_size=8"], ["train.seed=34,35,36"])
    relations = select_relations(find_layout(args.data_dir), None)[:8]
    trainer, tasks = trainer_and_tasks(cfg, args.data_dir, relations)
    every = units(tasks, variants(cfg))
    print(f"{args.model}, weights in {backbone_dtype(trainer.backbone)}, {torch.get_num_threads()} threads, "
          f"{args.reps} steps each; milliseconds per step")
    sizes = [int(k) for k in args.units.split(",")]
    results = {k: profile(trainer, trainer.prepare(every[:k]), reps=args.reps) for k in sizes}
    keys = list(next(iter(results.values())))
    print("| " + " | ".join(["phase"] + [f"{k} unit{'s' if k > 1 else ''}" for k in sizes]) + " |")
    print("|---|" + "---:|" * len(sizes))
    for key in keys:
        fmt = ".2f" if key == "step / LM only" else ".0f" if "syncs" in key else ".1f"
        print(f"| {key} | " + " | ".join(format(results[k][key], fmt) for k in sizes) + " |")


if __name__ == "__main__":
    main()
