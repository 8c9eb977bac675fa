"""Hugging Face models through transformers' tensor parallelism (DTensor; gloo on the CPU), with the rank-aware
prompt encoders of the Megatron backbone: one replica over the whole job (tp_plan="auto"), or several replicas
side by side, each sharded on its own group's mesh (data parallel x tensor parallel)."""
from __future__ import annotations

import json

import pytest
import torch

from ptuning.config import ModelConfig
from ptuning.model.loading import ModelError, load_backbone
from ptuning.parallel.context import ParallelContext
from ptuning.files import load_tensors
from ptuning.output.store import RunStore
from tests.conftest import REPO
from tests.ranks import spawn

pytestmark = pytest.mark.slow  # processes: ranks, launchers

RELATIONS = "P1376,P36,P37"  # three: at TP 2 rank 0 holds two encoders, rank 1 one (an uneven split once hung)


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_qwen2"])
def test_tp_2_equals_tp_1_on_logits_and_input_gradients(family, request, tmp_path):
    model = request.getfixturevalue(family)
    worker = str(REPO / "tests" / "megatron_tp_worker.py")
    spawn(1, worker, str(model), str(model), str(tmp_path / "tp1.pt"))
    spawn(2, worker, str(model), str(model), str(tmp_path / "tp2.pt"))
    one, two = torch.load(tmp_path / "tp1.pt"), torch.load(tmp_path / "tp2.pt")
    assert two["logits"].shape == one["logits"].shape  # 4 facts, one row shared by two of them
    assert torch.allclose(two["logits"], one["logits"], atol=1e-5)
    scale = one["grad"].abs().max()
    assert scale > 0 and (two["grad"] - one["grad"]).abs().max() <= 1e-5 * scale


def run_args(model, lama, out, *extra: str) -> list[str]:
    return [str(REPO / "launcher" / "run.py"), "--set", f"model.name={model}", "--relations", RELATIONS,
            "--data-dir", str(lama), "--out", str(out), "--set", "data.max_train=16", "--set", "data.max_dev=12",
            "--set", "data.max_test=20", "--set", "train.max_epochs=2", "--set", "train.lr=0.01", "--set",
            "logging.wandb=false", *extra]


def assert_trained_alike(wa: dict, wb: dict, rid: str) -> None:
    """The same encoder trained under another summation order (lr 0.01, 4 steps): half its components within 1e-5,
    none further than the 4 steps' lr. Adam lifts rounding on components whose gradient is ~0 (test_megatron.py),
    and a hidden unit of the MLP whose pre-activation sits at ReLU's edge can fall on the other side, after which
    every weight upstream of it moves: measured on an AMD EPYC, P1001 at DP 2 x TP 2 had one such unit (its bias
    0.014 apart), 16.8% of its weights more than 1e-5 apart and the median 7e-7 apart."""
    diffs = torch.cat([(wa[n] - wb[n]).abs().flatten() for n in wa])
    assert diffs.median() <= 1e-5 and diffs.max() <= 0.01 * 4, (rid, diffs.median().item(), diffs.max().item())


def test_ptuning_at_tp_2_equals_tp_1(tiny_llama, lama, tmp_path):
    """Two epochs at TP 1 and at TP 2 (encoders sharded over the pair): the same P@1, and the same encoder weights
    up to what tensor parallelism's other summation order does through Adam."""
    results = {}
    for tp in (1, 2):
        spawn(tp, *run_args(tiny_llama, lama, tmp_path / f"tp{tp}", "--set", f"parallel.tensor_parallel={tp}",
                               "--set", "prompt.init=manual"))
        results[tp] = json.loads((tmp_path / f"tp{tp}" / "results.json").read_text())["relations"]
        assert {r["status"] for r in results[tp].values()} == {"done"}
    for rid in RELATIONS.split(","):
        for key in ("dev_p@1", "test_p@1", "best_epoch", "dev_history"):
            assert results[1][rid][key] == results[2][rid][key], (rid, key)
        assert_trained_alike(*(load_tensors(RunStore(tmp_path / f"tp{tp}").encoder_path(rid)) for tp in (1, 2)), rid)


def test_two_replicas_of_tp_2_equal_one_process(tiny_llama, lama, tmp_path):
    """4 ranks: 2 data-parallel groups x tensor parallel 2, 4 relations in packs of one (so both worlds train the
    same packs), one thread a rank: the coordinator's figures equal one process's at TP 1."""
    relations = "P1376,P36,P37,P1001"
    same = ["--relations", relations, "--set", "train.pack_units=1", "--set", "parallel.threads=1", "--set",
            "prompt.init=manual"]
    spawn(1, *run_args(tiny_llama, lama, tmp_path / "one", *same))
    spawn(4, *run_args(tiny_llama, lama, tmp_path / "dp2tp2", *same, "--set", "parallel.tensor_parallel=2"))
    one, four = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("one", "dp2tp2"))
    assert four["world_size"] == 4
    for rid in relations.split(","):
        a, b = one["relations"][rid], four["relations"][rid]
        assert (a["test_p@1"], a["dev_p@1"], a["best_epoch"], a["dev_history"]) == \
               (b["test_p@1"], b["dev_p@1"], b["best_epoch"], b["dev_history"]), rid
        assert a["test_mrr"] == pytest.approx(b["test_mrr"], abs=1e-6)
        assert_trained_alike(*(load_tensors(RunStore(tmp_path / name).encoder_path(rid)) for name in ("one", "dp2tp2")),
                             rid)


def test_what_transformers_cannot_shard_is_a_clear_error(tiny_gpt2):
    """Said before any weight or process group is touched: GPT-2 has no tensor-parallel plan in transformers."""
    with pytest.raises(ModelError, match=r"no tensor-parallel plan for 'gpt2' models; run it with tensor_parallel 1"):
        load_backbone(ModelConfig(name=str(tiny_gpt2)), ParallelContext(world_size=2, tp_size=2, n_replicas=1))
    with pytest.raises(ModelError, match=r"no tensor-parallel plan for 'gpt2' models"):
        load_backbone(ModelConfig(name=str(tiny_gpt2)), ParallelContext(world_size=4, tp_size=2, n_replicas=2))
