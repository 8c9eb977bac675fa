"""Merge the 8-part fairseq release into safetensors shards plus a config, streaming:

    python -m model_parallel.merge --src RELEASE_DIR --dst MERGED_DIR [--shard-gb 4]

The merged tensors' shapes are known from part 0, so the safetensors files are laid out first (header, offsets)
and filled part by part: one part is resident at a time, and its slice of every tensor is written straight to
its place in the file (column-parallel slices are contiguous blocks; row-parallel slices are one short run per
row). Peak resident memory stays near one part. The folder is built under a temporary name and renamed.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

from model_parallel.release import N_PARTS, PART, MegatronSpec, ReleaseError, check_part, load_part, read_spec, \
    split_dim

FORMAT = "ptuning-lama/megatron-merged"
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
INDEX = "model.safetensors.index.json"


def ordered(names: list[str]) -> list[str]:
    """Embedding first, then layers in numeric order, then the rest, so shards follow the network."""
    def key(name: str) -> tuple:
        parts = name.split(".")
        return (1, int(parts[1]), name) if parts[0] == "layers" else (0 if "embed" in name else 2, 0, name)
    return sorted(names, key=key)


def plan_shards(shapes: dict[str, tuple[torch.Size, torch.dtype]], shard_bytes: int) -> list[list[str]]:
    shards, current, size = [], [], 0
    for name in ordered(list(shapes)):
        shape, dtype = shapes[name]
        nbytes = shape.numel() * dtype.itemsize
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def write_layout(path: Path, names: list[str], shapes: dict, metadata: dict[str, str]) -> dict[str, int]:
    """Create a safetensors file of the right size with its header; return each tensor's absolute offset."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name in names:
        shape, dtype = shapes[name]
        if dtype not in SAFETENSORS_DTYPES:
            raise ReleaseError(f"{name}: dtype {dtype} cannot be stored")
        nbytes = shape.numel() * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset,
                                                                                                  offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data region starts 8-byte aligned
    start = 8 + len(encoded)
    with path.open("wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        handle.truncate(start + offset)
    return {name: start + header[name]["data_offsets"][0] for name in names}


def write_slice(fd: int, offset: int, merged_shape: torch.Size, tensor: torch.Tensor, part: int,
                dim: int | None) -> None:
    raw = tensor.detach().contiguous().view(torch.uint8).numpy()
    if dim is None:
        os.pwrite(fd, raw.data, offset)
        return
    if dim == 0:  # a contiguous block of rows
        os.pwrite(fd, raw.data, offset + part * raw.nbytes)
        return
    rows = merged_shape[0]
    row_bytes = raw.nbytes // rows
    full_row = row_bytes * N_PARTS
    block = raw.reshape(rows, row_bytes)
    for r in range(rows):  # dim 1: this part's columns of every row
        os.pwrite(fd, block[r].data, offset + r * full_row + part * row_bytes)


def merge(src: Path, dst: Path, shard_gb: float = 4.0, log=print) -> dict:
    src, dst = Path(src), Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise ReleaseError(f"{dst}: exists and is not empty")
    spec, shapes = read_spec(src)
    for i in range(N_PARTS):  # every part present before hours of writing
        if not (src / PART.format(i)).is_file():
            raise ReleaseError(f"{src / PART.format(i)}: missing; the release has {N_PARTS} parts")
    staging = dst.parent / f".{dst.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shards = plan_shards(shapes, int(shard_gb * 2**30))
    files = {}
    offsets: dict[str, tuple[str, int]] = {}
    for k, names in enumerate(shards):
        filename = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        files[filename] = names
        for name, offset in write_layout(staging / filename, names, shapes, {"format": "pt"}).items():
            offsets[name] = (filename, offset)
    baseline = _rss_mb()
    reference = {name: None for name in shapes}
    for part in range(N_PARTS):
        start = time.perf_counter()
        path = src / PART.format(part)
        _, model = load_part(path)
        if part == 0:
            reference = {name: tensor.shape for name, tensor in model.items()}
        else:
            check_part(path, reference, model)
        handles = {f: os.open(staging / f, os.O_WRONLY) for f in files}
        try:
            for name, tensor in model.items():
                dim = split_dim(name)
                if dim is None and part > 0:
                    continue  # replicated: part 0's copy
                filename, offset = offsets[name]
                write_slice(handles[filename], offset, shapes[name][0], tensor, part, dim)
        finally:
            for fd in handles.values():
                os.close(fd)
        del model
        gc.collect()
        log(f"part {part}: {time.perf_counter() - start:.1f} s, peak RSS {_peak_mb():.0f} MB")
    (staging / "config.json").write_text(json.dumps({"format": FORMAT, "spec": spec.to_dict(),
                                                    "dtype": str(shapes["embed_tokens.weight"][1])}, indent=2))
    (staging / INDEX).write_text(json.dumps({"weight_map": {n: f for f, ns in files.items() for n in ns}}, indent=1))
    shutil.copy(src / "dict.txt", staging / "dict.txt")
    if dst.exists():
        dst.rmdir()
    os.replace(staging, dst)
    largest = max((src / PART.format(i)).stat().st_size for i in range(N_PARTS)) / 2**20
    report = {"baseline_rss_mb": baseline, "peak_rss_mb": _peak_mb(), "largest_part_mb": largest}
    report["peak_above_baseline_over_largest_part"] = (report["peak_rss_mb"] - baseline) / largest
    return report


def read_merged_spec(folder: Path) -> MegatronSpec:
    path = Path(folder) / "config.json"
    config = read_merged_json(path)
    if config.get("format") != FORMAT:
        raise ReleaseError(f"{path}: not a merged Megatron folder (format {config.get('format')!r})")
    spec = config.get("spec")
    try:
        return MegatronSpec(**spec)
    except TypeError as error:
        raise ReleaseError(f"{path}: field 'spec' does not describe a Megatron model ({error})") from None


def read_merged_json(path: Path) -> dict:
    """A JSON object of a merged folder (config.json, the index), or a ReleaseError naming the file and line."""
    from ptuning.files import DataError, read_json_object

    try:
        return read_json_object(path)
    except DataError as error:
        raise ReleaseError(str(error)) from None


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Merge fairseq's 8-part Megatron-11B release into safetensors.")
    parser.add_argument("--src", required=True, help="folder with dict.txt and model-model_part-{0..7}.pt")
    parser.add_argument("--dst", required=True, help="new folder for the merged safetensors and config")
    parser.add_argument("--shard-gb", type=float, default=4.0)
    args = parser.parse_args(argv)
    try:
        report = merge(Path(args.src), Path(args.dst), args.shard_gb)
    except ReleaseError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"merged into {args.dst}: peak RSS {report['peak_rss_mb']:.0f} MB (baseline {report['baseline_rss_mb']:.0f}"
          f" MB), largest part {report['largest_part_mb']:.0f} MB, peak above baseline / largest part = "
          f"{report['peak_above_baseline_over_largest_part']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
