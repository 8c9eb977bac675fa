"""The two protocols: what the paper describes (paper) and what THUDM's LAMA code did (reference), one quirk at a
time, each pinned on a tiny model against the behaviour it reproduces."""
import json

import pytest
import torch
from transformers import AutoTokenizer

from ptuning.config import QUIRKS, ConfigError, load_config
from ptuning.data.lama import find_layout, read_relation_infos
from ptuning.experiment import run_experiment
from ptuning.model.loading import load_backbone
from ptuning.data.tasks import prepare_task, read_relation
from ptuning.data.templates import ManualTemplate, PTuningTemplate
from ptuning.train.trainer import Trainer
from ptuning.data.vocab import build_answer_vocab

BORN = "[X] was born in [Y] ."


def test_reference_sets_every_quirk_and_each_can_be_set_alone(tmp_path):
    paper = load_config(None)
    assert paper.protocol.name == "paper" and not any(paper.protocol.quirks().values())
    assert paper.protocol.describe() == "paper" and paper.model.dtype == "float32"
    reference = load_config(None, ["protocol=reference"])
    assert all(reference.protocol.quirks().values()) and set(reference.protocol.quirks()) == set(QUIRKS)
    assert reference.model.dtype == "float16"  # the reference's LM, without loss scaling
    one = load_config(None, ["protocol.latest_tie=true"])
    assert one.protocol.describe() == "paper + latest_tie" and one.protocol.quirks()["latest_tie"]
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"protocol": "reference"}))
    less = load_config(path, ["protocol.lm_fp16=false"])
    assert less.protocol.describe() == "reference - lm_fp16" and less.model.dtype == "float32"
    with pytest.raises(ConfigError, match="protocol.name: 'thudm' is not one of paper, reference"):
        load_config(None, ["protocol=thudm"])
    with pytest.raises(ConfigError, match="protocol.lm_fp16 puts the LM in float16"):
        load_config(None, ["protocol=reference", "model.dtype=bfloat16"])


def test_the_lms_dropout_ties_a_unit_to_its_pack_and_says_so():
    """The frozen LM's dropout (lm_dropout) draws from the process's generator, unlike the encoders' own: the
    deterministic mode refuses it, and a folder made under it resumes only with the same packs."""
    from ptuning.output.store import identity

    with pytest.raises(ConfigError, match="protocol.lm_dropout draws the frozen LM's dropout masks"):
        load_config(None, ["protocol.lm_dropout=true", "parallel.deterministic=true", "train.pack_units=1",
                           "parallel.threads=1"])
    assert "pack_units" not in identity(load_config(None))["train"]
    assert identity(load_config(None, ["protocol.lm_dropout=true"]))["train"]["pack_units"] == 0
    # the encoders' dropout is each unit's own: no longer refused beside the LM's under tensor parallelism
    load_config(None, ["protocol.lm_dropout=true", "prompt.lstm_dropout=0.1", "parallel.tensor_parallel=2"])


def _trainer_and_tasks(model, lama, *overrides, relations=("P36",)):
    cfg = load_config(None, [f"model.name={model}", "data.max_train=20", "data.max_dev=8", "data.max_test=8",
                             "train.lr=0.01", *overrides])
    backbone = load_backbone(cfg.model)
    layout = find_layout(lama)
    vocab = build_answer_vocab(backbone.tokenizer, backbone.vocab_size, "shared", layout, "bert-base-cased")
    infos = read_relation_infos(layout)
    tasks = [prepare_task(infos[r], read_relation(layout, r), vocab, cfg.data) for r in relations]
    return Trainer(backbone, cfg, vocab.allowed), tasks


