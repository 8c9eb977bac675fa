"""The backbone seam: the trainer talks to a language model only through this interface.

    embed(token_ids)                         -> the frozen input embeddings
    scores(inputs_embeds, layout)            -> logits at each fact's prediction position only, (N, V)

A Layout says where the facts sit in a (B, L) batch of token rows: which fact each token belongs to, its position
inside that fact, and where each fact is scored. A row holds one fact (padded) or, when the backbone `packs_rows`,
several facts back to back; attention never crosses from one fact to another and positions restart at each fact,
so a fact scores the same wherever it sits.

HFBackbone wraps any Hugging Face masked or causal LM. Only the target positions reach the LM head: the head is
the model's modules other than its base model, applied to the gathered hidden states. That split is checked once
against the model's own forward on a small input; a model whose head does not split that way (logit soft-capping,
say) falls back to its full forward and a gather. Packing facts into rows is checked the same way (packed against
one fact per row); a model that fails the check, or whose attention takes no 4D mask, gets one fact per row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


@dataclass
class Layout:
    """Where the facts sit in a (B, L) batch of token rows."""
    segment: torch.Tensor  # (B, L) which fact of its row each token belongs to (0, 1, ...); -1 for padding
    position: torch.Tensor  # (B, L) the token's position inside its fact; 0 for padding
    target_row: torch.Tensor  # (N,) the row of each fact's prediction position
    target_col: torch.Tensor  # (N,) and its column
    packed: bool = False  # whether some row holds more than one fact (known when the batch is built: no read-back)

    @classmethod
    def padded(cls, mask: torch.Tensor, targets: torch.Tensor) -> "Layout":
        """One fact per row from a 0/1 padding mask (left or right padding) and each row's target column."""
        real = mask.long()
        return cls(segment=real - 1, position=((real.cumsum(-1) - 1) * real).clamp(min=0),
                   target_row=torch.arange(mask.shape[0], device=mask.device), target_col=targets, packed=False)

    @property
    def mask(self) -> torch.Tensor:
        """(B, L) 1 for real tokens, 0 for padding."""
        return (self.segment >= 0).long()

    def allowed(self, causal: bool) -> torch.Tensor:
        """(B, 1, L, L) which keys each query may attend to: its own fact (and, if causal, not ahead). Every
        position also sees itself, so padding rows never go empty."""
        seg = self.segment
        allowed = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] >= 0)
        length = seg.shape[1]
        if causal:
            allowed &= torch.ones(length, length, dtype=torch.bool, device=seg.device).tril()
        return (allowed | torch.eye(length, dtype=torch.bool, device=seg.device))[:, None]


# Heads whose modules are registered in another order than they run.
HEAD_ORDER = {"distilbert": ("vocab_transform", "activation", "vocab_layer_norm", "vocab_projector")}


class Backbone(Protocol):
    kind: str  # "masked" or "causal"
    hidden_size: int
    vocab_size: int  # the whole vocabulary
    device: torch.device
    vocab_shard: object | None  # None: scores() gives all logits; else which slice this rank's logits are
    trainable_lm: bool
    packs_rows: bool  # whether scores() takes layouts with several facts in a row

    def dropout(self, active: bool) -> None: ...  # the model's dropout on (train mode) or off (eval mode)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor: ...

    def scores(self, inputs_embeds: torch.Tensor, layout: Layout) -> torch.Tensor: ...


