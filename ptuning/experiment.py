"""One experiment end to end: data, model, answer vocabulary, manual baseline, P-tuning, results on disk.

Knows nothing of how it was launched; launcher/run.py parses the command line and calls run_experiment.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ptuning.config import ExperimentConfig
from ptuning.data import DataError, find_layout, read_relation_infos, select_relations
from ptuning.encoders import PromptEncoder
from ptuning.models import load_backbone
from ptuning.progress import Progress
from ptuning.results import Report, load_tensors, save_tensors
from ptuning.tasks import RelationTask, prepare_task, read_relation
from ptuning.trainer import RelationOutcome, Trainer
from ptuning.vocab import build_answer_vocab, default_vocab_key

MODES = ("train", "evaluate", "manual")  # P-tune (default), --only-evaluate saved prompts, --manual-baseline only


def encoder_path(out_dir: Path, relation: str) -> Path:
    return out_dir / "relations" / relation / "prompt_encoder.safetensors"


def vectors_path(out_dir: Path, relation: str) -> Path:
    return out_dir / "relations" / relation / "prompt_vectors.safetensors"


def run_experiment(cfg: ExperimentConfig, data_dir: str | Path, mode: str = "train") -> Report:
    out_dir = Path(cfg.output.dir)
    layout = find_layout(data_dir)
    infos = read_relation_infos(layout)
    relation_ids = select_relations(layout, cfg.data.relations)
    missing = [r for r in relation_ids if r not in infos]
    if missing:
        raise DataError(f"{layout.root}: relations.jsonl has no template for {', '.join(missing)}")
    facts = {r: read_relation(layout, r) for r in relation_ids}  # every data error surfaces before the model loads

    backbone = load_backbone(cfg.model)
    vocab_key = cfg.data.vocab_key or default_vocab_key(cfg.model.name)
    vocab = build_answer_vocab(backbone.tokenizer, backbone.vocab_size, cfg.data.vocab,
                               layout if cfg.data.vocab != "original" else None, vocab_key)
    if cfg.data.vocab != "original":
        vocab_label = vocab.name if vocab_key in cfg.model.name else f"{vocab.name} ({vocab_key} list mapped)"
    else:
        vocab_label = vocab.name
    tasks = [prepare_task(infos[r], facts[r], vocab, cfg.data) for r in relation_ids]
    ready = [t for t in tasks if t.skip_reason is None]

    report = Report(out_dir, {
        "model": cfg.model.name, "kind": backbone.kind, "vocab": vocab_label, "vocab_strategy": cfg.data.vocab,
        "vocab_key": vocab_key if cfg.data.vocab != "original" else None, "answer_vocab_size": vocab.size,
        "mode": cfg.train.mode if mode == "train" else mode, "data_dir": str(layout.root),
        "config": cfg.to_dict(),
    })
    progress = Progress(cfg.logging.progress, total=len(ready))
    for task in tasks:
        fields: dict[str, Any] = {"label": task.info.label, **task.counts(), "dropped": task.dropped,
                                  "capped": task.capped}
        if task.skip_reason:
            fields.update(status="skipped", reason=task.skip_reason)
            progress.line(f"{task.id} skipped: {task.skip_reason}")
        report.update(task.id, fields)

    trainer = Trainer(backbone, cfg, vocab.allowed, progress=progress.line)
    if ready and (mode == "manual" or cfg.train.manual_baseline):
        progress.line(f"manual prompts: evaluating test for {len(ready)} relations")
        for rid, m in trainer.evaluate_manual(ready).items():
            report.update(rid, {"manual_p@1": m["p@1"], "manual_p@10": m["p@10"], "manual_mrr": m["mrr"]})
            if mode == "manual":
                report.update(rid, {"status": "manual_only"})
    if mode == "train":
        def finished(outcome: RelationOutcome) -> None:
            if outcome.encoder is not None and cfg.output.save_encoders:
                _save_prompt(out_dir, outcome, cfg, trainer)
            report.update(outcome.task.id, {"status": "done", **outcome.metrics})
            progress.relation_done(f"{outcome.task.id} done: test P@1 {outcome.metrics['test_p@1']:.3f} "
                                   f"(best dev epoch {outcome.metrics['best_epoch']})")
        trainer.train(ready, finished)
    elif mode == "evaluate":
        _evaluate_saved(out_dir, ready, trainer, report)
    progress.close()
    return report


def _save_prompt(out_dir: Path, outcome: RelationOutcome, cfg: ExperimentConfig, trainer: Trainer) -> None:
    rid = outcome.task.id
    meta = {"relation": rid, "model": cfg.model.name, "encoder": cfg.prompt.encoder,
            "template": ",".join(map(str, trainer.counts)), "anchors": str(cfg.prompt.anchors)}
    save_tensors(encoder_path(out_dir, rid), outcome.encoder.state_dict(), meta)
    with torch.no_grad():
        # The final prompt vectors on their own: pseudo token i of the template, in order; no encoder needed.
        save_tensors(vectors_path(out_dir, rid), {"prompt_vectors": outcome.encoder()}, meta)


def _evaluate_saved(out_dir: Path, tasks: list[RelationTask], trainer: Trainer, report: Report) -> None:
    encoders = []
    for task in tasks:
        path = encoder_path(out_dir, task.id)
        if not path.is_file():
            raise DataError(f"{path}: no saved prompt encoder for {task.id}; train first (without --only-evaluate)")
        template = trainer.ptuning_template(task)
        encoder = trainer.new_encoder(template, seed=0)
        try:
            encoder.load_state_dict(load_tensors(path))
        except RuntimeError as error:
            raise DataError(f"{path}: does not fit the configured prompt encoder ({error})") from None
        encoders.append((encoder, template))
    for split in ("dev", "test"):
        items = [(enc, tpl.rows([e.subject for e in t.splits[split]], [e.label for e in t.splits[split]]))
                 for t, (enc, tpl) in zip(tasks, encoders)]
        for task, m in zip(tasks, trainer.evaluate(items)):
            fields = {"dev_p@1": m["p@1"]} if split == "dev" else {
                "status": "evaluated", "test_p@1": m["p@1"], "test_p@10": m["p@10"], "test_mrr": m["mrr"]}
            report.update(task.id, fields)
