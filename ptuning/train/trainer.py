"""One trainer for a set of units trained together (a unit: a relation under one sweep variant, ptuning/config/sweep.py).

Each step takes one micro-batch from every active unit, computes every unit's prompt vectors in one batched
forward of the prompt bank (ptuning/parallel/prompt_bank.py: the encoders stacked by shape), fills the rows' pseudo slots
with them, and sends one packed batch through the frozen LM. The loss is the sum of the per-unit means, so each
encoder gets exactly the gradient it would get alone; one backward and one bank step (Adam per unit) follow. Each
unit has its own settings (its variant's), learning rate schedule, epoch count, dev evaluation, best state and
early stopping, and leaves the batch and its stack when it stops. A single relation is the special case. In the
LM fine-tuning modes each unit fine-tunes its own copy of the LM, so units train one at a time from the same
starting weights, under LMTuning's optimizer.
"""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.profiler import record_function

from ptuning.parallel import capacity
from ptuning.model.backbone import HFBackbone, backbone_dtype
from ptuning.data.batching import Batch, collate, length_buckets
from ptuning.config import ConfigError, ExperimentConfig
from ptuning.files import DataError
from ptuning.data.lama import SPLITS
from ptuning.model.encoder_stack import Layout
from ptuning.model.encoders import PromptEncoder
from ptuning.train.finetune import LMTuning
from ptuning.model.metrics import cross_entropy, restricted_ranks, summarize_ranks
from ptuning.parallel.context import ParallelContext
from ptuning.train.precision import LossScaler
from ptuning.train.preemption import StopSignal
from ptuning.parallel.prompt_bank import EncoderStack, PromptBank, Settings
from ptuning.data.tasks import RelationTask
from ptuning.data.templates import ManualTemplate, PTuningTemplate, Row, default_counts
from ptuning.config.sweep import Unit, Variant


def relation_seed(seed: int, relation: str) -> int:
    """Each relation's own seed: the same whether it trains alone or packed with others."""
    return zlib.crc32(f"{seed}:{relation}".encode()) & 0x7FFFFFFF


def dropout_seed(seed: int, relation: str) -> int:
    """The seed of a unit's dropout generator (prompt.lstm_dropout): its own stream, apart from its shuffling."""
    return relation_seed(seed, f"{relation}/dropout")


class UnitRun:
    """One unit's schedule: its rows, order, cursor, epochs, dev history and early stopping. Every rank of a
    tensor-parallel group keeps it (each must feed the same batches); the encoder itself lives in the prompt bank
    on the rank that holds it. In the LM fine-tuning modes the unit also has LMTuning's optimizer (and engine)."""

    def __init__(self, unit: Unit, template, seed: int, holds: bool = True, writes: bool = True,
                 drop_last: int = 0):
        self.unit, self.task, self.cfg = unit, unit.task, unit.variant.cfg  # cfg: the unit's own settings
        self.template = template
        self.drop_last = drop_last  # the batch size whose incomplete last batch each epoch drops (0: keep it)
        self.holds = holds  # this rank keeps the unit's trainable state (False: another rank of the group does)
        self.writes = writes  # this rank writes the unit's checkpoint, prompts and record
        self.n_pseudo = getattr(template, "n_pseudo", 0)
        task = unit.task
        self.rows = {s: template.rows([e.subject for e in task.splits[s]], [e.label for e in task.splits[s]],
                                      training=s == "train") for s in SPLITS}
        self.generator = torch.Generator().manual_seed(seed)
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

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def state_dict(self) -> dict[str, Any]:
        """The schedule, to continue from this step exactly as if never stopped (the trainer adds the encoder's
        slice of the bank)."""
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
    counts: tuple[int, int, int]  # the unit's template
    writes: bool = True  # this rank writes the unit's files