class HFBackbone:
    vocab_shard = None  # full logits on every rank (under tensor parallelism the LM head gathers them)

    def __init__(self, model: nn.Module, tokenizer, kind: str, bf16: bool = False, tensor_parallel: bool = False):
        self.model, self.tokenizer, self.kind, self.bf16 = model, tokenizer, kind, bf16
        # the LM fine-tuning modes train the LM; a tensor-parallel one (transformers' tp_plan) trains prompts only
        self.trainable_lm = not tensor_parallel
        self.device = next(model.parameters()).device
        self.hidden_size = model.get_input_embeddings().embedding_dim
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.padding_side = "left" if kind == "causal" else "right"
        self.freeze()
        self.base = model.base_model
        order = HEAD_ORDER.get(model.config.model_type)
        self.head = nn.Sequential(*(
            [getattr(model, name) for name in order] if order else
            [m for m in model.children() if m is not self.base and not isinstance(m, nn.modules.loss._Loss)]
        ))
        self.position_offset = self._position_offset()
        self.head_splits = self.check_head_split()
        self.vocab_size = self._vocab_size()
        self.packs_rows = self.check_row_packing()

    # The frozen model: eval mode (no dropout) and no parameter gradients.
    def freeze(self) -> None:
        self.model.eval()
        self.model.requires_grad_(False)

    def dropout(self, active: bool) -> None:
        """Train mode (dropout on: the reference protocol's lm_dropout) or eval mode; the weights stay frozen."""
        self.model.train(active)

    def unfreeze(self) -> list[nn.Parameter]:
        """For the fine-tuning modes: train mode (dropout on, as the paper fine-tuned) and trainable weights."""
        self.model.train()
        self.model.requires_grad_(True)
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def embedding_std(self) -> float:
        weight = self.model.get_input_embeddings().weight.detach()
        if hasattr(weight, "full_tensor"):  # a DTensor (transformers' tensor parallelism): the whole table
            weight = weight.full_tensor()
        return float(weight.float().std())

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(token_ids)

    def forward_kwargs(self, layout: Layout) -> dict:
        """What the Hugging Face model's forward takes for a layout: the mask (4D for shared rows) and positions."""
        if layout.packed:
            return {"attention_mask": self._mask_4d(layout.allowed(causal=self.kind == "causal")),
                    "position_ids": layout.position + self.position_offset}
        kwargs = {"attention_mask": layout.mask}
        if self.kind == "causal":
            # Left padding shifts the real tokens; positions counted inside the fact make every row read as if it
            # were unpadded.
            kwargs["position_ids"] = layout.position
        return kwargs

    def _mask_4d(self, allowed: torch.Tensor) -> torch.Tensor:
        """A (B, 1, L, L) mask in the form the attention takes as is: boolean for SDPA, additive for eager."""
        if self.model.config._attn_implementation == "sdpa":
            return allowed
        dtype = next(self.model.parameters()).dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed,
                                                                                          torch.finfo(dtype).min)

    def _position_offset(self) -> int:
        """Learned positions with a padding index (RoBERTa's, from fairseq) count from just after it."""
        table = getattr(getattr(self.base, "embeddings", None), "position_embeddings", None)
        padding_idx = getattr(table, "padding_idx", None)
        return 0 if padding_idx is None else padding_idx + 1

    def scores(self, inputs_embeds: torch.Tensor, layout: Layout) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16), attention_kernels(self):
            kwargs = self.forward_kwargs(layout)
            if self.head_splits:
                hidden = self.base(inputs_embeds=inputs_embeds, **kwargs)[0]
                logits = self.head(hidden[layout.target_row, layout.target_col])
            else:
                logits = self.model(inputs_embeds=inputs_embeds, **kwargs).logits
                logits = logits[layout.target_row, layout.target_col]
        return logits.float()

    def _test_ids(self, length: int, first: int) -> torch.Tensor:
        top = self.model.get_input_embeddings().num_embeddings - 1
        return torch.tensor([[min(first + i, top) for i in range(length)]], device=self.device)

    @torch.no_grad()
    def check_head_split(self) -> bool:
        """head(base(x)) is the model's own logits (else the full forward runs and the targets are gathered)."""
        ids = self._test_ids(6, 5)
        layout = Layout.padded(torch.ones_like(ids), torch.tensor([0], device=self.device))
        try:
            full = self.model(input_ids=ids, **self.forward_kwargs(layout)).logits
            split = self.head(self.base(input_ids=ids, **self.forward_kwargs(layout))[0])
        except (TypeError, RuntimeError, AttributeError):
            return False
        return split.shape == full.shape and torch.allclose(split, full, atol=1e-4, rtol=1e-4)

    @torch.no_grad()
    def check_row_packing(self) -> bool:
        """Two facts back to back in one row score as each alone, at every position. Run without autocast and
        with a tolerance for the weights' dtype: bf16 rounding alone would otherwise fail the check and switch
        shared rows off for a reason that has nothing to do with the model."""
        if self.model.config._attn_implementation not in ("sdpa", "eager"):  # others take no 4D mask as is
            return False
        facts = [self._test_ids(4, 7), self._test_ids(5, 13)]

        def every_position(segment: torch.Tensor, position: torch.Tensor, packed: bool) -> Layout:
            n = segment.shape[1]
            return Layout(segment, position, torch.zeros(n, dtype=torch.long, device=self.device),
                          torch.arange(n, device=self.device), packed=packed)

        bf16, self.bf16 = self.bf16, False
        try:
            alone = [self.scores(self.embed(ids), every_position(torch.zeros_like(ids), torch.arange(
                ids.shape[1], device=self.device)[None], False)) for ids in facts]
            segment = torch.cat([torch.full_like(ids, k) for k, ids in enumerate(facts)], dim=1)
            position = torch.cat([torch.arange(ids.shape[1], device=self.device)[None] for ids in facts], dim=1)
            packed = self.scores(self.embed(torch.cat(facts, dim=1)), every_position(segment, position, True))
        except (TypeError, RuntimeError, ValueError, IndexError):
            return False
        finally:
            self.bf16 = bf16
        alone = torch.cat(alone)
        tolerance = 1e-4 if next(self.model.parameters()).dtype == torch.float32 else 3e-2
        return bool((packed - alone).abs().max() <= tolerance * max(1.0, float(alone.abs().max())))

    @torch.no_grad()
    def _vocab_size(self) -> int:
        ids = torch.zeros(1, 2, dtype=torch.long, device=self.device)
        layout = Layout.padded(torch.ones_like(ids), torch.tensor([1], device=self.device))
        return self.scores(self.embed(ids), layout).shape[-1]


def attention_kernels(backbone):
    """The SDPA kernels to use: in bf16 on a CPU the math kernel, which for facts this short (rows of <= 64 tokens)
    runs a training step's attention 2-4x faster than the CPU flash kernel (which in float32 is the faster one)."""
    from contextlib import nullcontext

    if backbone.device.type == "cpu" and backbone_dtype(backbone) == torch.bfloat16:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    return nullcontext()


def backbone_dtype(backbone) -> torch.dtype:
    """The dtype the LM computes in: bf16 under autocast, else its weights' dtype."""
    if getattr(backbone, "bf16", False):
        return torch.bfloat16
    return next(backbone.model.parameters()).dtype
