"""Prompt encoders: each produces the (n_pseudo, hidden) prompt vectors of one unit (a relation under one sweep
variant). PromptEncoder is the paper's module for one unit: the reference the prompt bank's stacked computation is
tested against (ptuning/model/stacked.py), the initialisation of every unit, and the format of the saved
prompt files.

  lstm  the paper's: embedding -> 2-layer BiLSTM (hidden/2 per direction) -> Linear, ReLU, Linear
  mlp   embedding -> Linear, ReLU, Linear
  none  the prompt vectors themselves are the parameters
"""
from __future__ import annotations

import torch
from torch import nn


class PromptEncoder(nn.Module):
    def __init__(self, n_tokens: int, hidden: int, kind: str = "lstm", lstm_dropout: float = 0.0,
                 embedding_std: float = 1.0):
        super().__init__()
        self.kind, self.n_tokens, self.hidden = kind, n_tokens, hidden
        if kind == "none":
            self.vectors = nn.Parameter(torch.randn(n_tokens, hidden) * embedding_std)
            return
        self.embedding = nn.Embedding(n_tokens, hidden)
        if kind == "lstm":
            if hidden % 2:
                raise ValueError(f"the BiLSTM encoder needs an even hidden size, got {hidden}")
            self.lstm = nn.LSTM(hidden, hidden // 2, num_layers=2, dropout=lstm_dropout, bidirectional=True,
                                batch_first=True)
        elif kind != "mlp":
            raise ValueError(f"unknown prompt encoder {kind!r} (lstm, mlp, none)")
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden))

    def init_from(self, vectors: list[torch.Tensor | None]) -> None:
        """Start pseudo token i from vectors[i] (a word embedding) where given. For `none` these are the prompt
        vectors themselves; for lstm/mlp they are the encoder's input embeddings."""
        table = self.vectors if self.kind == "none" else self.embedding.weight
        with torch.no_grad():
            for i, vector in enumerate(vectors):
                if vector is not None:
                    table[i].copy_(vector)

    def forward(self) -> torch.Tensor:
        if self.kind == "none":
            return self.vectors
        x = self.embedding.weight.unsqueeze(0)
        if self.kind == "lstm":
            x = self.lstm(x)[0]
        return self.mlp(x).squeeze(0)


def initial_state(template, backbone, seed: int, cfg, embedding_std: float, hold: bool = True):
    """A unit's starting weights (cfg: its settings): PromptEncoder's initialisation from the unit's seed, then the
    manual template's word embeddings where prompt.init says so, as a state dict on the CPU; None where this rank
    does not hold the unit. Every rank of a tensor-parallel group calls it: reading the words from a sharded
    embedding is a collective."""
    init = None
    if cfg.prompt.init == "manual":
        ids = template.manual_init_ids()
        with torch.no_grad():
            words = backbone.embed(torch.tensor([i or 0 for i in ids], device=backbone.device))
        init = [words[k].float().cpu() if i is not None else None for k, i in enumerate(ids)]
    if not hold:
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = PromptEncoder(template.n_pseudo, backbone.hidden_size, cfg.prompt.encoder, cfg.prompt.lstm_dropout,
                                embedding_std)
    if init is not None:
        encoder.init_from(init)
    return encoder.state_dict()