def _hf_loss_with_labels_at_the_last_position(trainer, run, picked):
    """The reference's causal loss: one row per fact, the label at the last position, and the Hugging Face model
    shifting it (so its logits at L-2 are scored)."""
    facts = [run.task.splits["train"][i] for i in picked]
    vectors = trainer.forward.vectors([run])[0]
    losses = []
    for row in run.template.rows([f.subject for f in facts], [f.label for f in facts]):
        ids = torch.tensor([row.ids])
        slots = torch.tensor(row.pseudo)
        embeds = torch.where((slots >= 0)[None, :, None], vectors[slots.clamp(min=0)][None],
                             trainer.backbone.embed(ids))
        labels = torch.full_like(ids, -100)
        labels[0, -1] = row.label
        losses.append(trainer.backbone.model(inputs_embeds=embeds, labels=labels).loss)
    return torch.stack(losses).mean()


@pytest.mark.parametrize("protocol", ["paper", "reference"])
def test_causal_loss_is_read_at_L_minus_2_under_reference_and_L_minus_1_under_paper(protocol, tiny_gpt2, lama):
    trainer, tasks = _trainer_and_tasks(tiny_gpt2, lama, f"protocol.causal_loss_shift={protocol == 'reference'}")
    run, = trainer.prepare(tasks[:1])
    picked = run.order[:8]
    ours = trainer.step.loss([run])
    reference = _hf_loss_with_labels_at_the_last_position(trainer, run, picked)
    if protocol == "reference":
        assert ours.item() == pytest.approx(reference.item(), rel=1e-5)
    else:
        assert abs(ours.item() - reference.item()) > 1e-3
    # evaluation reads the last position under both
    assert all(r.target == len(r.ids) - 1 for r in run.rows["dev"] + run.rows["test"])
    shift = 2 if protocol == "reference" else 1
    assert all(r.target == len(r.ids) - shift for r in run.rows["train"])


def test_masked_token_order_puts_the_mask_before_the_subject_under_reference(tiny_bert, tiny_roberta):
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    row = PTuningTemplate(tok, "masked", (3, 3, 3), BORN, mask_before_subject=True).rows(["Paris"], [7])[0]
    assert row.pseudo == (-1, 0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1)
    assert row.ids[4] == tok.mask_token_id and row.target == 4
    assert row.ids[8] == tok.convert_tokens_to_ids("Paris")
    paper = PTuningTemplate(tok, "masked", (3, 3, 3), BORN).rows(["Paris"], [7])[0]
    assert paper.ids[4] == tok.convert_tokens_to_ids("Paris") and paper.target == 8
    # t2 = 0 on a BPE masked LM: the reference closed with the bare '.', the paper protocol with ' .'
    roberta = AutoTokenizer.from_pretrained(tiny_roberta)
    bare = PTuningTemplate(roberta, "masked", (3, 3, 0), BORN, mask_before_subject=True, bpe_spaces=True)
    assert roberta.convert_ids_to_tokens([bare.rows(["Paris"], [7])[0].ids[-2]]) == ["."]
    spaced = PTuningTemplate(roberta, "masked", (3, 3, 0), BORN).rows(["Paris"], [7])[0]
    assert roberta.convert_ids_to_tokens([spaced.ids[-2]]) == ["Ġ."]
    with pytest.raises(Exception, match="prompt.anchors with protocol.mask_before_subject"):
        PTuningTemplate(tok, "masked", (3, 3, 3), BORN, anchors=True, mask_before_subject=True)


def test_manual_prompts_under_bpe_spaces_score_a_lone_space_token(tiny_gpt2, tiny_roberta):
    gpt = AutoTokenizer.from_pretrained(tiny_gpt2)
    row = ManualTemplate(gpt, "causal", BORN, bpe_spaces=True).rows(["Paris"], [7])[0]
    tokens = gpt.convert_ids_to_tokens(list(row.ids))
    assert tokens[0] == "ĠParis" and tokens[-1] == "Ġ" and row.target == len(row.ids) - 1
    plain = gpt.convert_ids_to_tokens(list(ManualTemplate(gpt, "causal", BORN).rows(["Paris"], [7])[0].ids))
    assert not plain[0].startswith("Ġ") and plain[-1] == "Ġin"  # no leading space, no trailing one
    roberta = AutoTokenizer.from_pretrained(tiny_roberta)
    masked = ManualTemplate(roberta, "masked", BORN, bpe_spaces=True).rows(["Paris"], [7])[0]
    assert roberta.convert_ids_to_tokens([masked.ids[1]]) == ["ĠParis"]


