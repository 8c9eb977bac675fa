"""The output folder, the only channel between the ranks that train and the coordinator that reports.

Each unit (ptuning/config/sweep.py) has a folder under relations/ named by its id: relations/<P>/ without a sweep,
relations/<P>/<variant>/ in one. The relation's own record (its manual baseline) is relations/<P>/result.json,
which without a sweep is also its one unit's.

    <out>/run_config.json                       the settings the folder's results were made with
    <out>/relations/<unit>/result.json          the unit's figures; status "done" marks it final
    <out>/relations/<unit>/progress.json        dev P@1 per epoch so far (for W&B while it trains)
    <out>/relations/<unit>/checkpoint.pt        encoder, optimizer, best copy, schedule, early-stopping state, RNG
                                                states: at an epoch's end every output.checkpoint_minutes, and
                                                mid-epoch on SIGTERM/SIGUSR1 (removed once final)
    <out>/relations/<unit>/prompt_encoder.safetensors, prompt_vectors.safetensors
    <out>/relations/<unit>/test_ranks.json      each test fact's restricted rank (the statistics resample them)
                                                and its top-10 answers (words, best first)
    <out>/relations/<P>/manual_ranks.json       the manual prompt's, likewise
    <out>/relations/<P>/test_facts.jsonl        the test facts in the ranks' order: subject, object, in-subject
    <out>/relations/<unit>/predictions.jsonl    per test fact: the facts' fields, the manual and P-tuned top-10 and
                                                the gold's rank under each (python -m ptuning.inspect reads them)
    <out>/results.json, results.md, p_at_1.png, wandb/   written by the coordinator
    <out>/run.lock                              held by the coordinator while a job runs: who holds it

Every file is written whole (ptuning/files.py: a temporary file renamed, the folder synced, the umask's mode). A folder being resumed is checked whole before anything is
written to it: every record, checkpoint and saved encoder must read back, or the run stops with one line naming the
file (a broken checkpoint is refused, not silently dropped: deleting it restarts that relation).
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ptuning.config import ConfigError, ExperimentConfig, config_from_dict
from ptuning.files import (DataError, atomic_write_text, cause_of, load_tensors, read_json_object, read_jsonl,
                           save_tensors, write_error)
from ptuning.train import checkpoint

# A unit's record is final when its status is what its mode ends with: trained, manual prompt only, re-evaluated.
FINAL = {"train": "done", "manual": "manual_only", "evaluate": "evaluated"}


def is_final(record: dict | None) -> bool:
    return (record or {}).get("status") in FINAL.values()

IDENTITY_SECTIONS = ("model", "data", "prompt", "train", "protocol", "deepspeed")


def identity(cfg: ExperimentConfig) -> dict[str, Any]:
    """The settings a folder's results depend on: all but the result-neutral ones (config.schema.RESULT_NEUTRAL)."""
    full = cfg.to_dict()
    neutral = cfg.result_neutral()
    out = {}
    for section in IDENTITY_SECTIONS:
        values = full[section]
        if isinstance(values, dict):
            values = {k: v for k, v in values.items() if f"{section}.{k}" not in neutral}
        out[section] = values
    return out


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return read_json_object(path, "a JSON object (a record this program wrote)")


def _read_jsonl(path: Path) -> list[dict] | None:
    return [record for _, record in read_jsonl(path)] if path.is_file() else None


