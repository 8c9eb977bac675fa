"""LM fine-tuning under DeepSpeed and without it: the same optimizer, nothing left behind by a finished relation's
engine, and every relation starting from the pristine LM (values and dtype). tests/deepspeed_worker.py runs the
steps in a process of its own (a one-rank gloo group)."""
import json

import pytest

from ptuning.config import ConfigError, load_config
from tests.conftest import REPO
from tests.ranks import spawn


@pytest.fixture(scope="module")
def report(tiny_gpt2, lama, tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed") / "report.json"
    spawn(0, REPO / "tests" / "deepspeed_worker.py", tiny_gpt2, lama, out)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_one_step_is_the_same_update_with_and_without_deepspeed(report):
    # lr 1e-3 with weight decay 0.1: AdamW, or DeepSpeed's default clipping at norm 1.0, would part by ~2 lr
    assert report["moved"] > 5e-4
    assert report["plain_vs_deepspeed"] < 1e-6


@pytest.mark.slow
def test_a_finished_relation_leaves_no_engine_hooks_or_memory_behind(report):
    before, after = report["before"], report["after_each"]
    assert len(after) == 3
    for state in after:
        assert state["engines"] == before["engines"] and state["hooks"] == 0
        assert state["tensor_bytes"] == after[0]["tensor_bytes"]  # the third relation holds what the first did
        assert state["pristine"] and state["dtype"] == "torch.float32"


@pytest.mark.slow
def test_after_a_bf16_engine_the_next_relation_starts_from_the_pristine_dtype(report):
    assert [s["dtype"] for s in report["bf16_after_each"]] == ["torch.float32"] * 2
    assert all(s["pristine"] for s in report["bf16_after_each"])


def test_zero_stage_3_is_refused():
    with pytest.raises(ConfigError, match="deepspeed.zero_optimization.stage 3 partitions the LM's parameters"):
        load_config(None, ["train.mode=finetune", 'deepspeed.zero_optimization={"stage": 3}'])