class Trainer:
    def __init__(self, backbone: HFBackbone, cfg: ExperimentConfig, allowed: torch.Tensor,
                 progress: Callable[[str], None] = lambda line: None, parallel: ParallelContext | None = None):
        self.backbone, self.cfg, self.progress = backbone, cfg, progress
        self.parallel = parallel or ParallelContext()
        self.active: list[str] = []  # the units in the step under way, for error messages
        self.allowed = allowed.to(backbone.device)
        self.tune_lm = cfg.train.mode != "ptuning"
        if self.tune_lm and not backbone.trainable_lm:
            raise ConfigError(f"train.mode {cfg.train.mode}: this backbone trains prompts only (train.mode ptuning)")
        self.shard = backbone.vocab_shard
        self.protocol = cfg.protocol
        self.uses_prompts = cfg.train.mode != "finetune"
        # on every rank, once: under tensor parallelism reading the embedding's spread is a collective
        self.embedding_std = backbone.embedding_std if self.uses_prompts else 1.0
        self.bank = PromptBank(self.parallel, cfg.parallel.shard_prompts and not self.tune_lm,
                               backbone.hidden_size, backbone.device)
        # an fp16 LM gets loss scaling, unless the protocol reproduces the reference's fp16 without it
        fp16 = backbone_dtype(backbone) == torch.float16
        self.scaler = LossScaler(self.parallel) if fp16 and not self.protocol.lm_fp16 else None
        if self.protocol.lm_dropout:
            # the same dropout masks on every rank of a tensor-parallel group: the same seed, the same draws
            torch.manual_seed(cfg.train.seed)
        self.stop = StopSignal(self.parallel)
        self.lm = LMTuning(backbone, cfg, self.parallel, progress) if self.tune_lm else None
        if not backbone.packs_rows:
            rows = "one fact per row (this model's attention takes no shared rows)"
        elif cfg.train.row_tokens:
            rows = f"facts share rows of up to {cfg.train.row_tokens} tokens"
        else:
            rows = "one fact per row (train.row_tokens 0)"
        homes = f"sharded over {self.parallel.tp_size} tensor-parallel ranks" if self.bank.sharded else "on every rank"
        self.progress(f"layout: {rows}; prompt encoders {homes}" + ("; fp16 loss scaling" if self.scaler else "")
                      + f"; protocol {self.protocol.describe()}")

    # ---- templates and encoders -------------------------------------------------------------------------------
    def manual_template(self, task: RelationTask, cfg: ExperimentConfig | None = None) -> ManualTemplate:
        """The manual prompt's template (cfg: a unit's own settings, for the rows it fine-tunes on)."""
        protocol = (cfg or self.cfg).protocol
        return ManualTemplate(self.backbone.tokenizer, self.backbone.kind, task.info.template,
                              add_bos=self.cfg.model.add_bos, causal_loss_shift=protocol.causal_loss_shift,
                              bpe_spaces=self.protocol.bpe_spaces)

    def counts(self, cfg: ExperimentConfig) -> tuple[int, int, int]:
        return tuple(cfg.prompt.template or default_counts(self.backbone.kind))

    def ptuning_template(self, task: RelationTask, cfg: ExperimentConfig) -> PTuningTemplate:
        """A unit's P-tuning template, from its own settings (cfg: its variant's)."""
        return PTuningTemplate(self.backbone.tokenizer, self.backbone.kind, self.counts(cfg), task.info.template,
                               anchors=cfg.prompt.anchors, add_bos=cfg.model.add_bos,
                               mask_before_subject=cfg.protocol.mask_before_subject,
                               causal_loss_shift=cfg.protocol.causal_loss_shift, bpe_spaces=cfg.protocol.bpe_spaces)

    def check_templates(self, configs: list[ExperimentConfig], task: RelationTask) -> None:
        """Every variant's template builds for this model (a combination it refuses, such as anchors with the
        reference's mask order, stops the run before anything trains, not when its pack comes up)."""
        if self.uses_prompts:
            for cfg in configs:
                self.ptuning_template(task, cfg)

    def initial_encoder(self, template: PTuningTemplate, seed: int, cfg: ExperimentConfig,
                        hold: bool = True) -> dict[str, torch.Tensor] | None:
        """A unit's starting weights (PromptEncoder's initialisation from the unit's seed, then the manual words
        where prompt.init says so) where this rank holds it; None elsewhere. Every rank of the group takes part:
        the manual-word initialisation reads the (possibly tensor-parallel) embedding."""
        init = None
        if cfg.prompt.init == "manual":
            ids = template.manual_init_ids()
            with torch.no_grad():
                words = self.backbone.embed(torch.tensor([i or 0 for i in ids], device=self.backbone.device))
            init = [words[k].float().cpu() if i is not None else None for k, i in enumerate(ids)]
        if not hold:
            return None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = PromptEncoder(template.n_pseudo, self.backbone.hidden_size, cfg.prompt.encoder,
                                    cfg.prompt.lstm_dropout, self.embedding_std)
        if init is not None:
            encoder.init_from(init)
        if not self.bank.sharded and self.parallel.tp_size > 1:
            encoder = encoder.to(self.backbone.device)
            self.parallel.sync_module(encoder)  # replicated: tensor-parallel peers start from the same prompts
        return encoder.state_dict()

    def layout(self, run_or_cfg: UnitRun | ExperimentConfig, n_pseudo: int | None = None) -> Layout:
        """The shape of a unit's encoder: its stack in the bank."""
        cfg = run_or_cfg.cfg if isinstance(run_or_cfg, UnitRun) else run_or_cfg
        n = run_or_cfg.n_pseudo if isinstance(run_or_cfg, UnitRun) else n_pseudo
        return Layout.of(cfg.prompt.encoder, n, self.backbone.hidden_size)

    def vectors(self, runs: list[UnitRun], training: bool = False) -> list[torch.Tensor | None]:
        """The prompt vectors of each run, on every rank of the group (None for the manual template). Encoders are
        in eval mode (no dropout) unless `training`."""
        if not self.uses_prompts:
            return [None] * len(runs)
        return self.bank.vectors([r.unit.id for r in runs], [r.n_pseudo for r in runs], training)

    def saved_vectors(self, units: list[Unit], states: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """The prompt vectors of saved encoders, computed on this rank (evaluation: no optimizer, little memory).
        A state that does not fit the unit's configured encoder raises ValueError naming what differs."""
        out = []
        for unit, state in zip(units, states):
            n_pseudo = self.ptuning_template(unit.task, unit.variant.cfg).n_pseudo
            stack = EncoderStack(self.layout(unit.variant.cfg, n_pseudo), [state], [Settings(0.0, 0.0, 0.0, 0)],
                                 self.backbone.device)
            with torch.no_grad():
                out.append(stack(training=False)[0])
        return out

    # ---- the packed forward -----------------------------------------------------------------------------------
    def packed_logits(self, items: list[tuple[torch.Tensor | None, list[Row]]],
                      weights: list[float] | None = None, separate: bool = False) -> tuple[torch.Tensor, Batch]:
        """One forward over rows of several units; items are (prompt vectors or None, rows). separate: a batch row
        holds facts of one item only."""
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

    @torch.no_grad()
    def ranks(self, items: list[tuple[torch.Tensor | None, list[Row]]]) -> list[torch.Tensor]:
        """Restricted ranks of every row of every item (prompt vectors or None, rows), batched across items and
        bucketed by length. One read-back at the end, not one per chunk."""
        model = self.backbone.model
        was_training = model.training
        model.eval()
        found, where = [], []
        size = self.cfg.train.eval_batch_size
        for chunk, positions in length_buckets([v for v, _ in items], [rows for _, rows in items], size):
            logits, batch = self.packed_logits(chunk)
            found.append(restricted_ranks(logits, batch.labels, self.allowed, self.shard))
            where += positions
        model.train(was_training)
        out = [torch.zeros(len(rows), dtype=torch.long) for _, rows in items]
        for (i, j), rank in zip(where, torch.cat(found).tolist() if found else []):
            out[i][j] = rank
        return out

    def evaluate(self, items: list[tuple[torch.Tensor | None, list[Row]]]) -> list[dict]:
        return [summarize_ranks(r) for r in self.ranks(items)]

    def manual_items(self, tasks: list[RelationTask], split: str = "test") -> list[tuple[None, list[Row]]]:
        """The manual prompt's rows of each relation, as items for ranks()/evaluate()."""
        return [(None, self.manual_template(t).rows([e.subject for e in t.splits[split]],
                                                   [e.label for e in t.splits[split]])) for t in tasks]

    def evaluate_manual(self, tasks: list[RelationTask], split: str = "test") -> dict[str, dict]:
        return {t.id: m for t, m in zip(tasks, self.evaluate(self.manual_items(tasks, split)))}

    def _ranks_of_runs(self, runs: list[UnitRun], split: str,
                       vectors: list[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
        if vectors is None:
            with torch.no_grad():
                vectors = self.vectors(runs)
        return self.ranks([(v, r.rows[split]) for v, r in zip(vectors, runs)])

    def evaluate_runs(self, runs: list[UnitRun], split: str) -> list[dict]:
        return [summarize_ranks(r) for r in self._ranks_of_runs(runs, split)]

    # ---- training -----------------------------------------------------------------------------------------------
    def pack_size(self, units: list[Unit]) -> int:
        """How many units train together: train.pack_units, or with "auto" as many as the device's memory holds
        (ptuning/parallel/capacity.py's arithmetic, for the largest encoder among the units' variants; all of them on a
        CPU)."""
        n_tasks = len(units)
        if self.tune_lm:
            return 1
        pack = self.cfg.train.pack_units
        if pack != "auto":
            return pack or n_tasks
        shards = self.parallel.tp_size if self.bank.sharded else 1
        plans = [capacity.plan_for(self.backbone, cfg, shards)
                 for cfg in {id(u.variant): u.variant.cfg for u in units}.values()]
        plan = min(plans, key=lambda p: p.units if p.units is not None else float("inf"))
        chosen = min(n_tasks, plan.units) if plan.units is not None else n_tasks
        chosen = self.parallel.agree(chosen, "min")  # peers' free memory may differ; their packs may not
        self.progress(f"pack_units auto: {max(1, chosen)} of {n_tasks} units per pack ({plan.reason})"
                      + ("; WARNING: by this estimate not even one fits, trying one" if chosen < 1 else ""))
        return max(1, chosen)

    def train(self, packs: list[list[Unit]], on_result: Callable[[UnitOutcome], None],
              on_epoch: Callable[[UnitRun], None] = lambda run: None,
              restore: Callable[[Unit], dict | None] = lambda unit: None,
              on_stop: Callable[[list[UnitRun]], None] = lambda runs: None,
              before: Callable[[list[Unit]], None] = lambda units: None) -> bool:
        """Train the packs one after another, each pack's units together (ptuning.parallel.assign_packs; under
        pack_units "auto" a pack is split by what the device's memory holds, and the LM fine-tuning modes train one
        unit at a time). before(units) runs ahead of each pack (the manual baseline); on_epoch sees each unit after
        every epoch that did not end it (for checkpoints); restore may return a unit's saved state to continue from.
        On SIGTERM/SIGUSR1 the units under way are handed to on_stop after the step in flight; returns False then,
        True when done."""
        size = self.pack_size([u for pack in packs for u in pack]) if self.tune_lm or self.cfg.train.pack_units \
            == "auto" else None
        index = 0  # each unit's place in this group's list: its encoder's owner under tensor parallelism
        with self.stop:
            for pack in packs:
                for start in range(0, len(pack), size or len(pack)):
                    chunk = pack[start:start + (size or len(pack))]
                    before(chunk)
                    group = list(enumerate(chunk, start=index))
                    index += len(chunk)
                    if not self._train_group(group, on_result, on_epoch, restore, on_stop):
                        return False
        return True

    def _new_run(self, unit: Unit | RelationTask, index: int = 0) -> UnitRun:
        """A unit's schedule (a bare relation: the unit of the run's own settings, as without a sweep)."""
        if isinstance(unit, RelationTask):
            unit = Unit(unit, Variant("", {}, self.cfg))
        cfg = unit.variant.cfg
        template = (self.ptuning_template(unit.task, cfg) if self.uses_prompts else
                    self.manual_template(unit.task, cfg))
        return UnitRun(unit, template, relation_seed(cfg.train.seed, unit.relation), self.bank.holds(index),
                       self.bank.writes(index), drop_last=self.cfg.train.batch_size if cfg.protocol.drop_last else 0)

    def prepare(self, units: list[Unit | RelationTask], first: int = 0) -> list[UnitRun]:
        """Runs for units that train together (unit i at place first + i of its group's list, which decides its
        encoder's home), ready to step: their encoders in the bank, fresh."""
        runs = [self._new_run(unit, first + i) for i, unit in enumerate(units)]
        self._start(runs)
        return runs

    def _start(self, runs: list[UnitRun]) -> None:
        """Put the runs' encoders in the bank (where this rank holds them); in the LM fine-tuning modes give the
        unit its LM optimizer."""
        if self.uses_prompts:
            members = []
            for run in runs:
                cfg = run.cfg
                initial = self.initial_encoder(run.template, relation_seed(cfg.train.seed, run.unit.relation), cfg,
                                               run.holds)
                if run.holds:
                    members.append((run.unit.id, self.layout(run), initial,
                                    Settings(cfg.train.lr, cfg.train.weight_decay, cfg.prompt.lstm_dropout,
                                             dropout_seed(cfg.train.seed, run.unit.relation))))
            self.bank.build(members)
        if self.lm is not None:
            for run in runs:
                stack = self.bank.stack_of(run.unit.id) if self.uses_prompts else None
                run.optimizer, run.engine = self.lm.begin(stack, relation_seed(run.cfg.train.seed,
                                                                               run.unit.relation), run.cfg)

    def _train_group(self, group: list[tuple[int, Unit]], on_result: Callable[[UnitOutcome], None],
                     on_epoch: Callable[[UnitRun], None], restore: Callable[[Unit], dict | None],
                     on_stop: Callable[[list[UnitRun]], None]) -> bool:
        self.active = [unit.id for _, unit in group]
        runs = self.prepare([unit for _, unit in group], group[0][0])
        for run in runs:
            self.active = [run.unit.id]
            state = restore(run.unit)
            if state is not None and run.engine is not None:
                self.progress(f"{run.unit.id}: fine-tuned under DeepSpeed, which is not checkpointed mid-training: "
                              "it starts over")
            elif state is not None:
                self._load_run_state(run, state)
                self.progress(f"{run.unit.id}: resuming after epoch {run.epoch}" if run.cursor == 0 else
                              f"{run.unit.id}: resuming in epoch {run.epoch + 1} at fact {run.cursor} of "
                              f"{len(run.order)}")
        if self.parallel.tp_size > 1 and self.uses_prompts:
            held = [r for r in runs if self.bank.has(r.unit.id)]
            count = sum(self.layout(r).size for r in held)
            self.progress(f"rank {self.parallel.rank} holds the prompt encoders of "
                          f"{', '.join(r.unit.id for r in held) or 'no unit'} ({count:,} parameters)")
        while True:
            active = [r for r in runs if not r.done]
            if not active:
                break
            self.active = [r.unit.id for r in active]
            self.step(active)
            ended = [r for r in active if r.epoch_over]
            if ended:
                self._end_epochs(ended)
                for run in ended:
                    if not run.done:
                        on_epoch(run)
                finished = [r for r in ended if r.done]
                if finished:
                    for outcome in self._finish(finished):
                        on_result(outcome)
            if self.stop.requested():
                on_stop([r for r in runs if not r.done])
                return False
        self.active = []
        return True

    def run_state(self, run: UnitRun) -> dict[str, Any]:
        """Everything a unit needs to continue exactly (written by the rank that holds it): its schedule, its
        encoder's slice of the bank with its Adam state and dropout generator, its LM copy when the LM trains, its
        loss scale."""
        state = run.state_dict()
        uid = run.unit.id
        if self.bank.has(uid):
            state["encoder"] = self.bank.weights(uid)
            state["dropout_generator"] = self.bank.generator_state(uid)
        if self.lm is not None:  # each unit fine-tunes its own LM copy: it is part of the unit's state
            state["lm"] = self.lm.state()
            state["optimizer"] = run.optimizer.state_dict()
        else:
            state["optimizer"] = self.bank.optimizer_state(uid) if self.bank.has(uid) else {}
        if self.scaler is not None:
            state["loss_scale"] = self.scaler.state_dict(uid)
        return state

    def checkpoints(self, run: UnitRun) -> bool:
        """Whether a unit's state can be checkpointed mid-training: not under DeepSpeed (ptuning/train/finetune.py)."""
        return run.engine is None

    def _load_run_state(self, run: UnitRun, state: dict[str, Any]) -> None:
        run.load_state_dict(state)
        uid = run.unit.id
        if self.bank.has(uid):
            self.bank.load_weights(uid, state["encoder"])
            if "dropout_generator" in state:
                self.bank.load_generator_state(uid, state["dropout_generator"])
            if self.lm is None:
                self.bank.load_optimizer_state(uid, state["optimizer"])
        if self.lm is not None:
            self.lm.load(state["lm"])
            if run.holds:
                try:
                    run.optimizer.load_state_dict(state["optimizer"])
                except ValueError:  # written before the prompt bank: the encoder's tensors were separate then
                    raise DataError(f"{uid}: its checkpoint was written by an earlier version (the encoder's "
                                    "optimizer state no longer fits); delete the checkpoint to restart the unit") \
                        from None
        if self.scaler is not None and "loss_scale" in state:
            self.scaler.load_state_dict(uid, state["loss_scale"])

    def loss(self, runs: list[UnitRun], scales: dict[str, float] | None = None) -> torch.Tensor:
        """The next micro-batch of every unit, packed: the sum over units of each one's mean row loss (times its
        fp16 loss scale)."""
        vectors = self.vectors(runs, training=True)
        rows = [r.next_batch(self.cfg.train.batch_size) for r in runs]
        return self.packed_loss(vectors, rows, [scales[r.unit.id] if scales else 1.0 for r in runs])

    def packed_loss(self, vectors: list[torch.Tensor | None], rows: list[list[Row]],
                    factors: list[float]) -> torch.Tensor:
        """sum_i factors[i] x the mean loss of item i's rows under its prompt vectors, through the LM in
        length-sorted chunks of rows."""
        loss = torch.zeros((), device=self.backbone.device)
        for chunk, positions in length_buckets(vectors, rows, self.cfg.train.bucket_rows):
            # under fp16 a unit's overflow stays its own: its facts share rows only with each other
            logits, batch = self.packed_logits(chunk, [factors[i] / len(rows[i]) for i, _ in positions],
                                               separate=self.scaler is not None)
            loss = loss + (cross_entropy(logits, batch.labels, self.shard) * batch.weights).sum()
        return loss

    def step(self, runs: list[UnitRun]) -> None:
        """One training step of the runs together: their next micro-batches, one backward, their encoders' Adam."""
        if self.protocol.lm_dropout and not self.tune_lm:  # the reference's model.train(): the frozen LM's dropout
            self.backbone.dropout(True)
        uids = [r.unit.id for r in runs]
        if runs[0].engine is not None:  # DeepSpeed: one unit at a time (LM fine-tuning), its own fp16 scaling
            self.lm.step(runs[0].engine, self.loss(runs))
            return
        scales = {u: self.scaler.scale(u) for u in uids} if self.scaler is not None else None
        loss = self.loss(runs, scales)
        loss.backward()
        stepping = uids
        if self.scaler is not None:
            verdict = self.scaler.verdict(uids, self._overflow(runs))
            stepping = [u for u, ok in zip(uids, verdict) if ok]
        if self.lm is None:
            self.bank.step(stepping, scales)
            return
        optimizer = runs[0].optimizer  # one unit at a time while the LM trains
        if optimizer is not None:
            if stepping:
                if scales is not None:
                    for grad in self._lm_grads(optimizer):
                        grad.div_(scales[uids[0]])
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    @staticmethod
    def _lm_grads(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        return [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]

    def _overflow(self, runs: list[UnitRun]) -> torch.Tensor:
        """1.0 for each unit whose gradient overflowed on this rank."""
        if self.lm is None:
            return self.bank.overflow([r.unit.id for r in runs])
        grads = self._lm_grads(runs[0].optimizer) if runs[0].optimizer is not None else []
        flag = torch.zeros((), device=self.backbone.device)
        for grad in grads:
            flag = torch.maximum(flag, (~torch.isfinite(grad)).any().float())
        return flag.reshape(1)

    def _decay_lr(self, run: UnitRun) -> None:
        """ExponentialLR (the unit's train.lr_decay), once per epoch of this unit."""
        gamma = run.cfg.train.lr_decay
        if self.lm is not None:
            if run.optimizer is not None:
                for group in run.optimizer.param_groups:
                    group["lr"] *= gamma
        elif self.bank.has(run.unit.id):
            self.bank.decay_lr(run.unit.id, gamma)

    def _end_epochs(self, runs: list[UnitRun]) -> None:
        """Scheduler step, dev P@1, best state and early stopping for the units whose epoch just ended, each by its
        own settings."""
        dev = self.evaluate_runs(runs, "dev")
        for run, metrics in zip(runs, dev):
            train, protocol = run.cfg.train, run.cfg.protocol
            # the reference trains a last epoch it never evaluates: it cannot be selected, so it is not run
            last = train.max_epochs - (1 if protocol.last_epoch_unevaluated else 0)
            self._decay_lr(run)
            run.epoch += 1
            score = metrics["p@1"]
            run.dev_history.append(score)
            better = score >= run.best_dev if protocol.latest_tie else score > run.best_dev
            if better:
                run.best_dev, run.best_epoch, run.bad_epochs = score, run.epoch, 0
                run.best_state = self._snapshot(run)
            else:
                run.bad_epochs += 1
            run.done = run.bad_epochs >= train.patience or run.epoch >= last
            self.progress(f"{run.unit.id} epoch {run.epoch}: dev P@1 {score:.3f} "
                          f"(best {run.best_dev:.3f} at epoch {run.best_epoch})")
            if not run.done:
                run.start_epoch()

    def _snapshot(self, run: UnitRun) -> dict | None:
        """The best epoch's weights, in host memory: on a GPU the device keeps only what the steps use."""
        if not run.holds:
            return None
        state = {}
        if self.bank.has(run.unit.id):
            state["encoder"] = self.bank.weights(run.unit.id)
        if self.lm is not None:
            state["lm"] = self.lm.snapshot()
        return state

    def _finish(self, runs: list[UnitRun]) -> list[UnitOutcome]:
        """Load each unit's best state, evaluate test at the best dev epoch, and take the units out of the bank."""
        for run in runs:
            if self.bank.has(run.unit.id):
                self.bank.load_weights(run.unit.id, run.best_state["encoder"])
            if self.lm is not None:
                self.lm.load(run.best_state["lm"])
            run.best_state = None
            run.optimizer = None  # its state is no longer needed: free it before the next units start
        with torch.no_grad():
            vectors = self.vectors(runs)
        ranks = self._ranks_of_runs(runs, "test", vectors)
        outcomes = []
        for run, found, vector in zip(runs, ranks, vectors):
            metrics = summarize_ranks(found)
            uid = run.unit.id
            prompt = (self.bank.weights(uid), vector.detach().cpu()) if self.bank.has(uid) else None
            outcomes.append(UnitOutcome(run.unit, {
                "dev_p@1": run.best_dev,
                "test_p@1": metrics["p@1"], "test_p@10": metrics["p@10"], "test_mrr": metrics["mrr"],
                "best_epoch": run.best_epoch, "epochs_run": run.epoch,
                "seconds": round(run.elapsed(), 1),
                "dev_history": run.dev_history,
            }, prompt, found.tolist(), self.counts(run.cfg), run.writes))
            if self.bank.has(uid):
                self.bank.drop(uid)
        if self.lm is not None:
            for run in runs:
                self.lm.end(run.engine)
                run.engine = None
        return outcomes
