"""Prompt encoders: each produces the (n_pseudo, hidden) prompt vectors of one relation.

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
