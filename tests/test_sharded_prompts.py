"""Rank-aware prompt encoders on the Megatron fixture (gloo ranks): each relation's encoder lives on one rank
of its tensor-parallel group, and training gives what replicated encoders give."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ptuning.files import load_tensors
from ptuning.output.store import RunStore
from tests.conftest import REPO, free_port
from tests.ranks import spawn
from tests.test_megatron import merged, release  # noqa: F401  (module fixtures)

pytestmark = pytest.mark.slow  # processes: ranks, launchers

BIN = Path(sys.executable).parent

RELATIONS = ["P36", "P37"]  # the two relations the fixture's 500-token vocabulary keeps with data.vocab=original


def run_args(release, merged, lama, out, *extra: str) -> list[str]:
    return [str(REPO / "launcher" / "run.py"), "--set", f"model.name={merged}", "--set",
            f"model.tokenizer={release[1]}", "--relations", ",".join(RELATIONS), "--data-dir", str(lama),
            "--out", str(out), "--set", "data.vocab=original", "--set", "data.max_train=16", "--set",
            "data.max_dev=24", "--set", "data.max_test=24", "--set", "train.max_epochs=2", "--set",
            "train.lr=0.01", "--set", "logging.wandb=false", "--set", "logging.progress=lines", *extra]


def held(rank_stderr: list[str]) -> dict[int, tuple[list[str], int]]:
    """rank -> (relations whose encoders it holds, parameter count), from the trainer's log line in each rank's
    own stderr (eight ranks writing to one pipe can interleave)."""
    out = {}
    for text in rank_stderr:
        for rank, names, count in re.findall(r"rank (\d+) holds the prompt encoders of (.*) \(([\d,]+) "
                                             r"parameters\)", text):
            out[int(rank)] = ([] if names == "no unit" else names.split(", "), int(count.replace(",", "")))
    return out


@pytest.mark.parametrize("tp", [2, 8])  # a unit on every rank; 6 ranks holding none, on the release's own parts
def test_sharded_encoders_equal_replicated_ones(tp, release, merged, lama, tmp_path):
    source = release[0] if tp == 8 else merged  # TP 8 loads the release's parts as they are
    runs = {}
    for shard in (True, False):
        out = tmp_path / f"shard-{shard}"
        run = spawn(tp, *run_args(release, source, lama, out, "--set", f"parallel.tensor_parallel={tp}", "--set",
                                  f"parallel.shard_prompts={str(shard).lower()}"))
        runs[shard] = (out, held(run.rank_stderr))
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
        va, vb = (load_tensors(s.unit_dir(rid) / "prompt_vectors.safetensors")["prompt_vectors"] for s in (sa, sb))
        assert torch.allclose(va, vb, atol=1e-5), rid
        wa, wb = load_tensors(sa.encoder_path(rid)), load_tensors(sb.encoder_path(rid))
        diffs = torch.cat([(wa[n] - wb[n]).abs().flatten() for n in wa])
        assert diffs.max() <= 1e-5, (rid, diffs.max().item(), (diffs > 1e-5).float().mean().item())


INTERRUPTED = ("--set", "parallel.tensor_parallel=2", "--set", "train.pack_units=1", "--set", "data.max_train=48",
               "--set", "train.max_epochs=12", "--set", "train.patience=12", "--set", "output.checkpoint_minutes=0")


@pytest.fixture(scope="module")
def whole(release, merged, lama, tmp_path_factory):
    """The interrupted runs' reference at TP 2: the same settings, never stopped."""
    out = tmp_path_factory.mktemp("whole-tp2")
    spawn(2, *run_args(release, merged, lama, out, *INTERRUPTED))
    return out


def assert_same_as(whole, out) -> None:
    a = json.loads((whole / "results.json").read_text())["relations"]
    b = json.loads((out / "results.json").read_text())["relations"]
    for rid in RELATIONS:
        for key in ("dev_p@1", "test_p@1", "test_p@10", "test_mrr", "best_epoch", "epochs_run", "dev_history"):
            assert a[rid][key] == b[rid][key], (rid, key)
        wa, wb = load_tensors(RunStore(whole).encoder_path(rid)), load_tensors(RunStore(out).encoder_path(rid))
        assert all(torch.equal(wa[n], wb[n]) for n in wa), rid


def start(release, merged, lama, out) -> tuple[subprocess.Popen, RunStore]:
    """A TP 2 run under torchrun in the background (the signals below go through it), returned once P36 (rank
    0's) is final and P37 (rank 1's) 3 epochs in."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                             *run_args(release, merged, lama, out, *INTERRUPTED)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    store = RunStore(out)
    deadline = time.time() + 300
    while time.time() < deadline:
        done = (store.result("P36") or {}).get("status") == "done"
        if done and len((store.progress("P37") or {}).get("dev_history", [])) >= 3:
            break
        time.sleep(0.02)
    return proc, store


def test_kill_9_with_sharded_encoders_then_restart_equals_an_uninterrupted_run(whole, release, merged, lama,
                                                                                tmp_path):
    """Each relation's checkpoint is written by the rank that holds its encoder; after kill -9 the finished
    relation is skipped and the other resumes on whichever rank now owns it (P37 moves from rank 1 to rank 0)."""
    proc, store = start(release, merged, lama, tmp_path)
    # torchrun and both ranks at once (the ranks run in sessions of their own: match them by the output folder)
    subprocess.run(["pkill", "-KILL", "-f", str(tmp_path)], check=True)
    proc.wait()
    assert (store.result("P37") or {}).get("status") != "done", "the run finished before it could be killed"
    assert store.checkpoint_path("P37").is_file()

    log = spawn(2, *run_args(release, merged, lama, tmp_path, *INTERRUPTED)).stderr
    assert "already final, skipped: P36" in log and "P37: resuming after epoch" in log, log[-3000:]
    assert_same_as(whole, tmp_path)


def test_sigterm_to_one_rank_stops_the_group_after_the_same_step(whole, release, merged, lama, tmp_path):
    """A signal that reaches one rank only (rank 0, which holds nothing now) still stops both after the same
    step: the owner of P37 checkpoints it mid-epoch, neither waits for the other, and the restart is exact."""
    proc, store = start(release, merged, lama, tmp_path)
    ranks = subprocess.run(["pgrep", "-f", f"launcher/run.py.*{tmp_path}"], capture_output=True, text=True)
    pids = [int(p) for p in ranks.stdout.split()]
    environ = {p: dict(v.split("=", 1) for v in open(f"/proc/{p}/environ").read().split("\0") if "=" in v)
               for p in pids}
    rank0 = [p for p, env in environ.items() if env.get("RANK") == "0"]
    assert len(rank0) == 1, pids
    os.kill(rank0[0], signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0  # each rank ended with status 143 (stopped), which torchrun reports as a failure
    assert "stop requested (SIGTERM): checkpointed P37" in stderr  # said by rank 1, which got no signal
    assert stderr.count("stopped by SIGTERM after checkpointing its units under way; run the same command") == 2
    assert (store.result("P37") or {}).get("status") != "done" and store.checkpoint_path("P37").is_file()

    log = spawn(2, *run_args(release, merged, lama, tmp_path, *INTERRUPTED)).stderr
    assert "P37: resuming" in log
    assert_same_as(whole, tmp_path)
