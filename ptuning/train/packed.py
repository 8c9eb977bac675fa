"""The packed forward and evaluation: many units' facts through the frozen LM together.

An item is (a unit's prompt vectors, or None for the manual prompt; its rows). The items' facts are laid out in
batch rows (ptuning/train/batching.py: length-sorted chunks, facts sharing rows), the rows' pseudo slots are filled
with the items' vectors, and the backbone scores the target positions only. Training sums each unit's mean loss
(times a factor: its fp16 loss scale); evaluation gives each fact's rank among the answer vocabulary.
"""
from __future__ import annotations

import torch
from torch.profiler import record_function

from ptuning.train.batching import Batch, collate, length_buckets
from ptuning.data.templates import Row, rows_of
from ptuning.model.stacked import Layout
from ptuning.model.metrics import cross_entropy, restricted_ranks, restricted_top, summarize_ranks
from ptuning.train.prompt_bank import PromptBank
from ptuning.train.stack import EncoderStack, Settings
from ptuning.train.unit_run import UnitRun

Item = tuple[torch.Tensor | None, list[Row]]


class PackedLM:
    def __init__(self, backbone, cfg, allowed: torch.Tensor, bank: PromptBank, templates):
        self.backbone, self.cfg, self.bank, self.templates = backbone, cfg, bank, templates
        self.allowed = allowed.to(backbone.device)
        self.shard = backbone.vocab_shard
        self.separate = False  # fp16 loss scaling: a batch row holds one unit's facts (ptuning/train/precision.py)

    # ---- prompt vectors -----------------------------------------------------------------------------------------
    def layout(self, cfg, n_pseudo: int) -> Layout:
        """The shape of a unit's encoder (cfg: its settings): its stack in the bank."""
        return Layout.of(cfg.prompt.encoder, n_pseudo, self.backbone.hidden_size)

    def vectors(self, runs: list[UnitRun], training: bool = False) -> list[torch.Tensor | None]:
        """The prompt vectors of each run, on every rank of the group (None for the manual template). Encoders are
        in eval mode (no dropout) unless `training`."""
        if not self.cfg.train.uses_prompts:
            return [None] * len(runs)
        return self.bank.vectors([r.unit.id for r in runs], [r.n_pseudo for r in runs], training)

    def saved_vectors(self, units: list, states: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """The prompt vectors of saved encoders, computed on this rank (evaluation: no optimizer, little memory).
        A state that does not fit the unit's configured encoder raises ValueError naming what differs."""
        out = []
        for unit, state in zip(units, states):
            n_pseudo = self.templates.ptuning(unit.task, unit.variant.cfg).n_pseudo
            stack = EncoderStack(self.layout(unit.variant.cfg, n_pseudo), [state], [Settings(0.0, 0.0, 0.0, 0)],
                                 self.backbone.device)
            with torch.no_grad():
                out.append(stack(training=False)[0])
        return out

    # ---- the forward ----------------------------------------------------------------------------------------------
    def logits(self, items: list[Item], weights: list[float] | None = None,
               separate: bool = False) -> tuple[torch.Tensor, Batch]:
        """One forward over the rows of several items (weights: each fact's weight in the loss; separate: a batch
        row holds one item's facts only)."""
        offsets, total, table = [], 0, []
        for vectors, _ in items:
            offsets.append(total)
            if vectors is not None:
                table.append(vectors)
                total += vectors.shape[0]
        rows = [row for _, rs in items for row in rs]
        owners = [i for i, (_, rs) in enumerate(items) for _ in rs]
        row_tokens = self.cfg.train.row_tokens if self.backbone.packs_rows else 0
        with record_function("ptuning::collate"):  # a label for profiles (benchmarks/step_profile.py)
            batch = collate(rows, owners, offsets, self.backbone.pad_id, self.backbone.padding_side, row_tokens,
                            self.backbone.device, weights, separate)
        embeds = self.backbone.embed(batch.ids)
        if table:
            packed = torch.cat(table).to(embeds.dtype)
            slots = batch.pseudo.clamp(min=0)
            embeds = torch.where((batch.pseudo >= 0)[..., None], packed[slots], embeds)
        return self.backbone.scores(embeds, batch.layout), batch

    def loss(self, vectors: list[torch.Tensor | None], rows: list[list[Row]], factors: list[float]) -> torch.Tensor:
        """sum_i factors[i] x the mean loss of item i's rows under its prompt vectors, through the LM in
        length-sorted chunks of rows."""
        loss = torch.zeros((), device=self.backbone.device)
        for chunk, positions in length_buckets(vectors, rows, self.cfg.train.bucket_rows):
            # under fp16 a unit's overflow stays its own: its facts share rows only with each other
            logits, batch = self.logits(chunk, [factors[i] / len(rows[i]) for i, _ in positions], self.separate)
            loss = loss + (cross_entropy(logits, batch.labels, self.shard) * batch.weights).sum()
        return loss

    # ---- evaluation -----------------------------------------------------------------------------------------------
    def ranks(self, items: list[Item]) -> list[torch.Tensor]:
        """Restricted ranks of every row of every item, batched across items and bucketed by length."""
        return self.predictions(items, 0)[0]

    @torch.no_grad()
    def predictions(self, items: list[Item], top: int) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Each item's restricted ranks and, with top > 0, each row's `top` best allowed ids, best first (top 0:
        None). One read-back at the end, not one per chunk."""
        model = self.backbone.model
        was_training = model.training
        model.eval()
        found, tops, where = [], [], []
        for chunk, positions in length_buckets([v for v, _ in items], [rows for _, rows in items],
                                               self.cfg.train.eval_batch_size):
            logits, batch = self.logits(chunk)
            found.append(restricted_ranks(logits, batch.labels, self.allowed, self.shard))
            if top:
                tops.append(restricted_top(logits, self.allowed, top, self.shard))
            where += positions
        model.train(was_training)
        ranks = [torch.zeros(len(rows), dtype=torch.long) for _, rows in items]
        for (i, j), rank in zip(where, torch.cat(found).tolist() if found else []):
            ranks[i][j] = rank
        if not top:
            return ranks, None
        best = [torch.zeros(len(rows), top, dtype=torch.long) for _, rows in items]
        for (i, j), ids in zip(where, torch.cat(tops).cpu() if tops else []):
            best[i][j] = ids
        return ranks, best

    def manual_items(self, tasks: list, split: str = "test") -> list[Item]:
        """The manual prompt's rows of each relation, as items for ranks()."""
        return [(None, rows_of(self.templates.manual(t), t, split)) for t in tasks]

    def evaluate_manual(self, tasks: list, split: str = "test") -> dict[str, dict]:
        return {t.id: summarize_ranks(r) for t, r in zip(tasks, self.ranks(self.manual_items(tasks, split)))}

    def ranks_of_runs(self, runs: list[UnitRun], split: str,
                      vectors: list[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
        """Each run's ranks on a split, under its encoder as it is now (in eval mode)."""
        if vectors is None:
            with torch.no_grad():
                vectors = self.vectors(runs)
        return self.ranks([(v, r.rows[split]) for v, r in zip(vectors, runs)])

    def evaluate_runs(self, runs: list[UnitRun], split: str) -> list[dict]:
        return [summarize_ranks(r) for r in self.ranks_of_runs(runs, split)]
