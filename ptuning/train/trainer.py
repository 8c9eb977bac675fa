"""The training loop: a replica's packs one after another, each pack's units (a unit: a relation under one sweep
variant) trained together until every one of them has stopped.

Each step (ptuning/train/step.py) takes one micro-batch from every active unit, computes every unit's prompt
vectors in one batched forward of the prompt bank, and sends one packed batch through the frozen LM
(ptuning/train/packed.py); the loss is the sum of the per-unit means, so each encoder gets exactly the gradient
it would get alone. A unit whose epoch ends is evaluated on dev and keeps its schedule (ptuning/train/unit_run.py);
a unit that stops is evaluated on test at its best epoch and leaves the batch and its stack. In the LM fine-tuning
modes each unit fine-tunes its own copy of the LM, so units train one at a time from the same starting weights.
"""
from __future__ import annotations

from typing import Callable

import torch

from ptuning.config import ConfigError, ExperimentConfig
from ptuning.config.sweep import Unit
from ptuning.data.tasks import RelationTask
from ptuning.data.templates import Templates
from ptuning.model.backbone import backbone_dtype
from ptuning.model.capacity import pack_size
from ptuning.parallel.context import ParallelContext
from ptuning.train.prompt_bank import PromptBank
from ptuning.train.checkpoint import Checkpoints
from ptuning.train.epochs import Epochs
from ptuning.train.finetune import LMTuning
from ptuning.train.packed import PackedLM
from ptuning.train.precision import LossScaler
from ptuning.train.preemption import StopSignal
from ptuning.train.setup import Setup
from ptuning.train.step import Step
from ptuning.train.unit_run import UnitOutcome, UnitRun


class Events:
    """What the loop tells whoever runs it (ptuning/experiment.py's worker); these defaults do nothing."""

    def before_pack(self, units: list[Unit]) -> None:
        """Ahead of each pack (the manual baseline of its relations)."""

    def epoch_ended(self, run: UnitRun) -> None:
        """After every epoch that did not end the unit."""

    def finished(self, outcome: UnitOutcome) -> None:
        """A unit is final: its figures, prompt and test ranks."""


class Trainer:
    def __init__(self, backbone, cfg: ExperimentConfig, allowed: torch.Tensor,
                 progress: Callable[[str], None] = lambda line: None, parallel: ParallelContext | None = None):
        self.backbone, self.cfg, self.progress = backbone, cfg, progress
        self.parallel = parallel or ParallelContext()
        self.active: list[str] = []  # the units in the step under way, for error messages
        if cfg.train.tunes_lm and not backbone.trainable_lm:
            raise ConfigError(f"train.mode {cfg.train.mode}: this backbone trains prompts only (train.mode ptuning)")
        self.templates = Templates(backbone.tokenizer, backbone.kind, cfg)
        # on every rank, once: under tensor parallelism reading the embedding's spread is a collective
        self.embedding_std = backbone.embedding_std if cfg.train.uses_prompts else 1.0
        self.bank = PromptBank(self.parallel, cfg.parallel.shard_prompts and not cfg.train.tunes_lm,
                               backbone.hidden_size, backbone.device)
        self.forward = PackedLM(backbone, cfg, allowed, self.bank, self.templates)
        # an fp16 LM gets loss scaling, unless the protocol reproduces the reference's fp16 without it
        fp16 = backbone_dtype(backbone) == torch.float16
        self.scaler = LossScaler(self.parallel) if fp16 and not cfg.protocol.lm_fp16 else None
        self.forward.separate = self.scaler is not None
        if cfg.protocol.lm_dropout:  # the same LM dropout masks on every rank of a group: the same seed and draws
            torch.manual_seed(cfg.train.seed)
        self.stop = StopSignal(self.parallel)
        self.lm = LMTuning(backbone, cfg, self.parallel, progress) if cfg.train.tunes_lm else None
        self.step = Step(self.forward, self.bank, self.scaler, self.lm, cfg)
        self.setup = Setup(cfg, backbone, self.templates, self.bank, self.forward, self.parallel, self.lm,
                           self.embedding_std)
        self.epochs = Epochs(self.forward, self.bank, self.step, self.lm, self.templates, progress)
        rows = ("one fact per row (this model's attention takes no shared rows)" if not backbone.packs_rows else
                f"facts share rows of up to {cfg.train.row_tokens} tokens" if cfg.train.row_tokens else
                "one fact per row (train.row_tokens 0)")
        homes = f"sharded over {self.parallel.tp_size} tensor-parallel ranks" if self.bank.sharded else "on every rank"
        progress(f"layout: {rows}; prompt encoders {homes}" + ("; fp16 loss scaling" if self.scaler else "")
                 + f"; protocol {cfg.protocol.describe()}")

    def prepare(self, units: list[Unit | RelationTask], first: int = 0) -> list[UnitRun]:
        """Runs for units that train together, fresh (ptuning/train/setup.py)."""
        return self.setup.runs(units, first)

    def train(self, packs: list[list[Unit]], events: Events = Events(), checkpoints: Checkpoints | None = None
              ) -> bool:
        """Train the packs one after another (ptuning/parallel/packs.py; a pack is split further by what the
        device's memory holds under pack_units "auto", and into single units while the LM trains). On SIGTERM or
        SIGUSR1 every unit under way is checkpointed after the step in flight and False returned; True when done."""
        size = pack_size([u for p in packs for u in p], self.backbone, self.cfg, self.parallel, self.bank.sharded,
                         self.progress)
        if checkpoints is not None:
            checkpoints.bind(self.bank, self.lm, self.scaler)
        first = 0  # each unit's place in this replica's list: its encoder's owner under tensor parallelism
        with self.stop:
            for pack in [p[i:i + (size or len(p))] for p in packs for i in range(0, len(p), size or len(p))]:
                events.before_pack(pack)
                if not self._train_pack(pack, first, events, checkpoints):
                    return False
                first += len(pack)
        return True

    def _train_pack(self, pack: list[Unit], first: int, events: Events, checkpoints: Checkpoints | None) -> bool:
        self.active = [unit.id for unit in pack]
        runs = self.prepare(pack, first)
        for run in runs:
            said = checkpoints.restore(run) if checkpoints is not None else None
            if said:
                self.progress(said)
        if self.parallel.tp_size > 1 and self.cfg.train.uses_prompts:
            held = [r for r in runs if self.bank.has(r.unit.id)]
            count = sum(self.forward.layout(r.cfg, r.n_pseudo).size for r in held)
            self.progress(f"rank {self.parallel.rank} holds the prompt encoders of "
                          f"{', '.join(r.unit.id for r in held) or 'no unit'} ({count:,} parameters)")
        while active := [r for r in runs if not r.done]:
            self.active = [r.unit.id for r in active]
            self.step(active)
            ended = [r for r in active if r.epoch_over]
            if ended:
                self.epochs.end(ended)
                for run in (r for r in ended if not r.done):
                    events.epoch_ended(run)
                    if checkpoints is not None:
                        checkpoints.after_epoch(run)
                for outcome in self.epochs.finish([r for r in ended if r.done]):
                    events.finished(outcome)
                    if checkpoints is not None and outcome.writes:
                        checkpoints.remove(outcome.unit.id)
            if self.stop.requested():
                saved, over = checkpoints.stop([r for r in runs if not r.done]) if checkpoints else ([], [])
                self.progress(f"stop requested ({self.stop.name}): checkpointed "
                              f"{', '.join(saved) or 'nothing (no unit under way here)'}"
                              + (f"; {', '.join(over)} (DeepSpeed) will start over" if over else ""))
                return False
        self.active = []
        return True
