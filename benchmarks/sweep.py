"""A 3-seed sweep packed against the three seeds run one after another, same settings, side by side in one run:

    python benchmarks/sweep.py --data-dir ../shared/lama [--model smollm2-135m] [--reps 1]

packed:      one command, --sweep train.seed=34,35,36: 8 relations x 3 seeds = 24 units in every step
sequential:  three commands, one seed each (8 relations packed), the way one run per setting goes today

Whole-command wall time (start, model load, manual baseline, training, test), median over --reps, the two
alternating. Also checks that every unit's figures agree between the two (they train the same units; rounding
in differently shaped batches may move a relation at this short budget, which is counted, not hidden).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RELATIONS = "P1001,P103,P1376,P138,P176,P36,P37,P407"
SEEDS = (34, 35, 36)


def command(args, out: Path, *extra: str) -> list[str]:
    budget = [f"model.name={args.model}", f"data.max_train={args.train}", f"data.max_dev={args.dev}",
              f"data.max_test={args.test}", f"train.max_epochs={args.epochs}", "train.lr=1e-3",
              "logging.wandb=false", "logging.progress=off"]
    return ([sys.executable, str(REPO / "launcher" / "run.py"), "--relations", RELATIONS, "--data-dir",
             args.data_dir, "--out", str(out)] + [a for b in budget for a in ("--set", b)] + list(extra))


def wall(cmds: list[list[str]]) -> float:
    start = time.perf_counter()
    for cmd in cmds:
        subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--train", type=int, default=64)
    parser.add_argument("--dev", type=int, default=32)
    parser.add_argument("--test", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"packed": [], "sequential": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            root = Path(tmp) / str(rep)
            times["packed"].append(wall([command(args, root / "packed", "--sweep",
                                                 f"train.seed={','.join(map(str, SEEDS))}")]))
            times["sequential"].append(wall([command(args, root / f"seed{s}", "--set", f"train.seed={s}")
                                             for s in SEEDS]))
        packed = json.loads((root / "packed" / "results.json").read_text())["relations"]
        agree = differ = 0
        for seed in SEEDS:
            alone = json.loads((root / f"seed{seed}" / "results.json").read_text())["relations"]
            for rid, r in alone.items():
                same = packed[rid]["variants"][f"seed={seed}"]["test_p@1"] == r["test_p@1"]
                agree, differ = agree + same, differ + (not same)
    p, s = statistics.median(times["packed"]), statistics.median(times["sequential"])
    print(f"{args.model}, {RELATIONS} ({len(RELATIONS.split(','))} relations) x seeds {SEEDS}; train {args.train}, "
          f"dev {args.dev}, test {args.test} facts per relation, {args.epochs} epochs; reps {args.reps}")
    print(f"packed (one command, {3 * len(RELATIONS.split(','))} units a step): {p:.1f} s")
    print(f"sequential (three commands):             {s:.1f} s")
    print(f"speed-up sequential / packed: {s / p:.2f}x (target >= 1.3x on a CPU)")
    print(f"units with the same test P@1 in both: {agree} of {agree + differ}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
