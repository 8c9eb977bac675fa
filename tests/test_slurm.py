"""launcher/slurm.py against a real one-node SLURM cluster started by the fixture."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from launcher.slurm import main as slurm_main
from ptuning.store import RunStore
from tests import slurm_cluster
from tests.conftest import REPO

RELATIONS = "P1376,P36,P37,P1001"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = slurm_cluster.missing()
    if why:
        pytest.skip(why)
    cluster = slurm_cluster.Cluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    yield cluster
    cluster.stop()


def submit(cluster, model, lama, out, *extra) -> str:
    proc = subprocess.run(
        [sys.executable, str(REPO / "launcher" / "slurm.py"), "--set", f"model.name={model}", "--data-dir",
         str(lama), "--out", str(out), "--set", "data.max_train=24", "--set", "data.max_dev=12", "--set",
         "data.max_test=30", "--set", "train.max_epochs=3", "--set", "train.lr=0.01", *extra],
        capture_output=True, text=True, env=cluster.env, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"submitted job (\d+)", proc.stdout)
    assert match and f"logs: {out}/slurm/" in proc.stdout, proc.stdout
    return match.group(1)


def test_two_rank_job_writes_the_results(cluster, tiny_gpt2, lama, tmp_path):
    job = submit(cluster, tiny_gpt2, lama, tmp_path, "--relations", RELATIONS, "--nodes", "1",
                 "--gpus-per-node", "0", "--procs-per-node", "2")
    cluster.wait(job)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["world_size"] == 2
    assert {r["status"] for r in results["relations"].values()} == {"done"}
    log = (tmp_path / "slurm" / f"{job}.out").read_text()
    assert f"[ptuning-lama] job {job}" in log and "| **macro average** |" in log


def test_usr1_before_the_time_limit_requeues_and_resumes(cluster, tiny_gpt2, lama, tmp_path):
    job = submit(cluster, tiny_gpt2, lama, tmp_path, "--relations", "P1376,P36", "--set",
                 "train.pack_relations=1", "--set", "data.max_train=200", "--set", "train.max_epochs=25",
                 "--set", "train.patience=25", "--set", "logging.wandb=false")
    store = RunStore(tmp_path)
    deadline = time.time() + 300
    while time.time() < deadline:  # P1376 finished, P36 under way
        if (store.result("P1376") or {}).get("status") == "done" and store.progress("P36"):
            break
        time.sleep(0.2)
    # what SLURM sends --signal-seconds before the time limit, to the batch shell
    assert cluster.run("scancel", "--signal=USR1", "--batch", job).returncode == 0
    cluster.wait(job, release_requeued=True)
    log = (tmp_path / "slurm" / f"{job}.out").read_text()
    assert "time limit near: stopping the ranks and requeueing" in log
    assert f"[ptuning-lama] job {job} on" in log and "restart 1" in log
    assert "already final, skipped: P1376" in log and "P36: resuming after epoch" in log
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["epochs_run"] for r in results["relations"].values()] == [25, 25]


def test_array_job_per_relation_group_then_collect(cluster, tiny_gpt2, lama, tmp_path):
    job = submit(cluster, tiny_gpt2, lama, tmp_path, "--relations", RELATIONS, "--array", "2", "--set",
                 "logging.wandb=false")
    cluster.wait(job)
    assert sorted(p.name for p in tmp_path.glob("group-*")) == ["group-0", "group-1"]
    assert slurm_main(["--collect", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert sorted(results["relations"]) == sorted(RELATIONS.split(","))
    assert results["macro"]["n_relations"] == 4


def test_dry_run_writes_a_multi_node_script(tmp_path, capsys):
    assert slurm_main(["--dry-run", "--nodes", "2", "--gpus-per-node", "8", "--launcher", "deepspeed",
                       "--partition", "gpu", "--account", "lab", "--time", "12:00:00", "--out", str(tmp_path),
                       "--config", str(REPO / "configs" / "gpt2-xl_lama29k.json")]) == 0
    script = (tmp_path / "slurm" / "ptuning.sbatch").read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
                 "#SBATCH --account=lab", "#SBATCH --time=12:00:00", "#SBATCH --signal=B:USR1@300",
                 "#SBATCH --requeue", "slots=8", "--no_ssh --node_rank=$SLURM_NODEID", "trap requeue USR1"):
        assert line in script, line
    assert "submitted" not in capsys.readouterr().out