@pytest.mark.parametrize("protocol", ["paper", "reference"])
def test_the_frozen_lm_drops_out_while_prompts_train_only_under_reference(protocol, tiny_gpt2, lama):
    trainer, tasks = _trainer_and_tasks(tiny_gpt2, lama, f"protocol.lm_dropout={protocol == 'reference'}")
    assert trainer.backbone.model.config.resid_pdrop > 0
    run, = trainer.prepare(tasks[:1])
    losses = []
    for _ in range(2):
        run.cursor = 0
        with torch.no_grad():
            if protocol == "reference":
                trainer.backbone.dropout(True)
            losses.append(trainer.step.loss([run]).item())
    if protocol == "reference":
        assert losses[0] != losses[1]  # two dropout masks
    else:
        assert losses[0] == losses[1]
    # evaluation never drops out, under either protocol
    first, second = (trainer.forward.evaluate_runs([run], "dev")[0]["mrr"] for _ in range(2))
    assert first == second


def test_latest_tie_and_the_unevaluated_last_epoch(tiny_gpt2, lama, tmp_path):
    """An lr too small to move the dev P@1: every epoch ties. The paper keeps the first and stops after patience;
    the reference keeps the latest, never runs out of patience, and evaluates max_epochs - 1 epochs."""
    def run(name, *extra):
        cfg = load_config(None, [f"model.name={tiny_gpt2}", "data.relations=P36", "data.max_train=16",
                                 "data.max_dev=8", "data.max_test=8", "train.lr=1e-12", "train.max_epochs=5",
                                 "train.patience=2", "train.manual_baseline=false", "logging.progress=off",
                                 "logging.wandb=false", f"output.dir={tmp_path / name}", *extra])
        return run_experiment(cfg, lama)["relations"]["P36"]

    paper = run("paper")
    assert len(set(paper["dev_history"])) == 1
    assert paper["best_epoch"] == 1 and paper["epochs_run"] == 3
    ties = run("ties", "protocol.latest_tie=true", "protocol.last_epoch_unevaluated=true")
    assert ties["best_epoch"] == ties["epochs_run"] == 4


def test_drop_last_drops_the_incomplete_batch(tiny_gpt2, lama):
    trainer, tasks = _trainer_and_tasks(tiny_gpt2, lama, "protocol.drop_last=true")
    assert len(trainer.prepare(tasks[:1])[0].order) == 16  # 20 facts, batches of 8
    trainer, tasks = _trainer_and_tasks(tiny_gpt2, lama)
    assert len(trainer.prepare(tasks[:1])[0].order) == 20


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_bert"])
def test_the_reference_protocol_runs_end_to_end_and_is_recorded(fixture, request, lama, tmp_path):
    model = request.getfixturevalue(fixture)
    cfg = load_config(None, [f"model.name={model}", "data.relations=P36,P37", "data.max_train=16", "data.max_dev=8",
                             "data.max_test=8", "train.max_epochs=3", "train.lr=0.01", "logging.progress=off",
                             "logging.wandb=false", f"output.dir={tmp_path}", "protocol=reference"])
    trainer, _ = _trainer_and_tasks(model, lama, "protocol=reference")
    assert {p.dtype for p in trainer.backbone.model.parameters()} == {torch.float16} and trainer.scaler is None
    payload = run_experiment(cfg, lama)
    assert payload["protocol"] == "reference"
    assert payload["config"]["protocol"] == {"name": "reference", **{q: True for q in QUIRKS}}
    assert all(r["status"] == "done" and r["epochs_run"] <= 2 for r in payload["relations"].values())
    assert "Protocol: reference." in (tmp_path / "results.md").read_text()
