"""One experiment end to end: data, model, answer vocabulary, manual baseline, P-tuning, results on disk.

Every rank runs this. The units (each relation under each sweep variant, ptuning/config/sweep.py) are cut into packs and
the packs spread over the data-parallel replicas by their training work; each unit's writer rank records it in the
output folder (ptuning/output/store.py), and the coordinator (rank 0) folds those records into results.json, results.md
and W&B as they land. One process is the special case of one group. Knows nothing of how it was launched:
launcher/run.py parses the command line, makes the process groups and calls run_experiment.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


from ptuning.config import ConfigError, ExperimentConfig
from ptuning.config.sweep import Unit, units, variants
from ptuning.data.lama import (DataError, check_subset, check_subset_task, describe, find_layout, read_relation_infos,
                               read_vocab_words, select_relations)
from ptuning.data.tasks import RelationTask, prepare_task, read_relation
from ptuning.data.templates import TemplateError, rows_of
from ptuning.data.controls import facts_of, relation_controls
from ptuning.data.vocab import AnswerVocab, answer_vocab, vocab_key_of
from ptuning.files import one_line
from ptuning.model.loading import ModelError, load_backbone, resolve_device, resolve_dtype
from ptuning.model.metrics import TOP, figures
from ptuning.output.coordinator import Coordinator
from ptuning.output.progress import Progress
from ptuning.output.store import FINAL, RunStore
from ptuning.output.wandb_log import WandbLogger
from ptuning.parallel.context import ParallelContext, set_compute
from ptuning.parallel.packs import assign_packs
from ptuning.train.checkpoint import Checkpoints
from ptuning.train.trainer import Events, Trainer
from ptuning.train.unit_run import UnitOutcome, UnitRun


USER_ERRORS = (ConfigError, DataError, ModelError, TemplateError)  # one line and exit status 2 (launcher/run.py)


class RelationFailure(RuntimeError):
    """A rank failed while working on some units; the message names both."""


class Stopped(RuntimeError):
    """SIGTERM/SIGUSR1 stopped the run after checkpointing every unit under way; the same command resumes."""


def run_experiment(cfg: ExperimentConfig, data_dir: str | Path, mode: str = "train",
                   parallel: ParallelContext | None = None) -> dict[str, Any] | None:
    """Returns the results payload on the coordinator, None on the other ranks."""
    ctx = parallel or ParallelContext()
    set_compute(cfg.parallel.threads, cfg.parallel.deterministic)
    store = RunStore(cfg.output.dir)
    layout = find_layout(data_dir)
    infos = read_relation_infos(layout)
    relation_ids = select_relations(layout, cfg.data.relations)
    caps = {"train": cfg.data.max_train, "dev": cfg.data.max_dev, "test": cfg.data.max_test}
    check_subset(layout, caps)
    missing = [r for r in relation_ids if r not in infos]
    if missing:
        raise DataError(f"{layout.root}: relations.jsonl has no template for {', '.join(missing)}")
    facts = {r: read_relation(layout, r) for r in relation_ids}  # every data error surfaces before the model loads
    if cfg.data.uses_vocab_file:
        read_vocab_words(layout, cfg.data.vocab, vocab_key_of(cfg))  # the vocabulary file too
    sweep = variants(cfg)
    if ctx.device is not None:
        cfg.model.device = str(ctx.device)
    cfg.model.dtype, why = resolve_dtype(cfg.model.dtype, resolve_device(cfg.model.device), cfg.protocol.lm_fp16)
    for variant in sweep:  # a variant shares the model
        variant.cfg.model.device, variant.cfg.model.dtype = cfg.model.device, cfg.model.dtype
    if ctx.coordinator:  # before the model loads: a busy or broken folder stops the run at once
        store.lock(ctx.job or f"pid {os.getpid()}")
        store.check_resumable(cfg)

    backbone = load_backbone(cfg.model, ctx, seed=cfg.train.seed)
    vocab, vocab_key = answer_vocab(cfg, backbone, layout)
    mapped = cfg.data.uses_vocab_file and vocab_key != Path(cfg.model.name).name
    tasks = [prepare_task(infos[r], facts[r], vocab, cfg.data) for r in relation_ids]
    for task in tasks:
        check_subset_task(layout, task.id, {s: len(task.splits[s]) for s in task.splits}, caps)
    ready = [t for t in tasks if t.skip_reason is None]
    by_id = {u.id: u for u in units(ready, sweep)}
    shares = assign_packs({i: len(u.task.splits["train"]) for i, u in by_id.items()}, cfg.train.pack_units,
                          ctx.n_replicas)
    packs = [[by_id[i] for i in pack] for pack in shares[ctx.replica]]
    # a relation's manual baseline is its first unit's replica's to evaluate (its variants may be spread over them)
    manual_replica = {}
    for index, share in enumerate(shares):
        for pack in share:
            for uid in pack:
                manual_replica.setdefault(by_id[uid].relation, index)

    header = {
        "model": cfg.model.name, "kind": backbone.kind,
        "vocab": f"{vocab.name} ({vocab_key} list mapped)" if mapped else vocab.name,
        "vocab_strategy": cfg.data.vocab, "vocab_key": vocab_key if cfg.data.uses_vocab_file else None,
        "answer_vocab_size": vocab.size, "mode": cfg.train.mode if mode == "train" else mode,
        "control": cfg.model.control,
        "protocol": cfg.protocol.describe(),
        "data_dir": str(layout.root), "world_size": ctx.world_size, "config": cfg.to_dict(),
    }
    if cfg.sweep is not None:
        header["variants"] = {v.name: {"overrides": v.overrides, "setting": v.setting} for v in sweep}
    progress = Progress(cfg.logging.progress if ctx.coordinator else "lines", total=len(by_id),
                        epochs=sum(u.variant.cfg.train.max_epochs for u in by_id.values()))
    coordinator = None
    if ctx.coordinator:
        store.begin(cfg)  # only now, with the model loaded, is an old folder cleared (output.resume false)
        for task in ready:
            store.write_facts(task.id, facts_of(task))
        coordinator = Coordinator(store, header, {t.id: _base_fields(t) for t in tasks}, sweep,
                                  _wandb(cfg, store, header, sweep) if cfg.logging.wandb else None, progress)
        coordinator.start()

    ctx.barrier()  # the folder is cleared (or kept) before any rank writes to it
    progress.line(f"data: {describe(layout)}")
    progress.line(f"model: {cfg.model.name}, {backbone.kind} LM, weights in {cfg.model.dtype} ({why})")
    if cfg.model.control == "random-lm":
        progress.line(f"control random-lm: the weights are freshly initialised (seed {cfg.train.seed}), not trained")
    worker = _Worker(cfg, store, backbone, vocab, ctx, progress, header,
                     {r for r, g in manual_replica.items() if g == ctx.replica})
    if ready:
        worker.trainer.templates.check([v.cfg for v in sweep], ready[0])
    try:
        finished = worker.run(packs, mode)
    except USER_ERRORS:
        raise  # a bad file or setting found on the way: one line, not a rank failure
    except Exception as error:
        active = ", ".join(worker.trainer.active or [u.id for pack in packs for u in pack]) or "-"
        raise RelationFailure(f"rank {ctx.rank} failed on unit(s) {active}: "
                              f"{type(error).__name__}: {error}") from error
    if not finished:
        raise Stopped(f"rank {ctx.rank}: stopped by {worker.trainer.stop.name} after checkpointing its units "
                      "under way; run the same command to resume")
    ctx.barrier()  # every group's units are on disk
    if coordinator is None:
        return None
    payload = coordinator.finish()
    progress.close()
    return payload


def _base_fields(task: RelationTask) -> dict[str, Any]:
    fields: dict[str, Any] = {"label": task.info.label, **task.counts(), "dropped": task.dropped,
                              "capped": task.capped, "test_facts": task.fingerprint("test")}
    if task.skip_reason:
        fields.update(status="skipped", reason=task.skip_reason)
    else:
        fields.update(relation_controls(task))
    return fields


def _wandb(cfg: ExperimentConfig, store: RunStore, header: dict[str, Any], sweep: list) -> WandbLogger:
    group = cfg.logging.wandb_group or f"{Path(cfg.model.name).name}-{cfg.data.vocab}"
    job_type = cfg.logging.wandb_job_type or header["mode"]
    return WandbLogger(store.root, header, group=group, job_type=job_type, variants=sweep,
                       project=cfg.logging.wandb_project)


class _Worker(Events):
    """What every rank does with its replica's units; only each unit's writer writes. As the training loop's Events
    it records each finished unit and each epoch's progress, and runs the manual baseline ahead of each pack."""

    def __init__(self, cfg: ExperimentConfig, store: RunStore, backbone, vocab: AnswerVocab, ctx: ParallelContext,
                 progress: Progress, header: dict[str, Any], manual: set[str]):
        self.cfg, self.store, self.ctx, self.progress, self.vocab = cfg, store, ctx, progress, vocab
        self.manual = manual  # the relations whose manual baseline this replica evaluates
        self.trainer = Trainer(backbone, cfg, vocab.allowed, progress=progress.line, parallel=ctx)
        self.model_name = header["model"]

    def write_ranks(self, unit: str, kind: str, ranks: list[int], top: list[list[int]]) -> None:
        """Each test fact's rank and best answers (as words)."""
        self.store.write_ranks(unit, kind, ranks, [self.vocab.words(ids) for ids in top])

    def record(self, unit: str, fields: dict[str, Any]) -> None:
        """A record this rank's tensor-parallel group shares (the manual baseline): its first rank writes it."""
        if self.ctx.writer:
            self.store.write_result(unit, fields)

    def run(self, packs: list[list[Unit]], mode: str) -> bool:
        """This replica's packs, one after another. False when a signal stopped training (checkpoints written), True
        otherwise. Everything a pack evaluates (manual prompts, dev, test) is batched within the pack, so a unit
        sees the same batches whichever replica its pack falls to."""
        if self.cfg.output.resume:
            done = [u.id for pack in packs for u in pack if (self.store.result(u.id) or {}).get("status") == FINAL[mode]]
            if done:
                self.progress.line(f"already final, skipped: {', '.join(done)}")
            packs = [[u for u in pack if u.id not in set(done)] for pack in packs]
            packs = [pack for pack in packs if pack]
        if not packs:
            return True
        if mode == "train":
            checkpoints = Checkpoints(self.store.checkpoint_path, self.cfg.output.checkpoint_minutes,
                                      self.cfg.output.resume)
            return self.trainer.train(packs, self, checkpoints)
        for pack in packs:
            if mode == "manual":
                self.manual_baseline(pack, always=True)
                for unit in pack:
                    self.record(unit.id, {"status": FINAL["manual"]})
            else:
                self.manual_baseline(pack)
                self.evaluate_saved(pack)
        return True

    def before_pack(self, units: list[Unit]) -> None:
        self.manual_baseline(units)

    def manual_baseline(self, pack: list[Unit], always: bool = False) -> None:
        """The manual prompts' test P@1 of the pack's relations that have none recorded yet (train.manual_baseline,
        or always for --manual-baseline). A relation's, whatever the variant: the manual prompt has no settings a
        sweep varies."""
        tasks = [t for t in {u.relation: u.task for u in pack}.values() if t.id in self.manual]
        need = [t for t in tasks if "manual_p@1" not in (self.store.result(t.id) or {})]
        if not need or not (always or self.cfg.train.manual_baseline):
            return
        self.progress.line(f"manual prompts: evaluating test for {len(need)} relations")
        forward = self.trainer.forward
        for task, ranks, top in zip(need, *forward.predictions(forward.manual_items(need), TOP)):
            if self.ctx.writer:
                self.write_ranks(task.id, "manual", ranks.tolist(), top.tolist())
            self.record(task.id, figures(ranks, "manual_"))

    def epoch_ended(self, run: UnitRun) -> None:
        """Progress after every epoch (for W&B and the progress bar, read by the coordinator)."""
        if run.writes:
            self.store.write_progress(run.unit.id, {"dev_history": run.dev_history})

    def finished(self, outcome: UnitOutcome) -> None:
        unit = outcome.unit.id
        if outcome.writes:
            if outcome.prompt is not None and self.cfg.output.save_encoders:
                cfg = outcome.unit.variant.cfg
                self.store.save_prompt(unit, *outcome.prompt, {
                    "relation": outcome.unit.relation, "variant": outcome.unit.variant.name,
                    "model": self.model_name, "encoder": cfg.prompt.encoder,
                    "template": ",".join(map(str, outcome.counts)), "anchors": str(cfg.prompt.anchors)})
            self.store.write_progress(unit, {"dev_history": outcome.metrics["dev_history"]})
            self.write_ranks(unit, "test", outcome.test_ranks, outcome.test_top)
            self.store.write_result(unit, {"status": FINAL["train"], **outcome.metrics})
        if not self.ctx.coordinator:  # the coordinator announces every unit as its record lands
            self.progress.line(f"{unit} done: test P@1 {outcome.metrics['test_p@1']:.3f} "
                               f"(best dev epoch {outcome.metrics['best_epoch']})")

    def evaluate_saved(self, pack: list[Unit]) -> None:
        # every rank evaluates with every saved encoder: no optimizer state, little memory
        forward, loaded = self.trainer.forward, []
        for unit in pack:
            try:
                vector = forward.saved_vectors([unit], [self.store.load_encoder_state(unit.id)])[0]
            except ValueError as error:
                raise DataError(f"{self.store.encoder_path(unit.id)}: does not fit the configured prompt encoder "
                                f"({one_line(error)})") from None
            loaded.append((unit, vector, self.trainer.templates.ptuning(unit.task, unit.variant.cfg)))
        dev = forward.ranks([(vector, rows_of(template, unit.task, "dev")) for unit, vector, template in loaded])
        test, top = forward.predictions([(vector, rows_of(template, unit.task, "test"))
                                         for unit, vector, template in loaded], TOP)
        for (unit, _, _), dev_ranks, ranks, best in zip(loaded, dev, test, top):
            if self.ctx.writer:
                self.write_ranks(unit.id, "test", ranks.tolist(), best.tolist())
            self.record(unit.id, {"status": FINAL["evaluate"], **figures(dev_ranks, "dev_"), **figures(ranks, "test_")})
