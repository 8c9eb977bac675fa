"""fairseq's MegatronLM-11B release, read without fairseq (fairseq 0.12.2 does not import on Python 3.11).

The archive holds dict.txt and model-model_part-{0..7}.pt; each part is a dict with `args` (argparse.Namespace)
and `model` (tensors split for model-parallel size 8, fairseq names under `decoder.`). Parts are loaded with
torch.load(weights_only=True) under torch.serialization.safe_globals([argparse.Namespace]): no fairseq class, no
arbitrary pickle.

How each tensor is split across the 8 parts (and so how it merges and re-splits):
  column-parallel, joined on dim 0: embed_tokens, q/k/v_proj weight and bias, fc1 weight and bias
  row-parallel, joined on dim 1:    out_proj.weight, fc2.weight
  replicated (taken from part 0):   LayerNorms, out_proj.bias, fc2.bias
  dropped:                          embed_positions._float_tensor, version (sinusoidal positions are recomputed),
                                    output_projection.weight once checked equal to embed_tokens.weight (fairseq
                                    >= 0.10 saves the tied projection under its own name too)

Args that change the forward and that the module does not implement (learned or no positions, an embedding
LayerNorm, no final LayerNorm, adaptive input/softmax, ...) are refused when the args are read, before any weight
is, with the arg named (UNSUPPORTED); none is silently ignored.
"""
from __future__ import annotations

import argparse
import pickle
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

N_PARTS = 8
PART = "model-model_part-{}.pt"
PREFIX = "decoder."
COLUMN = re.compile(r"(embed_tokens\.weight|self_attn\.[qkv]_proj\.(weight|bias)|"
                    r"fc1\.(weight|bias))$")
ROW = re.compile(r"(self_attn\.out_proj\.weight|fc2\.weight)$")
DROPPED = re.compile(r"(embed_positions\._float_tensor|version)$")
TIED = "output_projection.weight"

# fairseq args the module does not implement: (arg, the value the module implements, what it would change)
UNSUPPORTED = (
    ("no_token_positional_embeddings", False, "no positional embeddings"),
    ("decoder_learned_pos", False, "learned positional embeddings"),
    ("layernorm_embedding", False, "a LayerNorm after the embeddings"),
    ("no_decoder_final_norm", False, "no final LayerNorm"),
    ("decoder_final_norm", True, "no final LayerNorm"),
    ("adaptive_input", False, "adaptive input embeddings"),
    ("adaptive_softmax_cutoff", None, "an adaptive softmax"),
    ("character_embeddings", False, "character embeddings"),
    ("quant_noise_pq", 0, "quantization noise"),
    ("decoder_layerdrop", 0, "layer drop"),
    ("decoder_layers_to_keep", None, "pruned layers"),
    ("base_layers", 0, "BASE layers"),
    ("scale_fc", False, "NormFormer's FFN LayerNorm"),
    ("scale_attn", False, "NormFormer's attention LayerNorm"),
    ("scale_heads", False, "NormFormer's head scaling"),
    ("scale_resids", False, "NormFormer's residual scaling"),
    ("cross_self_attention", False, "cross+self attention"),
)


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
    # fairseq's dropout rates (transformer_lm_megatron_11b: 0.1, 0.1, 0); active only in train mode, which the
    # reference protocol's lm_dropout turns on while prompts train
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0

    @classmethod
    def from_args(cls, args: argparse.Namespace, vocab_size: int) -> "MegatronSpec":
        get = lambda key, default: getattr(args, key, default)  # noqa: E731
        if hasattr(args, "no_tie_adaptive_proj"):  # fairseq reads this as an old checkpoint without a final norm
            raise ReleaseError("args.no_tie_adaptive_proj is set: fairseq builds such an old checkpoint without a "
                               "final LayerNorm, which this module does not implement")
        for key, implemented, meaning in UNSUPPORTED:
            value = get(key, implemented)
            if value != implemented and not (implemented in (0, None) and not value):
                raise ReleaseError(f"args.{key}={value!r}: {meaning}, which this module does not implement")
        for key in ("decoder_input_dim", "decoder_output_dim"):
            if get(key, None) not in (None, get("decoder_embed_dim", 3072)):
                raise ReleaseError(f"args.{key}={get(key, None)!r}: a projection around the decoder (decoder_embed_dim "
                                   f"is {get('decoder_embed_dim', 3072)}), which this module does not implement")
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
                   scale_embedding=not get("no_scale_embedding", False), dropout=float(get("dropout", 0.1)),
                   attention_dropout=float(get("attention_dropout", 0.1)),
                   activation_dropout=float(get("activation_dropout", None) or get("relu_dropout", 0.0)))

    def to_dict(self) -> dict:
        return asdict(self)


