"""Loading merged Megatron weights (load_megatron's model step) against a plain read of the same file: wall time
and peak resident memory. Targets: load <= 1.2x the plain read's wall time; peak RSS above the process's
baseline <= 1.2x the largest file.

    python benchmarks/load_memory.py [--layers 16] [--hidden 1024] [--device cpu] [--repeat 3] [--dir /tmp]

A synthetic release (benchmarks/merge_memory.py's, over 1 GB in fp32) is merged into one safetensors file, so the
largest file is the whole model (what a CPU load must hold anyway). Each variant runs in a fresh process, timed
from just before the read until the weights are in place (on a GPU, synchronised):
  plain read     every file's bytes read into memory (Path.read_bytes): the least a loader whose weights own
                 their memory must do, so the ratios are against it
  mapped read    safe_open + get_tensor of every tensor, then a sum over each (the mapping is lazy: the sum is
                 the read): the least any reader must do, weights left in the page cache's mapped pages
  new            ptuning.model.megatron_backbone.load_megatron_model at tensor parallel 1: load_megatron without the
                 tokenizer, which is not measured
  old            what load_megatron did before (kept here only): a model built and initialised on the CPU, the
                 file read into a dict, load_state_dict of the weights cast to the dtype, .to(device)
The release itself (tensor parallel 8, a part per rank) is not measured: that needs 8 processes.
Peak RSS is the kernel's VmHWM, reset just before the read (a child's ru_maxrss can report its parent's).
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

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from merge_memory import write_synthetic_release
from ptuning.model.megatron_backbone import load_megatron_model
from model_parallel.merge import INDEX, merge, read_merged_spec
from model_parallel.megatron import MegatronLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
VARIANTS = ["plain read", "mapped read", "new float32", "old float32", "new bfloat16", "old bfloat16"]


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _files(folder: Path) -> list[Path]:
    return [folder / f for f in sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))]


def _old_load(folder: Path, dtype: torch.dtype, device: str) -> MegatronLM:
    """load_megatron's steps before the meta device, kept here only to compare with."""
    model = MegatronLM(read_merged_spec(folder), tp=1, dtype=dtype)
    state = {}
    for path in _files(folder):
        state.update(load_file(path))
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    del state
    return model.to(device)


def measure(variant: str, folder: Path, device: str) -> dict:
    """One variant in this process: its wall time and its peak RSS above the baseline."""
    if device != "cpu":
        torch.zeros(1, device=device)  # the CUDA context (~0.3 s, ~300 MB of host memory) is not the load's
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts from the current RSS
    baseline = _status_mb("VmRSS")
    start = time.perf_counter()
    if variant == "plain read":
        held = [path.read_bytes() for path in _files(folder)]
    elif variant == "mapped read":
        held = []
        for path in _files(folder):
            with safe_open(path, framework="pt") as handle:
                held += [handle.get_tensor(name) for name in handle.keys()]
        for tensor in held:
            tensor.sum()
    else:
        kind, dtype = variant.split()
        held = (load_megatron_model(folder, 1, 0, DTYPES[dtype], device) if kind == "new"
                else _old_load(folder, DTYPES[dtype], device))
    if device != "cpu":
        torch.cuda.synchronize()
    return {"wall": time.perf_counter() - start, "peak_mb": _status_mb("VmHWM") - baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--device", default="cpu", help="where the model goes (cuda: host RSS of a GPU load)")
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes per variant; medians reported")
    parser.add_argument("--dir", default=None, help="where to write the ~2.5 GB of release and merge")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # a child process: one variant of --folder
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, Path(args.folder), args.device)))
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        release, merged = Path(tmp) / "release", Path(tmp) / "merged"
        start = time.perf_counter()
        write_synthetic_release(release, args.layers, args.hidden)
        merge(release, merged, shard_gb=64, log=lambda line: None)  # one file, the whole model
        files = _files(merged)
        largest = max(f.stat().st_size for f in files) / 2**20
        print(f"synthetic model: {args.layers} layers, hidden {args.hidden}, fp32, merged into {len(files)} file(s), "
              f"largest {largest:.0f} MB ({time.perf_counter() - start:.0f} s to write and merge); device "
              f"{args.device}; median of {args.repeat} fresh processes per variant")
        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for _ in range(args.repeat):  # interleaved, so that drift on the machine hits every variant alike
            for variant in VARIANTS:
                proc = subprocess.run([sys.executable, __file__, "--measure", variant, "--folder", str(merged),
                                       "--device", args.device], capture_output=True, text=True, check=True)
                runs[variant].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        median = {v: {k: statistics.median(r[k] for r in rs) for k in ("wall", "peak_mb")} for v, rs in runs.items()}
        plain = median["plain read"]["wall"]
        print("| variant | wall | peak RSS above baseline | wall / plain read (target <= 1.2) | peak / largest file "
              "(target <= 1.2) |")
        print("|---|---:|---:|---:|---:|")
        for variant, m in median.items():
            print(f"| {variant} | {m['wall']:.2f} s | {m['peak_mb']:.0f} MB | {m['wall'] / plain:.2f}x | "
                  f"{m['peak_mb'] / largest:.2f}x |")


if __name__ == "__main__":
    main()
