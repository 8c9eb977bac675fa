"""Rank-aware prompt encoders on the Megatron fixture (gloo, torchrun): each relation's encoder lives on one rank
of its tensor-parallel group, and training gives what replicated encoders give."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest
import torch

from ptuning.results import load_tensors
from ptuning.store import RunStore
from tests.conftest import REPO
from tests.test_megatron import BIN, merged, release, torchrun  # noqa: F401  (module fixtures)

RELATIONS = ["P36", "P37"]  # the two relations the fixture's 500-token vocabulary keeps with data.vocab=original


def run_args(release, merged, lama, out, *extra: str) -> list[str]:
    return [str(REPO / "launcher" / "run.py"), "--set", f"model.name={merged}", "--set",
            f"model.tokenizer={release[1]}", "--relations", ",".join(RELATIONS), "--data-dir", str(lama),
            "--out", str(out), "--set", "data.vocab=original", "--set", "data.max_train=16", "--set",
            "data.max_dev=24", "--set", "data.max_test=24", "--set", "train.max_epochs=2", "--set",
            "train.lr=0.01", "--set", "logging.wandb=false", "--set", "logging.progress=lines", *extra]


def held(log_dir) -> dict[int, tuple[list[str], int]]:
    """rank -> (relations whose encoders it holds, parameter count), from the trainer's log line in each rank's
    own stderr file (torchrun --redirects: eight ranks writing to one pipe can interleave)."""
    out = {}
    for path in log_dir.glob("**/stderr.log"):
        for rank, names, count in re.findall(r"rank (\d+) holds the prompt encoders of (.*) \(([\d,]+) "
                                             r"parameters\)", path.read_text()):
            out[int(rank)] = ([] if names == "no relation" else names.split(", "), int(count.replace(",", "")))
    return out


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_sharded_encoders_equal_replicated_ones(tp, release, merged, lama, tmp_path):
    source = release[0] if tp == 8 else merged  # TP 8 loads the release's parts as they are
    runs = {}
    for shard in (True, False):
        out = tmp_path / f"shard-{shard}"
        logs = tmp_path / f"logs-{shard}"
        torchrun(tp, "--redirects", "2", "--log-dir", str(logs),
                 *run_args(release, source, lama, out, "--set", f"parallel.tensor_parallel={tp}", "--set",
                           f"parallel.shard_prompts={str(shard).lower()}"))
        runs[shard] = (out, held(logs))
    # each rank holds only its share: relation i lives on rank i mod tp, and nothing else does
    ranks, per_encoder = runs[True][1], None
    assert sorted(ranks) == list(range(tp))
    for rank, (names, count) in ranks.items():
        assert names == [r for i, r in enumerate(RELATIONS) if i % tp == rank]
        if names:
            per_encoder = per_encoder or count // len(names)
            assert count == per_encoder * len(names)
    assert all(names == RELATIONS for names, _ in runs[False][1].values())  # replicated: every rank, everything
    a = json.loads((runs[True][0] / "results.json").read_text())["relations"]
    b = json.loads((runs[False][0] / "results.json").read_text())["relations"]
    for rid in RELATIONS:
        assert a[rid]["status"] == b[rid]["status"] == "done"
        for key in ("dev_p@1", "test_p@1", "test_p@10", "best_epoch", "dev_history"):
            assert a[rid][key] == b[rid][key], (rid, key)
        sa, sb = RunStore(runs[True][0]), RunStore(runs[False][0])
        va, vb = (load_tensors(s.relation_dir(rid) / "prompt_vectors.safetensors")["prompt_vectors"] for s in (sa, sb))
        assert torch.allclose(va, vb, atol=1e-5), rid
        wa, wb = load_tensors(sa.encoder_path(rid)), load_tensors(sb.encoder_path(rid))
        diffs = torch.cat([(wa[n] - wb[n]).abs().flatten() for n in wa])
        assert diffs.max() <= 1e-5, (rid, diffs.max().item(), (diffs > 1e-5).float().mean().item())


def test_kill_9_with_sharded_encoders_then_restart_equals_an_uninterrupted_run(release, merged, lama, tmp_path):
    """At TP 2 each relation's checkpoint is written by the rank that holds its encoder; after kill -9 the other
    relation (finished) is skipped, and the unfinished one resumes on whichever rank now owns it."""
    extra = ("--set", "parallel.tensor_parallel=2", "--set", "train.pack_relations=1", "--set",
             "data.max_train=48", "--set", "train.max_epochs=12", "--set", "train.patience=12", "--set",
             "output.checkpoint_minutes=0")
    torchrun(2, *run_args(release, merged, lama, tmp_path / "whole", *extra))

    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29721",
                             *run_args(release, merged, lama, out, *extra)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = RunStore(out)
    deadline = time.time() + 300
    while time.time() < deadline:  # P36 (rank 0's) finished, P37 (rank 1's) a few epochs in
        done = (store.result("P36") or {}).get("status") == "done"
        if done and len((store.progress("P37") or {}).get("dev_history", [])) >= 3:
            break
        time.sleep(0.02)
    # torchrun and both ranks at once (the ranks run in sessions of their own: match them by the output folder)
    subprocess.run(["pkill", "-KILL", "-f", str(out)], check=True)
    proc.wait()
    assert (store.result("P37") or {}).get("status") != "done", "the run finished before it could be killed"
    assert store.checkpoint_path("P37").is_file()

    restarted = torchrun(2, *run_args(release, merged, lama, out, *extra))
    log = restarted.stderr
    assert "already final, skipped: P36" in log and "P37: resuming after epoch" in log, log[-3000:]
    a = json.loads((tmp_path / "whole" / "results.json").read_text())["relations"]
    b = json.loads((out / "results.json").read_text())["relations"]
    for rid in RELATIONS:
        for key in ("dev_p@1", "test_p@1", "test_p@10", "test_mrr", "best_epoch", "epochs_run", "dev_history"):
            assert a[rid][key] == b[rid][key], (rid, key)
    wa, wb = load_tensors(RunStore(tmp_path / "whole").encoder_path("P37")), load_tensors(store.encoder_path("P37"))
    assert all(torch.equal(wa[n], wb[n]) for n in wa)