def load_part(path: Path, vocab_size: int | None = None) -> tuple[argparse.Namespace, dict[str, torch.Tensor]]:
    """A part's args and its decoder tensors by our names. With vocab_size (part 0, read_spec) the args are
    checked before any tensor is touched: with mmap, torch.load has read only the pickle by then."""
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
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        if found:  # a whole file that holds a class the weights-only load will not run
            raise ReleaseError(f"{path}: holds a {found.group(1)} object, which a weights-only load refuses to "
                               "build (no code from a checkpoint runs here); the release as published holds only "
                               "tensors and argparse args: re-save the part with only those") from None
        raise ReleaseError(f"{path}: cannot read it (UnpicklingError: {str(error).splitlines()[0]}); a truncated "
                           "download? check its size and fetch it again") from None
    except Exception as error:  # a truncated file, or not a checkpoint at all
        raise ReleaseError(f"{path}: cannot read it ({type(error).__name__}: {str(error).splitlines()[0]}); "
                           "a truncated download? check its size and fetch it again") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or not ("args" in checkpoint or
                                                                          "cfg" in checkpoint):
        raise ReleaseError(f"{path}: not a fairseq checkpoint (expected a dict with 'args' or 'cfg', and 'model')")
    args = checkpoint.get("args")
    cfg = checkpoint.get("cfg")
    if args is None and isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
        args = argparse.Namespace(**cfg["model"])  # fairseq >= 0.10's trainer saves args: None, cfg: {model: ...}
    if not isinstance(args, argparse.Namespace):
        raise ReleaseError(f"{path}: 'args' is a {type(args).__name__}, not fairseq's argparse.Namespace")
    if vocab_size is not None:
        MegatronSpec.from_args(args, vocab_size)
    if not isinstance(checkpoint["model"], dict):
        raise ReleaseError(f"{path}: 'model' is a {type(checkpoint['model']).__name__}, not a dict of tensors")
    model = {k[len(PREFIX):]: v for k, v in checkpoint["model"].items() if k.startswith(PREFIX) and kept(k)}
    if "embed_tokens.weight" not in model:
        raise ReleaseError(f"{path}: no decoder.embed_tokens.weight; not a fairseq transformer LM")
    if TIED in model:  # the same slice of the same vocabulary in every part: equal slices, equal merged tables
        if not torch.equal(model[TIED], model["embed_tokens.weight"]):
            raise ReleaseError(f"{path}: decoder.{TIED} differs from decoder.embed_tokens.weight: an untied output "
                               "projection, which this module does not implement")
        del model[TIED]
    return args, model


def dictionary_size(release: Path) -> int:
    """fairseq's Dictionary: <s>, <pad>, </s>, <unk>, then one '<symbol> <count> [#fairseq:overwrite]' line each."""
    path = release / "dict.txt"
    if not path.is_file():
        raise ReleaseError(f"{path}: missing (the release's dictionary)")
    from ptuning.files import DataError, read_text

    try:
        lines = read_text(path).splitlines()
    except DataError as error:
        raise ReleaseError(str(error)) from None
    count = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.rstrip().rsplit(" ", 2 if line.rstrip().endswith("#fairseq:overwrite") else 1)
        if len(fields) < 2 or not fields[1].lstrip("-").isdigit():
            raise ReleaseError(f"{path}, line {number}: expected '<symbol> <count>', got {line.strip()[:40]!r}")
        count += 1
    return 4 + count


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
    symbols = dictionary_size(release)
    args, part0 = load_part(release / PART.format(0), vocab_size=symbols)
    size = getattr(args, "model_parallel_size", N_PARTS)
    if size != N_PARTS:
        raise ReleaseError(f"{release}: args.model_parallel_size is {size}; the release is split in {N_PARTS}")
    vocab = part0["embed_tokens.weight"].shape[0] * N_PARTS
    if symbols > vocab:
        raise ReleaseError(f"{release / 'dict.txt'}: {symbols} symbols, more than the {vocab} embedding rows")
    shapes = {}
    for name, tensor in part0.items():
        shape = list(tensor.shape)
        dim = split_dim(name)
        if dim is not None:
            shape[dim] *= N_PARTS
        shapes[name] = (torch.Size(shape), tensor.dtype)
    return MegatronSpec.from_args(args, vocab), shapes
