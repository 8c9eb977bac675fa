"""A unit's run: its schedule through training (rows, order, cursor, epochs, dev history, early stopping) and what it
leaves at the end. Every rank of a tensor-parallel group keeps each unit's run (each must feed the same batches);
the encoder itself lives in the prompt bank, on the rank that holds it (ptuning/train/prompt_bank.py)."""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import Any

import torch

from ptuning.config.sweep import Unit
from ptuning.data.lama import SPLITS
from ptuning.data.templates import Row, rows_of


def relation_seed(seed: int, relation: str) -> int:
    """Each relation's own seed: the same whether it trains alone or packed with others."""
    return zlib.crc32(f"{seed}:{relation}".encode()) & 0x7FFFFFFF


def dropout_seed(seed: int, relation: str) -> int:
    """The seed of a unit's dropout generator (prompt.lstm_dropout): its own stream, apart from its shuffling."""
    return relation_seed(seed, f"{relation}/dropout")


class UnitRun:
    """One unit's schedule. In the LM fine-tuning modes the unit also has LMTuning's optimizer (and engine)."""

    def __init__(self, unit: Unit, template, holds: bool = True, writes: bool = True, drop_last: int = 0):
        self.unit, self.task, self.cfg = unit, unit.task, unit.variant.cfg  # cfg: the unit's own settings
        self.template = template
        self.drop_last = drop_last  # the batch size whose incomplete last batch each epoch drops (0: keep it)
        self.holds = holds  # this rank keeps the unit's trainable state (False: another rank of the group does)
        self.writes = writes  # this rank writes the unit's checkpoint, prompts and record
        self.n_pseudo = getattr(template, "n_pseudo", 0)
        self.rows = {s: rows_of(template, unit.task, s, training=s == "train") for s in SPLITS}
        self.generator = torch.Generator().manual_seed(relation_seed(self.cfg.train.seed, unit.relation))
        self.optimizer = None  # the LM fine-tuning modes: torch Adam, or DeepSpeed's optimizer
        self.engine = None  # the DeepSpeed engine, when the config has a deepspeed section and the LM trains
        self.epoch = 0  # epochs completed
        self.order: list[int] = []
        self.cursor = 0
        self.best_dev, self.best_epoch, self.best_state, self.bad_epochs = -1.0, 0, None, 0
        self.dev_history: list[float] = []
        self.done = False
        self.started = time.perf_counter()
        self.start_epoch()

    def start_epoch(self) -> None:
        self.order = torch.randperm(len(self.rows["train"]), generator=self.generator).tolist()
        if self.drop_last and len(self.order) >= self.drop_last:  # fewer facts than a batch: keep them all
            self.order = self.order[:len(self.order) - len(self.order) % self.drop_last]
        self.cursor = 0

    def next_batch(self, size: int) -> list[Row]:
        picked = self.order[self.cursor:self.cursor + size]
        self.cursor += len(picked)
        return [self.rows["train"][i] for i in picked]

    @property
    def epoch_over(self) -> bool:
        return self.cursor >= len(self.order)

    def end_epoch(self, dev_p1: float) -> bool:
        """An epoch's dev P@1: the unit's selection rule and early stopping, by its own settings. True when this
        epoch is the best so far (its weights are then the unit's best copy)."""
        train, protocol = self.cfg.train, self.cfg.protocol
        # the reference trains a last epoch it never evaluates: it cannot be selected, so it is not run
        last = train.max_epochs - (1 if protocol.last_epoch_unevaluated else 0)
        self.epoch += 1
        self.dev_history.append(dev_p1)
        better = dev_p1 >= self.best_dev if protocol.latest_tie else dev_p1 > self.best_dev
        if better:
            self.best_dev, self.best_epoch, self.bad_epochs = dev_p1, self.epoch, 0
        else:
            self.bad_epochs += 1
        self.done = self.bad_epochs >= train.patience or self.epoch >= last
        if not self.done:
            self.start_epoch()
        return better

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def state_dict(self) -> dict[str, Any]:
        """The schedule, to continue from this step exactly as if never stopped (train/checkpoint.py adds the rest)."""
        state = {
            "epoch": self.epoch, "order": self.order, "cursor": self.cursor, "best_dev": self.best_dev,
            "best_epoch": self.best_epoch, "best_state": self.best_state, "bad_epochs": self.bad_epochs,
            "dev_history": self.dev_history, "seconds": self.elapsed(), "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        }
        if torch.cuda.is_available():  # the LM's dropout (protocol.lm_dropout) on a GPU draws from CUDA's generator
            state["cuda_rng"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The schedule on every rank; the best state where this rank holds the unit."""
        self.epoch, self.order, self.cursor = state["epoch"], state["order"], state.get("cursor", 0)
        self.best_dev, self.best_epoch = state["best_dev"], state["best_epoch"]
        self.bad_epochs, self.dev_history = state["bad_epochs"], state["dev_history"]
        self.started = time.perf_counter() - state["seconds"]
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda_rng"])
        if self.holds:
            self.best_state = state["best_state"]


@dataclass
class UnitOutcome:
    unit: Unit
    metrics: dict  # dev_p@1, test_p@1, test_p@10, test_mrr, best_epoch, epochs_run, seconds, dev_history
    # the best encoder's weights (PromptEncoder's state dict) and prompt vectors; None where another rank holds it
    prompt: tuple[dict[str, torch.Tensor], torch.Tensor] | None
    test_ranks: list[int]  # each test fact's restricted rank, in the split's order (the statistics resample them)
    test_top: list[list[int]]  # each test fact's TOP best answer ids, best first
    counts: tuple[int, int, int]  # the unit's template
    writes: bool = True  # this rank writes the unit's files
