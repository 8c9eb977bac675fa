"""`make gpu-check`'s script at tiny shapes on the CPU, so it cannot rot between GPU leases."""
import json

import pytest

from tests.conftest import REPO
from tests.ranks import spawn

pytestmark = pytest.mark.slow  # processes: ranks, launchers


def test_gpu_check_runs_at_tiny_shapes(lama, tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = spawn(0, REPO / "benchmarks" / "gpu_check.py", "--tiny", "--data-dir", lama, "--out", out,
                 env={"OMP_NUM_THREADS": "2"})
    figures = json.loads(out.read_text())
    assert "errors" not in figures
    for key in ("matmul_flops", "megatron_build_s", "megatron_auto", "megatron_step_s_1", "megatron_step_s_8",
                "megatron_eval_facts_per_s", "gpt2_step_over_raw", "gpt2_packing_speedup", "bert_step_over_raw",
                "bert_packing_speedup", "llama_build_s", "llama_step_s_1", "llama_step_s_8",
                "megatron_8_step_over_lm", "gpt2_8_step_over_lm", "bert_8_step_over_lm", "bank_BERT-base_ms",
                "bank_Megatron-11B_ms"):
        assert figures[key] > 0, key
    assert figures["megatron_auto"] == 8  # on a CPU every relation packs (the tiny run caps it at 8)
    assert proc.stdout.count("\n| ") >= 10 and "| whole check |" in proc.stdout
    profile = figures["megatron_8_profile_ms"]  # the step's parts add up to the whole
    assert profile["whole step"] == sum(profile[p] for p in ("encoders forward", "LM forward", "LM backward",
                                                             "encoders backward", "optimizer")) or \
        abs(profile["whole step"] / sum(profile[p] for p in ("encoders forward", "LM forward", "LM backward",
                                                             "encoders backward", "optimizer")) - 1) < 0.2
