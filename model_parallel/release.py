"""fairseq's MegatronLM-11B release, read without fairseq (fairseq 0.12.2 does not import on Python 3.11).

The archive holds dict.txt and model-model_part-{0..7}.pt; each part is a dict with `args` (argparse.Namespace)
and `model` (tensors split for model-parallel size 8, fairseq names under `decoder.`). Parts are loaded with
torch.load(weights_only=True) under torch.serialization.safe_globals([argparse.Namespace]): no fairseq class, no
arbitrary pickle.

How each tensor is split across the 8 parts (and so how it merges and re-splits):
  column-parallel, joined on dim 0: embed_tokens, output_projection, q/k/v_proj weight and bias, fc1 weight and bias
  row-parallel, joined on dim 1:    out_proj.weight, fc2.weight
  replicated (taken from part 0):   LayerNorms, out_proj.bias, fc2.bias
  dropped:                          embed_positions._float_tensor, version (sinusoidal positions are recomputed)
"""
from __future__ import annotations

import argparse
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

N_PARTS = 8
PART = "model-model_part-{}.pt"
PREFIX = "decoder."
COLUMN = re.compile(r"(embed_tokens\.weight|output_projection\.weight|self_attn\.[qkv]_proj\.(weight|bias)|"
                    r"fc1\.(weight|bias))$")
ROW = re.compile(r"(self_attn\.out_proj\.weight|fc2\.weight)$")
DROPPED = re.compile(r"(embed_positions\._float_tensor|version)$")


class ReleaseError(ValueError):
    """A missing, truncated or mismatched part; the message names the file."""


def split_dim(name: str) -> int | None:
    """0 for column-parallel tensors, 1 for row-parallel ones, None for replicated ones."""
    if COLUMN.search(name):
        return 0
    if ROW.search(name):
        return 1
    return None


def kept(name: str) -> bool:
    return not DROPPED.search(name)


@dataclass(frozen=True)
class MegatronSpec:
    """The architecture, from a checkpoint's args (fairseq transformer_lm_megatron_11b defaults where absent)."""

    layers: int = 72
    hidden: int = 3072
    ffn: int = 18432
    heads: int = 32
    vocab_size: int = 51200  # the dictionary padded to a multiple of the model-parallel size
    max_positions: int = 1024
    padding_idx: int = 1
    scale_embedding: bool = True  # embeddings times sqrt(hidden), unless args.no_scale_embedding
    activation: str = "gelu"

    @classmethod
    def from_args(cls, args: argparse.Namespace, vocab_size: int) -> "MegatronSpec":
        get = lambda key, default: getattr(args, key, default)  # noqa: E731
        activation = get("activation_fn", "gelu")
        if activation != "gelu":
            raise ReleaseError(f"activation_fn {activation!r}: only gelu (Megatron-11B) is implemented")
        if not get("decoder_normalize_before", True):
            raise ReleaseError("decoder_normalize_before is false: only the pre-LayerNorm model is implemented")
        if not get("share_decoder_input_output_embed", True):
            raise ReleaseError("share_decoder_input_output_embed is false: only the tied output projection "
                               "(Megatron-11B) is implemented")
        return cls(layers=get("decoder_layers", 72), hidden=get("decoder_embed_dim", 3072),
                   ffn=get("decoder_ffn_embed_dim", 18432), heads=get("decoder_attention_heads", 32),
                   vocab_size=vocab_size,
                   max_positions=get("max_target_positions", None) or get("tokens_per_sample", 1024),
                   scale_embedding=not get("no_scale_embedding", False))

    def to_dict(self) -> dict:
        return asdict(self)


def load_part(path: Path) -> tuple[argparse.Namespace, dict[str, torch.Tensor]]:
    if not path.is_file():
        raise ReleaseError(f"{path}: missing; the release has {N_PARTS} parts, {PART.format('{0..7}')}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                if "mmap" not in str(error):
                    raise
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as error:  # a truncated file, or not a checkpoint at all
        raise ReleaseError(f"{path}: cannot read it ({type(error).__name__}: {str(error).splitlines()[0]}); "
                           "a truncated download? check its size and fetch it again") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "args" not in checkpoint:
        raise ReleaseError(f"{path}: not a fairseq checkpoint (expected a dict with 'args' and 'model')")
    model = {k[len(PREFIX):]: v for k, v in checkpoint["model"].items() if k.startswith(PREFIX) and kept(k)}
    if "embed_tokens.weight" not in model:
        raise ReleaseError(f"{path}: no decoder.embed_tokens.weight; not a fairseq transformer LM")
    return checkpoint["args"], model


def dictionary_size(release: Path) -> int:
    """fairseq's Dictionary: <s>, <pad>, </s>, <unk>, then one symbol per line of dict.txt."""
    path = release / "dict.txt"
    if not path.is_file():
        raise ReleaseError(f"{path}: missing (the release's dictionary)")
    return 4 + sum(1 for line in path.open(encoding="utf-8") if line.strip())


def check_part(path: Path, reference: dict[str, torch.Size], model: dict[str, torch.Tensor]) -> None:
    """Same names and shapes as part 0: parts of one release differ only in their values."""
    missing, extra = set(reference) - set(model), set(model) - set(reference)
    if missing or extra:
        raise ReleaseError(f"{path}: tensor names differ from part 0 (missing {sorted(missing)[:3]}, "
                           f"extra {sorted(extra)[:3]})")
    for name, shape in reference.items():
        if model[name].shape != shape:
            raise ReleaseError(f"{path}: {name} has shape {tuple(model[name].shape)}, part 0 has {tuple(shape)}")


def read_spec(release: Path) -> tuple[MegatronSpec, dict[str, tuple[torch.Size, torch.dtype]]]:
    """The architecture and every merged tensor's shape and dtype, from part 0 and dict.txt."""
    args, part0 = load_part(release / PART.format(0))
    size = getattr(args, "model_parallel_size", N_PARTS)
    if size != N_PARTS:
        raise ReleaseError(f"{release}: args.model_parallel_size is {size}; the release is split in {N_PARTS}")
    vocab = part0["embed_tokens.weight"].shape[0] * N_PARTS
    if dictionary_size(release) > vocab:
        raise ReleaseError(f"{release / 'dict.txt'}: {dictionary_size(release)} symbols, more than the "
                           f"{vocab} embedding rows")
    shapes = {}
    for name, tensor in part0.items():
        shape = list(tensor.shape)
        dim = split_dim(name)
        if dim is not None:
            shape[dim] *= N_PARTS
        shapes[name] = (torch.Size(shape), tensor.dtype)
    return MegatronSpec.from_args(args, vocab), shapes
