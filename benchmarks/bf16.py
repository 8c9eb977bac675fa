"""bf16 autocast's effect on P@1 and on evaluation time: the trained prompts of a finished run, and the manual
prompts, evaluated on the test set in float32 and under bf16 autocast (`model.bf16`), side by side. The float32
figures are also checked against the ones the run recorded (same prompts; they differ only if the evaluation path
changed more than float rounding).

    python benchmarks/bf16.py --run runs/smollm2_lama29k_full [--relations P1376,P36] [--data-dir ../shared/lama]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from common import trainer_and_tasks
from ptuning.config import config_from_dict
from ptuning.config.sweep import Unit, Variant
from ptuning.data.templates import rows_of
from ptuning.output.store import RunStore

RELATIONS = "P1376,P36,P37,P103,P176,P138,P178,P463"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a finished run's output folder (trained prompt encoders)")
    parser.add_argument("--relations", default=RELATIONS)
    parser.add_argument("--data-dir", default=os.environ.get("LAMA_DATA", "../shared/lama"))
    args = parser.parse_args()
    store = RunStore(args.run)
    cfg = config_from_dict(json.loads((Path(args.run) / "run_config.json").read_text()), f"{args.run}/run_config.json")
    relations = args.relations.split(",")
    trainer, tasks = trainer_and_tasks(cfg, args.data_dir, relations)
    backbone = trainer.backbone
    prompts, manual = [], []
    for task in tasks:
        unit = Unit(task, Variant("", {}, cfg))
        vectors = trainer.forward.saved_vectors([unit], [store.load_encoder_state(task.id)])[0]
        prompts.append((vectors, rows_of(trainer.templates.ptuning(task, cfg), task, "test")))
        manual.append((None, rows_of(trainer.templates.manual(task), task, "test")))
    recorded = [store.result(r)["test_p@1"] for r in relations]

    top1, seconds = {}, {}
    for precision in ("float32", "bf16"):
        backbone.bf16 = precision == "bf16"
        for name, items in (("P-tuning", prompts), ("manual", manual)):
            start = time.perf_counter()
            top1[name, precision] = [ranks == 1 for ranks in trainer.forward.ranks(items)]
            seconds[name, precision] = time.perf_counter() - start

    n = sum(len(rows) for _, rows in prompts)
    print(f"{cfg.model.name}: {len(tasks)} relations, {n} test facts, prompts from {args.run}, threads "
          f"{torch.get_num_threads()}")
    for name in ("P-tuning", "manual"):
        for precision in ("float32", "bf16"):
            hits = top1[name, precision]
            macro = 100 * sum(float(h.float().mean()) for h in hits) / len(hits)
            micro = 100 * sum(int(h.sum()) for h in hits) / n
            print(f"  {name:8s} {precision:7s} macro P@1 {macro:5.2f}  micro P@1 {micro:5.2f}  "
                  f"{seconds[name, precision]:6.1f} s ({n / seconds[name, precision]:.0f} facts/s)")
        changed = sum(int((a != b).sum()) for a, b in zip(top1[name, "float32"], top1[name, "bf16"]))
        print(f"  {name}: bf16 changes the top-1 hit of {changed} of {n} facts ({100 * changed / n:.2f}%); "
              f"time {seconds[name, 'bf16'] / seconds[name, 'float32']:.2f}x the float32 time")
    now = [float(h.float().mean()) for h in top1["P-tuning", "float32"]]
    gap = max(abs(a - b) for a, b in zip(now, recorded))
    print(f"float32 against the run's recorded test P@1: largest gap {100 * gap:.2f} points over {len(relations)} "
          f"relations")


if __name__ == "__main__":
    main()