def _write_jsonl(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


class RunStore:
    def __init__(self, out_dir: str | Path):
        self.root = Path(out_dir)
        self._lock: int | None = None  # the descriptor holding run.lock, while this process holds it

    def lock(self, holder: str) -> None:
        """Hold <out>/run.lock until this process ends (an fcntl lock, released with the process however it ends,
        NFS included). A second job on the folder (a requeued job overlapping one still alive, say) stops with
        the first one's description instead of interleaving with it."""
        try:  # before anything loads: an output folder that cannot be one is a setting to change
            self.root.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise ConfigError(f"{self.root}: exists and is not a folder; choose another output.dir") from None
        except OSError as error:
            raise ConfigError(f"{self.root}: cannot make the output folder ({cause_of(error)}); choose another "
                              "output.dir") from None
        try:
            fd = os.open(self.root / "run.lock", os.O_RDWR | os.O_CREAT, 0o666)  # the umask decides, as for open()
        except OSError as error:
            raise write_error(error, self.root / "run.lock") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.pread(fd, 1000, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(f"{self.root}: in use by {other}; wait for that job to end, or use another "
                              "output.dir") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (holder + "\n").encode(), 0)
        except OSError as error:
            os.close(fd)
            raise write_error(error, self.root / "run.lock") from None
        self._lock = fd

    def unit_dir(self, unit: str) -> Path:
        """A unit's folder (unit: its id, "P36" or "P36/seed=35"; a relation id for the relation's own record)."""
        return self.root / "relations" / unit

    # ---- the folder's settings --------------------------------------------------------------------------------
    def check_resumable(self, cfg: ExperimentConfig) -> None:
        """Coordinator only, before the model loads: a folder to resume reads back whole and was made with the same
        settings. Writes nothing (output.resume false clears the folder later, in begin)."""
        if not cfg.output.resume:
            return
        self.check()
        previous = _read_json(self.root / "run_config.json")
        if previous is None:
            return
        # a section the folder's file lacks was added since: the folder was made with its defaults
        previous = {**identity(config_from_dict({})), **previous}
        previous["train"] = {k: v for k, v in (previous.get("train") or {}).items() if k != "pack_relations"}
        mine = identity(cfg)
        changed = [f"{s}.{k}" for s in IDENTITY_SECTIONS for k in
                   sorted(set((previous.get(s) or {})) | set(mine[s] or {}))
                   if (previous.get(s) or {}).get(k) != (mine[s] or {}).get(k)]
        if changed:
            raise ConfigError(f"{self.root}: holds results made with other settings ({', '.join(changed)}); use "
                              "another output.dir, or --set output.resume=false to start it over")

    def begin(self, cfg: ExperimentConfig) -> None:
        """Coordinator only, once the model has loaded and before any rank writes: clear the folder when
        output.resume is false, and record the settings it is made with."""
        if not cfg.output.resume:
            shutil.rmtree(self.root / "relations", ignore_errors=True)
            for name in ("results.json", "results.md", "p_at_1.png"):
                (self.root / name).unlink(missing_ok=True)
        atomic_write_text(self.root / "run_config.json", json.dumps(identity(cfg), indent=2) + "\n")

    def check(self) -> None:
        """Every record, checkpoint and saved encoder in the folder reads back (before anything is written)."""
        relations = self.root / "relations"
        for folder in sorted(p for p in list(relations.glob("*")) + list(relations.glob("*/*")) if p.is_dir()):
            unit = str(folder.relative_to(relations))
            self.result(unit), self.progress(unit), self.ranks(unit, "test"), self.ranks(unit, "manual")
            checkpoint.read(self.checkpoint_path(unit), unit)
            if self.encoder_path(unit).is_file():
                try:
                    with safe_open(self.encoder_path(unit), framework="pt"):
                        pass
                except (SafetensorError, OSError) as error:
                    raise DataError(f"{self.encoder_path(unit)}: cannot read the saved prompt encoder ({error}); "
                                    f"delete {folder} to train {unit} again") from None

    # ---- per-unit records -------------------------------------------------------------------------------------
    def result(self, unit: str) -> dict | None:
        return _read_json(self.unit_dir(unit) / "result.json")

    def write_result(self, unit: str, fields: dict[str, Any]) -> None:
        record = {**(self.result(unit) or {}), **fields}
        atomic_write_text(self.unit_dir(unit) / "result.json", json.dumps(record, indent=2) + "\n")

    def progress(self, unit: str) -> dict | None:
        return _read_json(self.unit_dir(unit) / "progress.json")

    def write_progress(self, unit: str, fields: dict[str, Any]) -> None:
        atomic_write_text(self.unit_dir(unit) / "progress.json", json.dumps(fields) + "\n")

    def ranks(self, unit: str, kind: str) -> list[int] | None:
        """The restricted rank of each test fact, in the split's order: kind "test" (a unit's) or "manual" (a
        relation's manual prompt)."""
        record = _read_json(self.unit_dir(unit) / f"{kind}_ranks.json")
        if record is None:
            return None
        ranks = record.get("ranks")
        if not isinstance(ranks, list) or not all(isinstance(r, int) and r >= 1 for r in ranks):
            raise DataError(f"{self.unit_dir(unit) / f'{kind}_ranks.json'}: field 'ranks' must be a list of ranks "
                            "(integers >= 1)")
        return ranks

    def top(self, unit: str, kind: str) -> list[list[str]] | None:
        """Each test fact's best answers (words, best first), as write_ranks kept them; None if it kept none."""
        record = _read_json(self.unit_dir(unit) / f"{kind}_ranks.json")
        return None if record is None else record.get("top")

    def write_ranks(self, unit: str, kind: str, ranks: list[int], top: list[list[str]] | None = None) -> None:
        record = {"ranks": ranks} if top is None else {"ranks": ranks, "top": top}
        atomic_write_text(self.unit_dir(unit) / f"{kind}_ranks.json", json.dumps(record) + "\n")

    # ---- per-fact files ---------------------------------------------------------------------------------------
    def facts(self, relation: str) -> list[dict] | None:
        """A relation's test facts (subject, object, in_subject) in the order of its ranks files."""
        return _read_jsonl(self.unit_dir(relation) / "test_facts.jsonl")

    def write_facts(self, relation: str, facts: list[dict]) -> None:
        _write_jsonl(self.unit_dir(relation) / "test_facts.jsonl", facts)

    def predictions(self, unit: str) -> list[dict] | None:
        return _read_jsonl(self.unit_dir(unit) / "predictions.jsonl")

    def write_predictions(self, unit: str, lines: list[dict]) -> None:
        _write_jsonl(self.unit_dir(unit) / "predictions.jsonl", lines)

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def checkpoint_path(self, unit: str) -> Path:
        return self.unit_dir(unit) / "checkpoint.pt"

    # ---- prompts ----------------------------------------------------------------------------------------------
    def encoder_path(self, unit: str) -> Path:
        return self.unit_dir(unit) / "prompt_encoder.safetensors"

    def save_prompt(self, unit: str, encoder: dict[str, torch.Tensor], vectors: torch.Tensor,
                    meta: dict[str, str]) -> None:
        """The best encoder (PromptEncoder's state dict) and, on their own, its prompt vectors (pseudo token i of
        the template, in order; computed in eval mode; no encoder needed to use them)."""
        save_tensors(self.encoder_path(unit), encoder, meta)
        save_tensors(self.unit_dir(unit) / "prompt_vectors.safetensors", {"prompt_vectors": vectors}, meta)

    def load_encoder_state(self, unit: str) -> dict[str, torch.Tensor]:
        path = self.encoder_path(unit)
        if not path.is_file():
            raise DataError(f"{path}: no saved prompt encoder for {unit}; train first (without --only-evaluate)")
        try:
            return load_tensors(path)
        except SafetensorError as error:
            raise DataError(f"{path}: cannot read the saved prompt encoder ({error})") from None
