"""The Megatron-11B backbone: the same seam as HFBackbone (embed, scores at target positions), with logits that
stay vocab-parallel under tensor parallelism: each rank returns its slice of the vocabulary and a VocabShard
saying which, and the loss and the restricted ranks reduce across the group without gathering (ptuning/model/metrics.py).

Where the weights come from:
  the fairseq release (8 parts)   tensor_parallel 8: rank i loads part i as it is, no merge
  a merged folder (merge.py)      tensor_parallel 1, 2, 4 (or 8): each rank reads only its slice of the
                                  memory-mapped safetensors; 1 is the single-GPU model (bf16/fp16, ~22 GB)
Either way the module is built on the meta device and given each tensor as it is read, copied once to its device
and dtype (model.load_weights): nothing is initialised only to be overwritten, and a GPU load holds one tensor in
host memory at a time.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from model_parallel.merge import INDEX, read_merged_json, read_merged_spec
from model_parallel.megatron import MegatronLM, empty_megatron, load_weights
from model_parallel.release import N_PARTS, PART, ReleaseError, load_part, read_spec, split_dim
from ptuning.model.backbone import Layout, attention_kernels

DEFAULT_TOKENIZER = "FacebookAI/roberta-large"  # GPT-2 BPE in fairseq dict.txt order: RoBERTa's ids


@dataclass(frozen=True)
class VocabShard:
    start: int  # this rank's first vocabulary id
    end: int
    group: Any  # the tensor-parallel process group to reduce over


def is_release(folder: Path) -> bool:
    return (folder / PART.format(0)).is_file()


def is_merged(folder: Path) -> bool:
    return (folder / INDEX).is_file()


def read_merged_shard(folder: Path, tp: int, rank: int) -> Iterator[tuple[str, torch.Tensor]]:
    """This rank's slice of every tensor, one at a time, memory-mapped from the safetensors (only the slice is
    read). Each tensor is opened on its own so that its pages leave memory with it: one mapping per file would
    keep every page read so far resident until the whole file is done."""
    weight_map = read_merged_json(folder / INDEX).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ReleaseError(f"{folder / INDEX}: field 'weight_map' is missing or not an object")
    for name, filename in weight_map.items():
        dim = split_dim(name)
        try:
            with safe_open(folder / filename, framework="pt") as handle:
                if tp == 1 or dim is None:
                    tensor = handle.get_tensor(name)
                else:
                    view = handle.get_slice(name)
                    size = view.get_shape()[dim] // tp
                    cut = slice(rank * size, (rank + 1) * size)
                    tensor = view[cut] if dim == 0 else view[:, cut]
        except (SafetensorError, OSError) as error:  # a truncated or missing shard
            raise ReleaseError(f"{folder / filename}: cannot read {name} ({error}); a truncated copy? merge "
                               "again") from None
        yield name, tensor


class MegatronBackbone:
    kind = "causal"
    trainable_lm = False  # 11B: prompts only
    head_splits = True
    packs_rows = True  # our own module takes any layout

    def __init__(self, model: MegatronLM, tokenizer, tp_rank: int = 0, group: Any = None, bf16: bool = False):
        self.model, self.tokenizer, self.bf16 = model, tokenizer, bf16
        self.device = next(model.parameters()).device
        self.hidden_size = model.spec.hidden
        self.vocab_size = model.spec.vocab_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.spec.padding_idx
        self.padding_side = "left"
        per_rank = model.spec.vocab_size // model.tp
        self.vocab_shard = (VocabShard(tp_rank * per_rank, (tp_rank + 1) * per_rank, group) if model.tp > 1
                            else None)
        self.freeze()

    def freeze(self) -> None:
        self.model.eval()  # no dropout in the frozen model
        self.model.requires_grad_(False)

    def dropout(self, active: bool) -> None:
        """Train mode (fairseq's dropout on) or eval mode; the weights stay frozen either way."""
        self.model.train(active)

    @property
    def embedding_std(self) -> float:
        """Of the whole table: under tensor parallelism each rank holds a slice of the vocabulary, so the count,
        sum and sum of squares are added across the group (every rank calls this)."""
        weight = self.model.embed_tokens.weight.detach().float()
        moments = torch.stack([torch.tensor(float(weight.numel()), device=weight.device), weight.sum(),
                               weight.square().sum()]).double()
        if self.vocab_shard is not None:
            import torch.distributed as dist

            dist.all_reduce(moments, group=self.vocab_shard.group)
        n, total, squares = moments.tolist()
        return ((squares - total * total / n) / (n - 1)) ** 0.5

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(token_ids)

    def scores(self, inputs_embeds: torch.Tensor, layout: Layout) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16), attention_kernels(self):
            hidden = self.model(inputs_embeds, layout.position, layout.allowed(causal=True))
            logits = self.model.logits(hidden[layout.target_row, layout.target_col])
        return logits.float()


def load_megatron_model(folder: Path, tp: int, tp_rank: int, dtype: torch.dtype,
                        device: str | torch.device) -> MegatronLM:
    """This rank's module, built on the meta device and given the checkpoint's tensors as they are read."""
    if is_release(folder):
        if tp != N_PARTS:
            raise ReleaseError(f"{folder}: the fairseq release loads as is only at tensor_parallel {N_PARTS}; for "
                               f"{tp}, merge it first: python -m model_parallel.merge --src {folder} --dst DIR")
        spec, _ = read_spec(folder)
        tensors = load_part(folder / PART.format(tp_rank))[1].items()  # one mapping of the whole part
    elif is_merged(folder):
        spec = read_merged_spec(folder)
        tensors = read_merged_shard(folder, tp, tp_rank)
    else:
        raise ReleaseError(f"{folder}: neither the fairseq release ({PART.format(0)}, ...) nor a merged folder "
                           f"({INDEX})")
    try:
        return load_weights(empty_megatron(spec, tp, dtype), tensors, device)
    except ReleaseError as error:
        raise ReleaseError(f"{folder}: {error}") from None


def load_megatron(folder: Path, tokenizer_name: str | None, tp: int, tp_rank: int, group: Any,
                  dtype: torch.dtype, device: torch.device, bf16: bool = False) -> MegatronBackbone:
    from transformers import AutoTokenizer

    model = load_megatron_model(folder, tp, tp_rank, dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name or DEFAULT_TOKENIZER)
    return MegatronBackbone(model, tokenizer, tp_rank, group, bf16)
