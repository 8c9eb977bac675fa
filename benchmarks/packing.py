"""Packing: 8 relations trained packed (one forward/backward per step for all of them) against the same 8
trained one after another, with the same epochs and per-relation batch. Prints the wall-time ratio, checks that
the figures agree, and the peak memory of each (each variant runs in its own process).

    python benchmarks/packing.py [--model smollm2-135m] [--data-dir ../shared/lama]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

RELATIONS = "P1376,P36,P37,P103,P176,P138,P178,P463"


def child(model: str, data_dir: str, pack: int, out: str, epochs: int, max_train: int) -> dict:
    from ptuning.config import load_config
    from ptuning.experiment import run_experiment

    cfg = load_config(None, [f"model.name={model}", f"data.relations={RELATIONS}", f"data.max_train={max_train}",
                             "data.max_dev=48", "data.max_test=64", f"train.max_epochs={epochs}",
                             f"train.patience={epochs}", "train.lr=1e-3", "train.manual_baseline=false",
                             f"train.pack_relations={pack}", "logging.wandb=false", "logging.progress=off",
                             f"output.dir={out}", "prompt.template=[3,3,0]"])
    start = time.perf_counter()
    payload = run_experiment(cfg, data_dir)
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            / 1024, "relations": {r: {k: v.get(k) for k in ("test_p@1", "test_mrr", "dev_history", "n_train")}
                                  for r, v in payload["relations"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=os.environ.get("LAMA_DATA", "../shared/lama"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-train", type=int, default=64)
    parser.add_argument("--pack", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pack is not None:
        print(json.dumps(child(args.model, args.data_dir, args.pack, args.out, args.epochs, args.max_train)))
        return
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, pack in (("one after another", 1), ("packed", 0)):
            proc = subprocess.run([sys.executable, __file__, "--pack", str(pack), "--out", f"{tmp}/{pack}",
                                   "--model", args.model, "--data-dir", args.data_dir, "--epochs", str(args.epochs),
                                   "--max-train", str(args.max_train)], capture_output=True, text=True, check=True)
            runs[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    a, b = runs["one after another"], runs["packed"]
    rel = a["relations"]
    p1_gap = max(abs(rel[r]["test_p@1"] - b["relations"][r]["test_p@1"]) for r in rel)
    mrr_gap = max(abs(rel[r]["test_mrr"] - b["relations"][r]["test_mrr"]) for r in rel)
    dev_differs = [r for r in rel if rel[r]["dev_history"] != b["relations"][r]["dev_history"]]
    facts = sum(r["n_train"] for r in a["relations"].values()) * args.epochs
    print(f"{args.model}: 8 relations, {facts} training facts in all ({args.epochs} epochs), batch 8 per relation")
    for name, r in runs.items():
        print(f"  {name:18s} {r['seconds']:6.1f} s  ({facts / r['seconds']:.1f} train facts/s incl. dev/test "
              f"evaluation)  peak RSS {r['peak_rss_mb']:.0f} MB")
    print(f"packed speed-up = {a['seconds'] / b['seconds']:.2f}x")
    print(f"agreement: largest test P@1 gap {100 * p1_gap:.2f} points, largest MRR gap {mrr_gap:.2e}, dev curves "
          f"differing in {len(dev_differs)} of {len(rel)} relations {dev_differs}")


if __name__ == "__main__":
    main()
