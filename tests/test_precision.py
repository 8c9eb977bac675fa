"""fp16 loss scaling: an overflowing step is skipped and the scale halved; clean steps use unscaled gradients."""
import json

import torch

from ptuning.config import load_config
from ptuning.experiment import run_experiment
from ptuning.parallel import ParallelContext
from ptuning.precision import LossScaler


def test_overflow_skips_the_step_and_clean_steps_see_the_true_gradient():
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    scaler = LossScaler(ParallelContext(), scale=8.0, interval=2)
    assert not scaler.backward_and_step((weight * torch.tensor([1.0, float("inf"), 1.0])).sum(), [optimizer])
    assert torch.equal(weight.detach(), torch.ones(3)) and scaler.scale == 4.0 and scaler.skipped == 1
    for expected in (-1.0, -3.0):  # gradient 2 per step, unscaled
        optimizer.zero_grad(set_to_none=True)
        assert scaler.backward_and_step((2 * weight).sum(), [optimizer])
        assert torch.allclose(weight.detach(), torch.full((3,), expected))
    assert scaler.scale == 8.0  # doubled after `interval` clean steps


def test_a_float16_model_trains_its_prompts_with_loss_scaling(tiny_gpt2, lama, tmp_path, capsys):
    cfg = load_config(None, [f"model.name={tiny_gpt2}", "model.dtype=float16", "data.relations=P36",
                             "data.max_train=16", "data.max_dev=8", "data.max_test=8", "train.max_epochs=2",
                             "train.lr=0.01", "logging.wandb=false", "logging.progress=lines",
                             f"output.dir={tmp_path}"])
    run_experiment(cfg, lama)
    assert "fp16 loss scaling" in capsys.readouterr().err
    record = json.loads((tmp_path / "results.json").read_text())["relations"]["P36"]
    assert record["status"] == "done" and record["epochs_run"] == 2
