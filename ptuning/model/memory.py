"""Memory report, from the real shapes built on the meta device (no weights, no GPU): MegatronLM-11B, or any
Hugging Face causal/masked LM from its config alone (a folder, a config.json, or a hub id where a hub is reachable):

    python -m model_parallel.memory --config configs/megatron11b.json [--gpu-mem 80] [--relations 41]
    python -m model_parallel.memory --model path/to/Llama-3.1-70B [--config C] [--gpu-mem 80] [--relations 123]

For a Hugging Face model the weights per rank follow its transformers tensor-parallel plan (the layers the plan
shards are divided by the TP size; embeddings, norms and anything else it does not name stay whole on every
rank); a family without a plan is reported at TP 1 only.

For tensor parallel 1, 2, 4 and 8, per rank: the LM's weights (bf16/fp16), each relation's prompt-encoder state
(fp32 parameters, gradients and Adam on the device; its best copy in host memory) with the encoders sharded over
the group (parallel.shard_prompts), the activations a packed step keeps for backward to the prompts (the LM is
frozen: no weight gradients, no optimizer state), and how many relations pack within --gpu-mem. The arithmetic is
ptuning/model/capacity.py's, the same that train.pack_units "auto" uses.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

from model_parallel.megatron import MegatronLM, empty_megatron
from model_parallel.release import MegatronSpec, split_dim
from ptuning.model import capacity
from ptuning.config import ConfigError, load_config
from ptuning.data.templates import default_counts

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
    shape = capacity.Shape(spec.layers, spec.hidden, spec.ffn, spec.heads, spec.vocab_size)
    title = (f"MegatronLM-11B: {spec.layers} layers, hidden {spec.hidden}, FFN {spec.ffn}, {spec.heads} heads, "
             f"vocabulary {spec.vocab_size}")
    return table(title, model, lambda tp: per_rank_parameters(model, tp), (1, 2, 4, 8), shape, counts, encoder_kind,
                 batch, relations, gpu_gib)


def hf_report(name: str, counts: tuple[int, ...], encoder_kind: str, batch: int, relations: int,
              gpu_gib: float) -> str:
    """The same table for a Hugging Face model, built on the meta device from its config."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    from ptuning.model.loading import detect_kind

    config = AutoConfig.from_pretrained(name)
    auto = AutoModelForMaskedLM if detect_kind(config) == "masked" else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config, dtype=torch.bfloat16)
    shape = capacity.shape_of_config(config, model.get_output_embeddings().weight.shape[0])
    plan = {**(getattr(config, "base_model_tp_plan", None) or {}), **(getattr(model, "_tp_plan", None) or {})}
    sizes = (1, 2, 4, 8) if plan else (1,)
    title = (f"{(config.architectures or [config.model_type])[0]}: {shape.layers} layers, hidden {shape.hidden}, "
             f"FFN {shape.ffn}, {shape.heads} heads, vocabulary {shape.vocab}"
             + ("" if plan else "; no transformers tensor-parallel plan for this family: TP 1 only"))
    return table(title, model, lambda tp: planned_parameters(model, plan, tp), sizes, shape, counts, encoder_kind,
                 batch, relations, gpu_gib)


def planned_parameters(model: torch.nn.Module, plan: dict[str, str], tp: int) -> int:
    """Parameters one rank holds under a transformers TP plan: a parameter of a module the plan names (layer
    numbers as '*', the base model's prefix dropped) is divided by tp, any other is whole."""
    import re

    prefix = f"{model.base_model_prefix}." if getattr(model, "base_model_prefix", "") else ""
    total = 0
    for name, p in model.named_parameters():
        module = re.sub(r"\.\d+\.", ".*.", name.rsplit(".", 1)[0])
        module = module[len(prefix):] if module.startswith(prefix) else module
        total += p.numel() // tp if module in plan else p.numel()
    return total


def table(title: str, model: torch.nn.Module, per_rank, sizes, shape: capacity.Shape, counts: tuple[int, ...],
          encoder_kind: str, batch: int, relations: int, gpu_gib: float) -> str:
    count = sum(p.numel() for p in model.parameters())
    encoder_params = capacity.encoder_parameters(sum(counts), shape.hidden, encoder_kind)
    state = capacity.encoder_bytes(encoder_params)
    on_device = capacity.device_encoder_bytes(encoder_params)
    tokens = capacity.step_tokens(counts)
    usable = gpu_gib * GIB * (1 - capacity.RESERVE)
    lines = [title, f"parameters: {count:,} ({count / 1e9:.2f}B)",
             f"prompt encoder ({encoder_kind}, {sum(counts)} pseudo tokens): {encoder_params:,} parameters; per "
             "unit " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in state.items()),
             f"a packed step: {batch} facts per unit, ~{tokens} tokens each; weights in bf16; {gpu_gib:g} GiB per "
             f"GPU, {capacity.RESERVE:.0%} kept back", "",
             f"| tensor parallel | weights per rank | encoders per rank ({relations} units) | encoder state per "
             f"rank | activations per rank | total per rank | units that pack in {gpu_gib:g} GiB |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for tp in sizes:
        weights = per_rank(tp) * 2
        held = math.ceil(relations / tp)
        activations = capacity.activation_bytes(shape, batch, tokens, tp, 2)
        total = weights + held * on_device + relations * activations
        fit = capacity.units_that_fit(int(usable - weights), on_device, activations, tp)
        lines.append(f"| {tp} | {weights / GIB:.1f} GiB | {held} | {held * on_device / GIB:.1f} GiB | "
                     f"{relations * activations / GIB:.1f} GiB | {total / GIB:.1f} GiB | {fit} |")
    lines += ["", "Host memory per rank holds the best-epoch copies: "
              f"{math.ceil(relations / sizes[-1]) * state['best copy (host)'] / GIB:.1f} GiB at TP {sizes[-1]}, "
              f"{relations * state['best copy (host)'] / GIB:.1f} GiB at TP 1. A unit's checkpoint (encoder, "
              f"Adam, best copy) is {(state['parameters'] + state['adam'] + state['best copy (host)']) / GIB:.1f} "
              "GiB, written every output.checkpoint_minutes."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="experiment config: template, encoder and train.batch_size set the report")
    parser.add_argument("--model", help="a Hugging Face model (folder, config.json or hub id): its config alone is "
                                        "read (default: MegatronLM-11B)")
    parser.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU (default 80)")
    parser.add_argument("--relations", type=int, default=41,
                        help="units to pack (default: LAMA's 41 relations; x seeds in a sweep)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.model is None:
        counts = tuple(cfg.prompt.template or default_counts("causal"))
        print(report(MegatronSpec(), counts, cfg.prompt.encoder, cfg.train.batch_size, args.relations, args.gpu_mem))
        return 0
    from transformers import AutoConfig

    from ptuning.model.loading import detect_kind

    source = args.model[:-len("config.json")] or "." if args.model.endswith("config.json") else args.model
    try:
        kind = detect_kind(AutoConfig.from_pretrained(source))
    except (OSError, ValueError) as error:
        print(f"error: --model {args.model}: cannot read its config ({str(error).splitlines()[0]})", file=sys.stderr)
        return 2
    counts = tuple(cfg.prompt.template or default_counts(kind))
    print(hf_report(source, counts, cfg.prompt.encoder, cfg.train.batch_size, args.relations, args.gpu_mem))
    return 0

