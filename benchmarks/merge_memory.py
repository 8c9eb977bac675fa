"""Peak resident memory of the streaming merge (python -m model_parallel.merge) on a synthetic 8-part release of
over 1 GB, against the size of its largest part. Target: peak above the process's baseline <= 1.5x that part.

    python benchmarks/merge_memory.py [--layers 16] [--hidden 1024] [--dir /tmp]

The parts are written one at a time in the release's layout (fairseq names, Namespace args, dict.txt), with
Megatron-11B's vocabulary (51,200) and FFN ratio (6x); the merge runs in a fresh process so its peak RSS is its own.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from model_parallel.release import N_PARTS, PART


def write_synthetic_release(folder: Path, layers: int, hidden: int, vocab: int = 51200) -> int:
    ffn, heads = 6 * hidden, hidden // 64
    args = argparse.Namespace(decoder_layers=layers, decoder_embed_dim=hidden, decoder_ffn_embed_dim=ffn,
                              decoder_attention_heads=heads, activation_fn="gelu", decoder_normalize_before=True,
                              model_parallel_size=N_PARTS, max_target_positions=1024,
                              share_decoder_input_output_embed=True)
    folder.mkdir(parents=True)
    (folder / "dict.txt").write_text("".join(f"{i} 1\n" for i in range(4, 50265)))
    h8, f8 = hidden // N_PARTS, ffn // N_PARTS
    for part in range(N_PARTS):
        model = {"decoder.embed_tokens.weight": torch.randn(vocab // N_PARTS, hidden),
                 "decoder.embed_positions._float_tensor": torch.tensor([]), "decoder.version": torch.tensor([3.0]),
                 "decoder.layer_norm.weight": torch.ones(hidden), "decoder.layer_norm.bias": torch.zeros(hidden)}
        for i in range(layers):
            p = f"decoder.layers.{i}."
            for proj in ("q", "k", "v"):
                model[p + f"self_attn.{proj}_proj.weight"] = torch.randn(h8, hidden)
                model[p + f"self_attn.{proj}_proj.bias"] = torch.randn(h8)
            model[p + "self_attn.out_proj.weight"] = torch.randn(hidden, h8)
            model[p + "self_attn.out_proj.bias"] = torch.randn(hidden)
            model[p + "fc1.weight"], model[p + "fc1.bias"] = torch.randn(f8, hidden), torch.randn(f8)
            model[p + "fc2.weight"], model[p + "fc2.bias"] = torch.randn(hidden, f8), torch.randn(hidden)
            for norm in ("self_attn_layer_norm", "final_layer_norm"):
                model[p + norm + ".weight"], model[p + norm + ".bias"] = torch.ones(hidden), torch.zeros(hidden)
        torch.save({"args": args, "model": model}, folder / PART.format(part))
        del model
    return sum((folder / PART.format(i)).stat().st_size for i in range(N_PARTS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--dir", default=None, help="where to write the ~2 GB of release and merge")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        release = Path(tmp) / "release"
        start = time.perf_counter()
        total = write_synthetic_release(release, args.layers, args.hidden)
        print(f"synthetic release: {args.layers} layers, hidden {args.hidden}, 8 parts, {total / 2**30:.2f} GiB "
              f"({time.perf_counter() - start:.0f} s to write)")
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "model_parallel.merge", "--src", str(release), "--dst",
                               str(Path(tmp) / "merged"), "--shard-gb", "0.5"], capture_output=True, text=True)
        print(proc.stdout.strip() or proc.stderr.strip())
        print(f"merge wall time: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
