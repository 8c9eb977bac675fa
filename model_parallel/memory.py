"""Memory report for MegatronLM-11B, from the real shapes built on the meta device (no weights, no GPU):

    python -m model_parallel.memory --config configs/megatron11b.json

Prints the parameter count, the bytes each rank holds at tensor parallel 1, 2, 4 and 8 in bf16/fp16, and an
estimate of the activations a P-tuning step keeps for backward (to the inputs only: the LM is frozen, so its
weight gradients and optimizer state cost nothing).
"""
from __future__ import annotations

import argparse
import sys

import torch

from model_parallel.model import MegatronLM
from model_parallel.release import MegatronSpec, split_dim
from ptuning.config import ConfigError, load_config
from ptuning.templates import default_counts

GIB = 2**30


def per_rank_parameters(model: MegatronLM, tp: int) -> int:
    """Parameters one rank holds: split tensors divided by tp, replicated ones whole."""
    total = 0
    for name, p in model.named_parameters():
        total += p.numel() // tp if split_dim(name) is not None else p.numel()
    return total


def activation_bytes(spec: MegatronSpec, batch: int, seq: int, tp: int, bytes_per: int = 2) -> int:
    """Per rank, what autograd keeps per layer for backward to the inputs: LayerNorm inputs and outputs, q/k/v,
    the attention probabilities (heads split over tp), the attention output, fc1 input/output and GELU output."""
    bsh = batch * seq * spec.hidden
    per_layer = (4 * bsh  # two LayerNorms' inputs and outputs
                 + 3 * bsh // tp  # q, k, v of this rank's heads
                 + batch * (spec.heads // tp) * seq * seq  # attention probabilities
                 + bsh // tp  # attention output before out_proj
                 + 2 * batch * seq * spec.ffn // tp)  # fc1 output and GELU output
    return spec.layers * per_layer * bytes_per + batch * spec.vocab_size // tp * 4  # + fp32 target logits


def report(spec: MegatronSpec, batch: int, seq: int) -> str:
    with torch.device("meta"):
        model = MegatronLM(spec, tp=1, dtype=torch.bfloat16, device="meta")
    count = sum(p.numel() for p in model.parameters())
    lines = [f"MegatronLM-11B: {spec.layers} layers, hidden {spec.hidden}, FFN {spec.ffn}, {spec.heads} heads, "
             f"vocabulary {spec.vocab_size}",
             f"parameters: {count:,} ({count / 1e9:.2f}B)", "",
             "| tensor parallel | parameters per rank | weights per rank, bf16/fp16 | activations per rank "
             f"(batch {batch}, {seq} tokens, bf16) |",
             "|---:|---:|---:|---:|"]
    for tp in (1, 2, 4, 8):
        params = per_rank_parameters(model, tp)
        lines.append(f"| {tp} | {params / 1e9:.2f}B | {params * 2 / GIB:.1f} GiB | "
                     f"{activation_bytes(spec, batch, seq, tp) / GIB:.2f} GiB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="experiment config: train.batch_size and the template set the estimate")
    parser.add_argument("--seq", type=int, default=24, help="tokens per prompt (LAMA prompts are short)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    counts = cfg.prompt.template or default_counts("causal")
    seq = max(args.seq, sum(counts) + 8)
    # pack_relations relations train together, each with a micro-batch of batch_size
    batch = cfg.train.batch_size * max(1, cfg.train.pack_relations or 1)
    print(report(MegatronSpec(), batch, seq))
    print(f"\nbatch = train.batch_size x train.pack_relations = {batch}; {seq} tokens per row "
          f"(template {list(counts)} plus subject)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
