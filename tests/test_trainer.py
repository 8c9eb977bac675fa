"""Packed training reproduces one-relation-at-a-time training; early stopping keeps its promises."""
import json

import pytest
import torch

from ptuning.config import load_config
from ptuning.experiment import run_experiment
from ptuning.files import load_tensors
from ptuning.output.store import RunStore

RELATIONS = "P1376,P36,P37"


def small_run(model, lama, out, *extra):
    cfg = load_config(None, [f"model.name={model}", f"data.relations={RELATIONS}", "data.max_train=20",
                             "data.max_dev=12", "data.max_test=30", "train.lr=0.01", "train.max_epochs=2",
                             "train.manual_baseline=false", "logging.progress=off", "logging.wandb=false", f"output.dir={out}", *extra])
    run_experiment(cfg, lama)
    return json.loads((out / "results.json").read_text())


def small_sweep(model, lama, out, *extra, sweep=("train.seed=34,35", "train.max_epochs=2,4")):
    """Random tiny models score 0 on dev: with latest_tie the best epoch is the last, so the saved encoders are
    the final weights and reflect every step."""
    cfg = load_config(None, [f"model.name={model}", f"data.relations={RELATIONS}", "data.max_train=20",
                             "protocol.latest_tie=true",
                             "data.max_dev=12", "data.max_test=30", "train.lr=0.01", "train.manual_baseline=false",
                             "logging.progress=off", "logging.wandb=false", f"output.dir={out}", *extra],
                      list(sweep))
    run_experiment(cfg, lama)
    results = json.loads((out / "results.json").read_text())
    return {f"{rid}/{name}": unit for rid, r in results["relations"].items() for name, unit in r["variants"].items()}


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_bert"])
def test_a_unit_in_a_stack_of_8_equals_the_unit_alone(fixture, request, lama, tmp_path):
    """Twelve units (3 relations x 2 seeds x 2 epoch budgets), packs of 8 against packs of 1, with LSTM dropout:
    each unit's dropout comes from its own generator and a unit that stops leaves its stack without touching
    the others, so every unit ends as it does alone (the LM's rounding in other batch shapes is all that differs)."""
    model = request.getfixturevalue(fixture)
    packed = small_sweep(model, lama, tmp_path / "packed", "train.pack_units=8", "prompt.lstm_dropout=0.3")
    alone = small_sweep(model, lama, tmp_path / "alone", "train.pack_units=1", "prompt.lstm_dropout=0.3")
    assert len(packed) == 12 and {u["epochs_run"] for u in packed.values()} == {2, 4}  # half stop early
    for uid, a in packed.items():
        b = alone[uid]
        assert a["status"] == b["status"] == "done"
        for key in ("dev_p@1", "test_p@1", "test_p@10", "best_epoch", "epochs_run", "dev_history"):
            assert a[key] == b[key], (uid, key)
        assert a["test_mrr"] == pytest.approx(b["test_mrr"], abs=1e-6)
        wa = load_tensors(RunStore(tmp_path / "packed").encoder_path(uid))
        wb = load_tensors(RunStore(tmp_path / "alone").encoder_path(uid))
        for name in wa:
            assert torch.allclose(wa[name], wb[name], atol=1e-5), (uid, name)
    # the encoders did train: different units end with different weights from the same architecture
    w1 = load_tensors(RunStore(tmp_path / "packed").encoder_path("P36/max_epochs=4,seed=34"))["mlp.2.weight"]
    w2 = load_tensors(RunStore(tmp_path / "packed").encoder_path("P36/max_epochs=4,seed=35"))["mlp.2.weight"]
    assert not torch.allclose(w1, w2)


def test_early_stopping_bookkeeping(tiny_gpt2, lama, tmp_path):
    results = small_run(tiny_gpt2, lama, tmp_path / "r", "train.max_epochs=6", "train.patience=2")
    for rid, r in results["relations"].items():
        history = r["dev_history"]
        assert len(history) == r["epochs_run"]
        assert r["dev_p@1"] == max(history)
        assert r["best_epoch"] == history.index(max(history)) + 1  # the first epoch that reached the best
        assert r["epochs_run"] == 6 or r["epochs_run"] - r["best_epoch"] == 2, rid


