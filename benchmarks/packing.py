"""Packing: 8 relations trained packed (one forward/backward per step for all of them) against the same 8
trained one after another, with the same epochs and per-relation batch, each with facts sharing rows
(train.row_tokens, the default) and with one padded fact per row. Prints wall-time ratios, where the time goes
(training steps, evaluation, the rest: load and set-up), whether the figures agree, and the peak memory of each
(each variant runs in its own process).

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

import torch

RELATIONS = "P1376,P36,P37,P103,P176,P138,P178,P463"


def timed(phases: dict, name: str, fn):
    """fn, adding its wall time to phases[name] (instrumentation for this benchmark only)."""
    def call(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            phases[name] += time.perf_counter() - start
    return call


def child(model: str, data_dir: str, relations: str, pack: int, row_tokens: int, out: str, epochs: int,
          max_train: int, overrides: list[str]) -> dict:
    from ptuning.config import load_config
    from ptuning.experiment import run_experiment
    from ptuning.train.packed import PackedLM
    from ptuning.train.step import Step

    cfg = load_config(None, [f"model.name={model}", f"data.relations={relations}", f"data.max_train={max_train}",
                             "data.max_dev=48", "data.max_test=64", f"train.max_epochs={epochs}",
                             f"train.patience={epochs}", "train.lr=1e-3", "train.manual_baseline=false",
                             f"train.pack_units={pack}", f"train.row_tokens={row_tokens}", "logging.wandb=false",
                             "logging.progress=off", f"output.dir={out}", "prompt.template=[3,3,0]", *overrides])
    phases = {"train steps": 0.0, "evaluation": 0.0}
    Step.__call__ = timed(phases, "train steps", Step.__call__)
    PackedLM.ranks = timed(phases, "evaluation", PackedLM.ranks)
    start = time.perf_counter()
    payload = run_experiment(cfg, data_dir)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "phases": {**phases, "rest": seconds - sum(phases.values())},
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "relations": {r: {k: v.get(k) for k in ("test_p@1", "test_mrr", "dev_history", "n_train")}
                          for r, v in payload["relations"].items()}}


def first_step_gradients(model: str, data_dir: str, row_tokens: int) -> float:
    """The first step's encoder gradients, packed against each relation alone on the same micro-batch: the
    largest difference relative to each gradient's scale (float rounding only, if packing is exact)."""
    from common import trainer_and_tasks
    from ptuning.config import load_config

    cfg = load_config(None, [f"model.name={model}", "prompt.template=[3,3,0]", f"train.row_tokens={row_tokens}"])
    trainer, tasks = trainer_and_tasks(cfg, data_dir, RELATIONS.split(","))
    runs = trainer.prepare(tasks)

    def gradients(group) -> list[torch.Tensor]:
        for run in group:
            run.cursor = 0
        trainer.bank.zero_grad()
        trainer.step.loss(group).backward()
        return [trainer.bank.gradient(run.unit.id).clone() for run in group]

    packed = gradients(runs)
    alone = [gradients([run])[0] for run in runs]
    return max(float((a - b).abs().max() / a.abs().max()) for a, b in zip(alone, packed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=os.environ.get("LAMA_DATA", "../shared/lama"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-train", type=int, default=64)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="extra config overrides for every variant")
    parser.add_argument("--rows", default="shared,padded", help="shared (train.row_tokens=64), padded (0), or both")
    parser.add_argument("--relations", default=RELATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--pack", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--row-tokens", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pack is not None:
        print(json.dumps(child(args.model, args.data_dir, args.relations, args.pack, args.row_tokens, args.out,
                               args.epochs, args.max_train, args.set)))
        return

    def run(relations: str, pack: int, row_tokens: int, out: str) -> dict:
        """One variant in its own process; process_seconds adds the interpreter start and imports."""
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--relations", relations, "--pack", str(pack),
                               "--row-tokens", str(row_tokens), "--out", out, "--model", args.model, "--data-dir",
                               args.data_dir, "--epochs", str(args.epochs), "--max-train", str(args.max_train),
                               *(f"--set={o}" for o in args.set)], capture_output=True, text=True, check=True)
        return {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_seconds": time.perf_counter() - start}

    variants = {(order, f"{rows} rows"): (pack, 64 if rows == "shared" else 0) for rows in args.rows.split(",")
                for order, pack in (("one after another", 1), ("packed", 0))}
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key, (pack, row_tokens) in variants.items():
            runs[key] = run(RELATIONS, pack, row_tokens, f"{tmp}/{pack}-{row_tokens}")
        # How the reference code runs relations one after another: a process (and a model load) per relation.
        per_process = [run(r, 1, 64, f"{tmp}/{r}") for r in RELATIONS.split(",")]
    first = runs["one after another", "shared rows"]
    facts = sum(r["n_train"] for r in first["relations"].values()) * args.epochs
    print(f"{args.model}: 8 relations, {facts} training facts in all ({args.epochs} epochs), batch 8 per relation, "
          f"threads {torch.get_num_threads()}")
    for (order, rows), r in runs.items():
        phases = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in r["phases"].items())
        print(f"  {order:18s} {rows:12s} {r['seconds']:6.1f} s  ({phases})  peak RSS {r['peak_rss_mb']:.0f} MB")
    alone = sum(r["process_seconds"] for r in per_process)
    packed = runs["packed", "shared rows"]["process_seconds"] if ("packed", "shared rows") in runs else float("nan")
    print(f"  one process per relation, shared rows: {alone:6.1f} s in all, interpreter start included (packed, "
          f"shared rows, counted the same way: {packed:.1f} s): packed speed-up {alone / packed:.2f}x")
    rows_variants = [f"{rows} rows" for rows in args.rows.split(",")]
    for rows in rows_variants:
        a, b = runs["one after another", rows], runs["packed", rows]
        print(f"packed speed-up, {rows}: whole sweep {a['seconds'] / b['seconds']:.2f}x, training steps "
              f"{a['phases']['train steps'] / b['phases']['train steps']:.2f}x, evaluation "
              f"{a['phases']['evaluation'] / b['phases']['evaluation']:.2f}x")
    if len(rows_variants) == 2:
        best, worst = runs["packed", "shared rows"]["seconds"], runs["one after another", "padded rows"]["seconds"]
        print(f"shared rows against padded rows, packed: {runs['packed', 'padded rows']['seconds'] / best:.2f}x; "
              f"both levers against neither: {worst / best:.2f}x")
    for rows in rows_variants:
        a, b = runs["one after another", rows]["relations"], runs["packed", rows]["relations"]
        p1_gap = max(abs(a[r]["test_p@1"] - b[r]["test_p@1"]) for r in a)
        mrr_gap = max(abs(a[r]["test_mrr"] - b[r]["test_mrr"]) for r in a)
        differ = [r for r in a if a[r]["dev_history"] != b[r]["dev_history"]]
        print(f"agreement, {rows}: largest test P@1 gap {100 * p1_gap:.2f} points, largest MRR gap {mrr_gap:.2e}, "
              f"dev curves differing in {len(differ)} of {len(a)} relations {differ}")
        gap = first_step_gradients(args.model, args.data_dir, 64 if rows == "shared rows" else 0)
        print(f"agreement, {rows}, first step: encoder gradients packed against alone differ by at most "
              f"{gap:.1e} of their scale")


if __name__ == "__main__":
    main()
