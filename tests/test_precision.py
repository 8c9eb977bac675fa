"""fp16 loss scaling, per unit: an overflowing unit skips its step and halves its scale, and no other unit's; clean
steps use unscaled gradients."""
import json

import torch

from ptuning.config import load_config
from ptuning.model.stacked import Layout
from ptuning.experiment import run_experiment
from ptuning.parallel.context import ParallelContext
from ptuning.train.precision import LossScaler
from ptuning.train.prompt_bank import PromptBank
from ptuning.train.stack import Settings
from tests.test_prompt_bank import HIDDEN, N_PSEUDO, assert_close_relative, encoders


def test_one_units_fp16_overflow_skips_only_its_step_and_scale():
    bank = PromptBank(ParallelContext(), shard=False, hidden=HIDDEN, device=torch.device("cpu"))
    encs = encoders("lstm", 2)
    layout = Layout.of("lstm", N_PSEUDO, HIDDEN)
    bank.build([(uid, layout, e.state_dict(), Settings(1e-2, 0.0, 0.0, 0)) for uid, e in zip("AB", encs)])
    scaler = LossScaler(ParallelContext(), scale=8.0, interval=1000)
    scales = {u: scaler.scale(u) for u in "AB"}
    before = {u: bank.weights(u) for u in "AB"}
    a, b = bank.vectors(["A", "B"], [N_PSEUDO, N_PSEUDO], training=True)
    (a.sum() * float("inf") + b.sum() * scales["B"]).backward()  # unit A overflowed, unit B did not
    ok = scaler.verdict(["A", "B"], bank.overflow(["A", "B"]))
    assert ok == [False, True]
    bank.step([u for u, good in zip("AB", ok) if good], scales)
    after = {u: bank.weights(u) for u in "AB"}
    assert all(torch.equal(before["A"][n], after["A"][n]) for n in before["A"])
    assert not torch.equal(before["B"]["mlp.2.bias"], after["B"]["mlp.2.bias"])
    assert scaler.scale("A") == 4.0 and scaler.scale("B") == 8.0 and scaler.skipped == 1
    assert bank.optimizer_state("A")["step"] == 0 and bank.optimizer_state("B")["step"] == 1


def test_fp16_unscaling_gives_the_unscaled_step():
    """B's step from a loss scaled by 8 equals its step from the plain loss (the kernel divides by the scale)."""
    results = []
    for scale in (1.0, 8.0):
        bank = PromptBank(ParallelContext(), shard=False, hidden=HIDDEN, device=torch.device("cpu"))
        bank.build([("B", Layout.of("mlp", N_PSEUDO, HIDDEN), encoders("mlp", 1)[0].state_dict(),
                     Settings(1e-2, 5e-4, 0.0, 0))])
        (bank.vectors(["B"], [N_PSEUDO], training=True)[0].square().sum() * scale).backward()
        bank.step(["B"], {"B": scale})
        results.append(bank.weights("B"))
    for name in results[0]:
        assert_close_relative(results[1][name], results[0][name], 1e-6)


def test_a_float16_model_trains_its_prompts_with_loss_scaling(tiny_gpt2, lama, tmp_path, capsys):
    cfg = load_config(None, [f"model.name={tiny_gpt2}", "model.dtype=float16", "data.relations=P36",
                             "data.max_train=16", "data.max_dev=8", "data.max_test=8", "train.max_epochs=2",
                             "train.lr=0.01", "logging.wandb=false", "logging.progress=lines",
                             f"output.dir={tmp_path}"])
    run_experiment(cfg, lama)
    assert "fp16 loss scaling" in capsys.readouterr().err
    record = json.loads((tmp_path / "results.json").read_text())["relations"]["P36"]
    assert record["status"] == "done" and record["epochs_run"] == 2