@pytest.mark.parametrize("mode", ["finetune", "ptuning_finetune"])
def test_lm_finetuning_modes_train_each_relation_from_the_same_weights(mode, tiny_gpt2, lama, tmp_path):
    results = small_run(tiny_gpt2, lama, tmp_path / mode, f"train.mode={mode}", "train.lm_lr=1e-3",
                        "train.max_epochs=1")
    assert all(r["status"] == "done" for r in results["relations"].values())
    assert results["mode"] == mode
    saved = (tmp_path / mode / "relations" / "P36" / "prompt_encoder.safetensors").is_file()
    assert saved == (mode == "ptuning_finetune")  # the manual-template mode has no prompt encoder

    # one relation alone gives the same figures as inside the sweep: every relation starts from the pristine LM
    alone = small_run(tiny_gpt2, lama, tmp_path / "alone", f"train.mode={mode}", "train.lm_lr=1e-3",
                      "train.max_epochs=1", "data.relations=P37")
    assert alone["relations"]["P37"]["test_mrr"] == pytest.approx(results["relations"]["P37"]["test_mrr"], abs=1e-9)


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_bert"])
def test_length_buckets_and_shared_rows_leave_the_gradients_unchanged(fixture, lama, request):
    """A packed step through length-sorted chunks of 5 facts, with facts sharing rows of 32 tokens, gives each
    encoder the gradient of one batch of padded rows, one fact each."""
    from ptuning.data.lama import find_layout, read_relation_infos
    from ptuning.model.loading import load_backbone
    from ptuning.data.tasks import prepare_task, read_relation
    from ptuning.train.trainer import Trainer
    from ptuning.data.vocab import build_answer_vocab

    model = request.getfixturevalue(fixture)
    grads = {}
    for bucket_rows, row_tokens in ((0, 0), (5, 0), (0, 32), (5, 32)):
        cfg = load_config(None, [f"model.name={model}", f"train.bucket_rows={bucket_rows}",
                                 f"train.row_tokens={row_tokens}"])
        backbone = load_backbone(cfg.model)
        assert backbone.packs_rows
        layout = find_layout(lama)
        vocab = build_answer_vocab(backbone.tokenizer, backbone.vocab_size, "shared", layout, "bert-base-cased")
        infos = read_relation_infos(layout)
        tasks = [prepare_task(infos[r], read_relation(layout, r), vocab, cfg.data) for r in RELATIONS.split(",")]
        trainer = Trainer(backbone, cfg, vocab.allowed)
        runs = trainer.prepare(tasks)
        trainer.step.loss(runs).backward()
        grads[bucket_rows, row_tokens] = [trainer.bank.gradient(r.unit.id) for r in runs]
    for variant in ((5, 0), (0, 32), (5, 32)):
        for reference, ours in zip(grads[0, 0], grads[variant]):
            assert reference.abs().max() > 0
            # float32 rounding at the gradients' scale (measured: <= 2e-6 of it)
            assert (ours - reference).abs().max() <= 1e-5 * reference.abs().max(), variant


def test_a_pack_of_8_stopped_by_sigterm_resumes_in_packs_of_3(tiny_gpt2, lama, tmp_path):
    """SIGTERM while a pack of 8 trains: every unit under way is checkpointed where it stands (its slice of the
    bank: weights, Adam state, dropout generator), and the same folder resumed with packs of 3 continues each
    unit as an uninterrupted run does."""
    import os
    import signal
    import threading

    from ptuning.experiment import Stopped

    whole = small_sweep(tiny_gpt2, lama, tmp_path / "whole", "train.pack_units=8", "prompt.lstm_dropout=0.3")
    out = tmp_path / "stopped"
    store = RunStore(out)

    def stop_after_the_first_epoch():
        while not any(len((store.progress(u) or {}).get("dev_history", [])) for u in whole):
            threading.Event().wait(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_after_the_first_epoch, daemon=True).start()
    with pytest.raises(Stopped):
        small_sweep(tiny_gpt2, lama, out, "train.pack_units=8", "prompt.lstm_dropout=0.3")
    stopped = [u for u in whole if store.checkpoint_path(u).is_file()]
    assert len(stopped) == 8, stopped
    resumed = small_sweep(tiny_gpt2, lama, out, "train.pack_units=3", "prompt.lstm_dropout=0.3")
    for uid, a in whole.items():
        b = resumed[uid]
        for key in ("dev_p@1", "test_p@1", "best_epoch", "epochs_run", "dev_history"):
            assert a[key] == b[key], (uid, key)
        wa, wb = load_tensors(RunStore(tmp_path / "whole").encoder_path(uid)), load_tensors(store.encoder_path(uid))
        for name in wa:
            assert torch.allclose(wa[name], wb[name], atol=1e-5), (uid, name)
