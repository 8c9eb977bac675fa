"""What MKL's strict CNR mode (MKL_CBWR=AUTO,STRICT, which ptuning sets so that a unit's floats do not depend on
its pack or the thread count) costs a packed training step: benchmarks/step_profile.py's whole step and its parts,
run in child processes under each mode, alternating, on the same machine in one run.

    python benchmarks/mkl_strict.py [--units 8] [--rounds 3] [--model smollm2-135m]

MKL reads MKL_CBWR at its first call, so each mode needs its own process. Prints the median of each phase per mode
and strict / default.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

MODES = {"default": "AUTO", "strict": "AUTO,STRICT"}


def one_run(mode: str, args) -> dict[str, float]:
    script = Path(__file__).resolve().parent / "step_profile.py"
    out = subprocess.run([sys.executable, str(script), "--units", str(args.units), "--reps", str(args.reps),
                          "--model", args.model], capture_output=True, text=True, check=True,
                         env={**os.environ, "MKL_CBWR": MODES[mode]}).stdout
    rows = re.findall(r"^\| ([a-zA-Z][^|]*?) \| ([0-9.]+) \|$", out, flags=re.M)
    return {name: float(value) for name, value in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--units", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    runs = {mode: [] for mode in MODES}
    for _ in range(args.rounds):  # alternating, so that drift hits both modes alike
        for mode in MODES:
            runs[mode].append(one_run(mode, args))
    phases = [p for p in runs["default"][0] if p != "step / LM only"]
    print(f"{args.model}, {args.units} units, {args.rounds} processes per mode; median milliseconds per step")
    print("| phase | MKL_CBWR=AUTO | AUTO,STRICT | strict / default |\n|---|---:|---:|---:|")
    for phase in phases:
        a, b = (statistics.median(r[phase] for r in runs[mode]) for mode in MODES)
        print(f"| {phase} | {a:.1f} | {b:.1f} | {b / a:.3f} |")


if __name__ == "__main__":
    main()
