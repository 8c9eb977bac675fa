"""Memory report for MegatronLM-11B, from the real shapes built on the meta device (no weights, no GPU):

    python -m model_parallel.memory --config configs/megatron11b.json [--gpu-mem 80] [--relations 41]

For tensor parallel 1, 2, 4 and 8, per rank: the LM's weights (bf16/fp16), each relation's prompt-encoder state
(fp32 parameters, gradients and Adam on the device; its best copy in host memory) with the encoders sharded over
the group (parallel.shard_prompts), the activations a packed step keeps for backward to the prompts (the LM is
frozen: no weight gradients, no optimizer state), and how many relations pack within --gpu-mem. The arithmetic is
ptuning/capacity.py's, the same that train.pack_units "auto" uses.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

from model_parallel.model import MegatronLM, empty_megatron
from model_parallel.release import MegatronSpec, split_dim
from ptuning import capacity
from ptuning.config import ConfigError, load_config
from ptuning.templates import default_counts

GIB = 2**30


def per_rank_parameters(model: MegatronLM, tp: int) -> int:
    """Parameters one rank holds: split tensors divided by tp, replicated ones whole."""
    total = 0
    for name, p in model.named_parameters():
        total += p.numel() // tp if split_dim(name) is not None else p.numel()
    return total


def report(spec: MegatronSpec, counts: tuple[int, ...], encoder_kind: str, batch: int, relations: int,
           gpu_gib: float) -> str:
    model = empty_megatron(spec, 1, torch.bfloat16)
    count = sum(p.numel() for p in model.parameters())
    shape = capacity.Shape(spec.layers, spec.hidden, spec.ffn, spec.heads, spec.vocab_size)
    encoder_params = capacity.encoder_parameters(sum(counts), spec.hidden, encoder_kind)
    state = capacity.encoder_bytes(encoder_params)
    on_device = capacity.device_encoder_bytes(encoder_params)
    tokens = capacity.step_tokens(counts)
    usable = gpu_gib * GIB * (1 - capacity.RESERVE)
    lines = [f"MegatronLM-11B: {spec.layers} layers, hidden {spec.hidden}, FFN {spec.ffn}, {spec.heads} heads, "
             f"vocabulary {spec.vocab_size}",
             f"parameters: {count:,} ({count / 1e9:.2f}B)",
             f"prompt encoder ({encoder_kind}, {sum(counts)} pseudo tokens): {encoder_params:,} parameters; per "
             "relation " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in state.items()),
             f"a packed step: {batch} facts per relation, ~{tokens} tokens each; {gpu_gib:g} GiB per GPU, "
             f"{capacity.RESERVE:.0%} kept back", "",
             f"| tensor parallel | weights per rank | encoders per rank ({relations} relations) | encoder state per "
             f"rank | activations per rank | total per rank | relations that pack in {gpu_gib:g} GiB |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for tp in (1, 2, 4, 8):
        weights = per_rank_parameters(model, tp) * 2
        held = math.ceil(relations / tp)
        activations = capacity.activation_bytes(shape, batch, tokens, tp, 2)
        total = weights + held * on_device + relations * activations
        fit = capacity.units_that_fit(int(usable - weights), on_device, activations, tp)
        lines.append(f"| {tp} | {weights / GIB:.1f} GiB | {held} | {held * on_device / GIB:.1f} GiB | "
                     f"{relations * activations / GIB:.1f} GiB | {total / GIB:.1f} GiB | {fit} |")
    lines += ["", "Host memory per rank holds the best-epoch copies: "
              f"{math.ceil(relations / 8) * state['best copy (host)'] / GIB:.1f} GiB at TP 8, "
              f"{relations * state['best copy (host)'] / GIB:.1f} GiB at TP 1. A relation's checkpoint (encoder, "
              f"Adam, best copy) is {(state['parameters'] + state['adam'] + state['best copy (host)']) / GIB:.1f} "
              "GiB, written every output.checkpoint_minutes."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="experiment config: template, encoder and train.batch_size set the report")
    parser.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU (default 80)")
    parser.add_argument("--relations", type=int, default=41, help="relations to pack (default: LAMA's 41)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    counts = tuple(cfg.prompt.template or default_counts("causal"))
    print(report(MegatronSpec(), counts, cfg.prompt.encoder, cfg.train.batch_size, args.relations, args.gpu_mem))
    return 0


if __name__ == "__main__":
    sys.exit(main())
