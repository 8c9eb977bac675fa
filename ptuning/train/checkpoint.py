"""A unit's checkpoint, all of it here: what it holds, when it is written, how it is read back.

    fields   the unit's schedule (UnitRun.state_dict: order, cursor, epochs, dev history, early stopping, best
             copy, the shuffling generator, the process's RNG states), its slice of the prompt bank (weights, Adam
             state, dropout generator), its LM copy and optimizer when the LM trains, its fp16 loss scale
    when     at an epoch's end once output.checkpoint_minutes have passed since the unit's last (0: every epoch),
             and for every unit under way when SIGTERM/SIGUSR1 asks the run to stop; removed once the unit is final;
             never mid-training under DeepSpeed (its optimizer state does not load with weights_only: restart)
    where    <out>/relations/<unit>/checkpoint.pt, written whole (serialised straight into a temporary file and
             renamed: no copy in memory, ~2 GB at 11B) by the rank that holds the unit, read memory-mapped by every
             rank of its group (each needs the schedule; only the holder touches the encoder and optimizer state)

A unit resumes into any pack and any tensor-parallel owner: its slice loads into whichever stack row it lands in.
"""
from __future__ import annotations

import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

from ptuning.files import DataError, atomic_write
from ptuning.train.unit_run import UnitRun

# What every checkpoint holds, by type: a file without one of them is not one of ours.
FIELDS = {"epoch": int, "order": list, "cursor": int, "best_dev": float, "best_epoch": int, "bad_epochs": int,
          "dev_history": list, "seconds": (int, float), "generator": torch.Tensor, "torch_rng": torch.Tensor,
          "optimizer": dict}


def state_of(run: UnitRun, bank, lm, scaler) -> dict[str, Any]:
    """Everything a unit needs to continue exactly (on the rank that holds it)."""
    state = run.state_dict()
    uid = run.unit.id
    if bank.has(uid):
        state["encoder"] = bank.weights(uid)
        state["dropout_generator"] = bank.generator_state(uid)
    if lm is not None:  # each unit fine-tunes its own LM copy: it is part of the unit's state
        state["lm"] = lm.state()
        state["optimizer"] = run.optimizer.state_dict()
    else:
        state["optimizer"] = bank.optimizer_state(uid) if bank.has(uid) else {}
    if scaler is not None:
        state["loss_scale"] = scaler.state_dict(uid)
    return state


def load_into(run: UnitRun, state: dict[str, Any], bank, lm, scaler) -> None:
    """The schedule on every rank; the bank's slice, the LM and its optimizer where this rank holds the unit."""
    run.load_state_dict(state)
    uid = run.unit.id
    if bank.has(uid):
        bank.load_weights(uid, state["encoder"])
        if "dropout_generator" in state:
            bank.load_generator_state(uid, state["dropout_generator"])
        if lm is None:
            bank.load_optimizer_state(uid, state["optimizer"])
    if lm is not None:
        lm.load(state["lm"])
        if run.holds:
            try:
                run.optimizer.load_state_dict(state["optimizer"])
            except ValueError:  # written before the prompt bank: the encoder's tensors were separate then
                raise DataError(f"{uid}: its checkpoint was written by an earlier version (the encoder's optimizer "
                                "state no longer fits); delete the checkpoint to restart the unit") from None
    if scaler is not None and "loss_scale" in state:
        scaler.load_state_dict(uid, state["loss_scale"])


def read(path: Path, unit: str) -> dict[str, Any] | None:
    """The checkpoint at path (None if there is none), every field checked: a broken file is refused with one line
    saying how to go on, never silently dropped."""
    if not path.is_file():
        return None
    how = f"delete it to restart {unit} from scratch"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # a truncated or foreign file: say which, and how to go on
        why = (f"{type(error).__name__}: {str(error).splitlines()[0]}" if zipfile.is_zipfile(path) else
               "not a whole torch checkpoint: truncated, or another kind of file")
        raise DataError(f"{path}: cannot read the checkpoint ({why}); {how}") from None
    if not isinstance(state, dict):
        raise DataError(f"{path}: not a checkpoint of this program (a {type(state).__name__}); {how}")
    for key, kind in FIELDS.items():
        if key not in state:
            raise DataError(f"{path}: not a checkpoint of this program (no '{key}'); {how}")
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise DataError(f"{path}: field '{key}' is a {type(state[key]).__name__}; {how}")
    return state


def write(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda handle: torch.save(state, handle))


class Checkpoints:
    """A run's checkpoints: path_of(unit id) is where a unit's goes (the output folder's layout)."""

    def __init__(self, path_of: Callable[[str], Path], minutes: float = 15.0, resume: bool = True):
        self.path_of, self.minutes, self.resume = path_of, minutes, resume
        self.last: dict[str, float] = {}  # unit -> when its last checkpoint was written
        self.parts: tuple = ()  # the trainer's bank, LM tuning and loss scaler (bind)

    def bind(self, bank, lm, scaler) -> None:
        self.parts = (bank, lm, scaler)

    @staticmethod
    def possible(run: UnitRun) -> bool:
        """Not mid-training under DeepSpeed (ptuning/train/finetune.py)."""
        return run.engine is None

    def restore(self, run: UnitRun) -> str | None:
        """Continue the unit from its checkpoint, if it has one and the run resumes; what to tell the log."""
        state = read(self.path_of(run.unit.id), run.unit.id) if self.resume else None
        if state is None:
            return None
        if not self.possible(run):
            return f"{run.unit.id}: fine-tuned under DeepSpeed, which is not checkpointed mid-training: it starts over"
        load_into(run, state, *self.parts)
        return (f"{run.unit.id}: resuming after epoch {run.epoch}" if run.cursor == 0 else
                f"{run.unit.id}: resuming in epoch {run.epoch + 1} at fact {run.cursor} of {len(run.order)}")

    def after_epoch(self, run: UnitRun) -> None:
        last = self.last.setdefault(run.unit.id, run.started)
        if run.writes and self.possible(run) and time.perf_counter() - last >= 60 * self.minutes:
            self.save(run)

    def save(self, run: UnitRun) -> None:
        write(self.path_of(run.unit.id), state_of(run, *self.parts))
        self.last[run.unit.id] = time.perf_counter()

    def stop(self, runs: list[UnitRun]) -> tuple[list[str], list[str]]:
        """A stop was asked for: every unit under way that this rank writes is saved where it stands. Returns the
        units saved and those that will start over (DeepSpeed)."""
        saved = [r for r in runs if r.writes and self.possible(r)]
        for run in saved:
            self.save(run)
        return [r.unit.id for r in saved], [r.unit.id for r in runs if r.writes and not self.possible(r)]

    def remove(self, unit: str) -> None:
        """A unit is final: its checkpoint goes."""
        self.path_of(unit).unlink(missing_ok=True)
