"""What the benchmarks that drive the Trainer directly share: the set-up run_experiment does before training."""
from __future__ import annotations

from ptuning.config import ExperimentConfig
from ptuning.data.lama import find_layout, read_relation_infos
from ptuning.data.vocab import answer_vocab
from ptuning.model.loading import load_backbone
from ptuning.data.tasks import RelationTask, prepare_task, read_relation
from ptuning.train.trainer import Trainer


def trainer_and_tasks(cfg: ExperimentConfig, data_dir: str, relations: list[str]) -> tuple[Trainer, list[RelationTask]]:
    """The configured model, its answer vocabulary (as run_experiment picks it) and the relations' tasks."""
    layout = find_layout(data_dir)
    infos = read_relation_infos(layout)
    backbone = load_backbone(cfg.model)
    vocab, _ = answer_vocab(cfg, backbone, layout)
    tasks = [prepare_task(infos[r], read_relation(layout, r), vocab, cfg.data) for r in relations]
    return Trainer(backbone, cfg, vocab.allowed), tasks
