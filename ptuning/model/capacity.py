"""How many units (relations under one variant each) pack on one device: the arithmetic behind train.pack_units
"auto" and the memory report (python -m model_parallel.memory).

Per rank, for k units packed, with the prompt encoders sharded over a tensor-parallel group of size tp:

    weights                                  the LM's share on this rank (frozen: no gradients, no optimizer)
    + ceil(k / tp) x encoder state           fp32 parameters, gradients and Adam's two moments (16 bytes per
                                             parameter); the best-epoch copy lives in host memory
    + k x activations of one unit's step     what backward to the prompts keeps, for train.batch_size facts
    <= usable memory                         the device's free memory after loading, less a reserve

The sum is an upper bound (gradients and activations never peak together); `make gpu-check` measures the real
peak beside it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ptuning.model.backbone import backbone_dtype
from ptuning.model.encoders import PromptEncoder
from ptuning.data.templates import default_counts

GIB = 2**30
RESERVE = 0.10  # of the device's memory: the CUDA context, allocator fragmentation, kernels' workspaces


@dataclass(frozen=True)
class Shape:
    """What the activation estimate needs of a transformer."""
    layers: int
    hidden: int
    ffn: int
    heads: int
    vocab: int


def shape_of(backbone) -> Shape:
    spec = getattr(backbone.model, "spec", None)
    if spec is not None:  # Megatron-11B
        return Shape(spec.layers, spec.hidden, spec.ffn, spec.heads, spec.vocab_size)
    return shape_of_config(backbone.model.config, backbone.vocab_size)


def shape_of_config(config, vocab: int) -> Shape:
    """A Hugging Face config's transformer shape (the names differ between families)."""
    get = lambda *names, default=None: next((getattr(config, n) for n in names if getattr(config, n, None)),  # noqa
                                            default)
    hidden = get("hidden_size", "n_embd", "d_model", "dim")
    return Shape(layers=get("num_hidden_layers", "n_layer", "num_layers", "n_layers"), hidden=hidden,
                 ffn=get("intermediate_size", "n_inner", "ffn_dim", "hidden_dim", default=4 * hidden),
                 heads=get("num_attention_heads", "n_head", "num_heads", "n_heads"), vocab=vocab)


def encoder_parameters(n_pseudo: int, hidden: int, kind: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in PromptEncoder(n_pseudo, hidden, kind).parameters())


def encoder_bytes(parameters: int) -> dict[str, int]:
    """One unit's encoder state, fp32."""
    return {"parameters": 4 * parameters, "gradients": 4 * parameters, "adam": 8 * parameters,
            "best copy (host)": 4 * parameters}


def device_encoder_bytes(parameters: int) -> int:
    return sum(v for k, v in encoder_bytes(parameters).items() if "host" not in k)


def activation_bytes(shape: Shape, facts: int, tokens: int, tp: int, bytes_per: int) -> int:
    """Per rank, what autograd keeps for backward to the inputs through a FROZEN layer, for `facts` facts of
    `tokens` tokens: the two LayerNorms' inputs, this rank's q/k/v and attention output (fused attention keeps no
    probabilities), and fc1's output for GELU's backward (a frozen linear layer keeps only its weight); and the
    fp32 logits at the targets with their gradient. Fitted to an H100 run at 11B (docs/BENCHMARKS.md): with the
    encoder state it matched the peak for 1 relation and was above it for 8 and 17."""
    per_token = (2 * shape.hidden + 4 * shape.hidden // tp + shape.ffn // tp) * bytes_per
    return shape.layers * facts * tokens * per_token + 2 * facts * (shape.vocab // tp) * 4


@dataclass(frozen=True)
class Plan:
    units: int | None  # the most that fit; None: no limit known (CPU memory is not the constraint)
    reason: str


def units_that_fit(usable: int, encoder: int, activations: int, tp: int, limit: int = 10_000) -> int:
    """The largest k with ceil(k / tp) x encoder + k x activations <= usable (0 if not even one)."""
    k = 0
    while k < limit and math.ceil((k + 1) / tp) * encoder + (k + 1) * activations <= usable:
        k += 1
    return k


def step_tokens(counts: tuple[int, ...]) -> int:
    """Tokens of one fact: the pseudo tokens plus a LAMA subject and specials (subjects are short: 8 is above the
    95th percentile with GPT-2's BPE)."""
    return sum(counts) + 8


def plan_for(backbone, cfg, tp_shards: int) -> Plan:
    """How many units fit on the backbone's device, as it is now (weights loaded)."""
    device = backbone.device
    if device.type != "cuda":
        return Plan(None, f"on {device.type}, every unit packs")
    free, total = torch.cuda.mem_get_info(device)
    usable = free - int(RESERVE * total)
    shape = shape_of(backbone)
    counts = tuple(cfg.prompt.template or default_counts(backbone.kind))
    encoder = device_encoder_bytes(encoder_parameters(sum(counts), backbone.hidden_size, cfg.prompt.encoder))
    bytes_per = 4 if backbone_dtype(backbone) == torch.float32 else 2
    tp = getattr(backbone.model, "tp", 1)
    activations = activation_bytes(shape, cfg.train.batch_size, step_tokens(counts), tp, bytes_per)
    k = units_that_fit(usable, encoder, activations, tp_shards)
    return Plan(k, f"{free / GIB:.1f} GiB free of {total / GIB:.1f} GiB, {RESERVE:.0%} kept back; per unit "
                   f"{encoder / GIB:.2f} GiB of encoder state (on 1 of {tp_shards} ranks) and "
                   f"{activations / GIB:.2f} GiB of activations")


def pack_size(units: list, backbone, cfg, parallel, sharded: bool, progress) -> int | None:
    """How many units train together, where that is decided here: one at a time while the LM trains; with
    train.pack_units "auto" as many as the device's memory holds (for the largest encoder among the units'
    variants; every unit on a CPU), agreed across the tensor-parallel group. None: the packs stand as assigned."""
    if cfg.train.tunes_lm:
        return 1
    if cfg.train.pack_units != "auto":
        return None
    shards = parallel.tp_size if sharded else 1
    plans = [plan_for(backbone, variant_cfg, shards)
             for variant_cfg in {id(u.variant): u.variant.cfg for u in units}.values()]
    plan = min(plans, key=lambda p: p.units if p.units is not None else float("inf"))
    chosen = min(len(units), plan.units) if plan.units is not None else len(units)
    chosen = parallel.agree(chosen, "min")  # peers' free memory may differ; their packs may not
    progress(f"pack_units auto: {max(1, chosen)} of {len(units)} units per pack ({plan.reason})"
             + ("; WARNING: by this estimate not even one fits, trying one" if chosen < 1 else ""))
    return max(1, chosen)
