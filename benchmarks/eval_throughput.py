"""Evaluation throughput over the whole LAMA-29k test set: facts per second for the manual prompts and for
P-tuning prompts (fresh encoders: the cost is the same as trained ones), with facts sharing rows as the trainer
lays them out (train.row_tokens) against one padded fact per row (the shared-rows lever; both length-bucketed),
and peak memory.

    python benchmarks/eval_throughput.py [--model smollm2-135m] [--batch 64] [--data-dir ../shared/lama]
"""
from __future__ import annotations

import argparse
import os
import resource
import time

import torch

from common import trainer_and_tasks
from ptuning.config import load_config
from ptuning.data.templates import rows_of
from ptuning.model.encoders import PromptEncoder
from ptuning.data.lama import find_layout, select_relations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--data-dir", default=os.environ.get("LAMA_DATA", "../shared/lama"))
    parser.add_argument("--relations", help="comma list (default: all 41)")
    args = parser.parse_args()
    cfg = load_config(None, [f"model.name={args.model}", f"train.eval_batch_size={args.batch}",
                             "prompt.template=[3,3,0]"])
    ids = select_relations(find_layout(args.data_dir), args.relations.split(",") if args.relations else None)
    trainer, tasks = trainer_and_tasks(cfg, args.data_dir, ids)
    tasks = [t for t in tasks if t.skip_reason is None]
    n = sum(len(t.splits["test"]) for t in tasks)
    ptuning_items = []
    for t in tasks:
        template = trainer.templates.ptuning(t, cfg)
        with torch.no_grad():  # random prompts: the throughput does not depend on what they say
            vectors = PromptEncoder(template.n_pseudo, trainer.backbone.hidden_size).eval()()
        ptuning_items.append((vectors, rows_of(template, t, "test")))
    timings = {}
    start = time.perf_counter()
    trainer.forward.evaluate_manual(tasks)
    timings["manual prompts"] = time.perf_counter() - start
    start = time.perf_counter()
    trainer.forward.ranks(ptuning_items)
    timings["P-tuning prompts"] = time.perf_counter() - start
    trainer.cfg.train.row_tokens = 0
    start = time.perf_counter()
    trainer.forward.ranks(ptuning_items)
    timings["P-tuning, padded rows"] = time.perf_counter() - start
    print(f"{args.model}: {n} LAMA-29k test facts ({len(tasks)} relations, vocabulary mapped), eval batch "
          f"{args.batch}, threads {torch.get_num_threads()}")
    for name, seconds in timings.items():
        print(f"  {name:28s} {seconds:6.1f} s  {n / seconds:6.1f} facts/s")
    print(f"shared rows speed-up = {timings['P-tuning, padded rows'] / timings['P-tuning prompts']:.2f}x; "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
