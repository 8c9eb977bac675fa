"""The backbone seam: the trainer talks to a language model only through this interface.

    embed(token_ids)                                       -> the frozen input embeddings
    scores(inputs_embeds, attention_mask, target_positions) -> logits at the target positions only, (B, V)

HFBackbone wraps any Hugging Face masked or causal LM. Only the target positions reach the LM head: the head is
the model's modules other than its base model, applied to the gathered hidden states. That split is checked once
against the model's own forward on a small input; a model whose head does not split that way (logit soft-capping,
say) falls back to its full forward and a gather.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


# Heads whose modules are registered in another order than they run.
HEAD_ORDER = {"distilbert": ("vocab_transform", "activation", "vocab_layer_norm", "vocab_projector")}


class Backbone(Protocol):
    kind: str  # "masked" or "causal"
    hidden_size: int
    vocab_size: int  # the whole vocabulary
    device: torch.device
    vocab_shard: object | None  # None: scores() gives all logits; else which slice this rank's logits are
    trainable_lm: bool

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor: ...

    def scores(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
               target_positions: torch.Tensor) -> torch.Tensor: ...


class HFBackbone:
    trainable_lm = True  # the LM fine-tuning modes can train it
    vocab_shard = None  # full logits on every rank

    def __init__(self, model: nn.Module, tokenizer, kind: str, bf16: bool = False):
        self.model, self.tokenizer, self.kind, self.bf16 = model, tokenizer, kind, bf16
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
        self.head_splits = self._check_head_split()
        self.vocab_size = self._vocab_size()

    # The frozen model: eval mode (no dropout) and no parameter gradients.
    def freeze(self) -> None:
        self.model.eval()
        self.model.requires_grad_(False)

    def unfreeze(self) -> list[nn.Parameter]:
        """For the fine-tuning modes: train mode (dropout on, as the paper fine-tuned) and trainable weights."""
        self.model.train()
        self.model.requires_grad_(True)
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def embedding_std(self) -> float:
        return float(self.model.get_input_embeddings().weight.detach().float().std())

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(token_ids)

    def _forward_kwargs(self, attention_mask: torch.Tensor) -> dict:
        kwargs = {"attention_mask": attention_mask}
        if self.kind == "causal":
            # Left padding shifts the real tokens; positions counted over real tokens make every row read as if
            # it were unpadded.
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return kwargs

    def scores(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
               target_positions: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(inputs_embeds.shape[0], device=inputs_embeds.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            if self.head_splits:
                hidden = self.base(inputs_embeds=inputs_embeds, **self._forward_kwargs(attention_mask))[0]
                logits = self.head(hidden[rows, target_positions])
            else:
                logits = self.model(inputs_embeds=inputs_embeds, **self._forward_kwargs(attention_mask)).logits
                logits = logits[rows, target_positions]
        return logits.float()

    @torch.no_grad()
    def _check_head_split(self) -> bool:
        ids = torch.tensor([[min(5 + i, self.model.get_input_embeddings().num_embeddings - 1) for i in range(6)]],
                           device=self.device)
        mask = torch.ones_like(ids)
        try:
            full = self.model(input_ids=ids, **self._forward_kwargs(mask)).logits
            split = self.head(self.base(input_ids=ids, **self._forward_kwargs(mask))[0])
        except (TypeError, RuntimeError, AttributeError):
            return False
        return split.shape == full.shape and torch.allclose(split, full, atol=1e-4, rtol=1e-4)

    @torch.no_grad()
    def _vocab_size(self) -> int:
        ids = torch.zeros(1, 2, dtype=torch.long, device=self.device)
        embeds = self.embed(ids)
        return self.scores(embeds, torch.ones_like(ids), torch.tensor([1], device=self.device)).shape[-1]
