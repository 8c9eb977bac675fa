"""launcher/slurm.py against a real one-node SLURM cluster started by the fixture."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.slurm import deepspeed_node_command, parse_args, render_script
from launcher.slurm import main as slurm_main
from ptuning.output.store import RunStore
from tests import slurm_cluster
from tests.conftest import REPO

RELATIONS = "P1376,P36,P37,P1001"
# the test node has os.cpu_count() cores and 4000 MB: smaller than the per-rank defaults
FITS_THE_TEST_NODE = ["--cpus-per-task", str(min(2, os.cpu_count())), "--mem", "1G"]


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
         "data.max_test=30", "--set", "train.max_epochs=3", "--set", "train.lr=0.01", *FITS_THE_TEST_NODE, *extra],
        capture_output=True, text=True, env=cluster.env, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"submitted job (\d+)", proc.stdout)
    assert match and f"logs: {out}/slurm/" in proc.stdout, proc.stdout
    return match.group(1)


@pytest.mark.slow
def test_two_rank_job_writes_the_results(cluster, tiny_gpt2, lama, tmp_path):
    job = submit(cluster, tiny_gpt2, lama, tmp_path, "--relations", RELATIONS, "--nodes", "1",
                 "--gpus-per-node", "0", "--procs-per-node", "2")
    request = cluster.run("scontrol", "show", "job", job).stdout
    assert f"MinCPUsNode={min(2, os.cpu_count())}" in request and "MinMemoryNode=1G" in request, request
    cluster.wait(job)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["world_size"] == 2
    assert {r["status"] for r in results["relations"].values()} == {"done"}
    log = (tmp_path / "slurm" / f"{job}.out").read_text()
    assert f"[ptuning-lama] job {job}" in log and "| **macro average** |" in log


@pytest.mark.slow
def test_usr1_before_the_time_limit_requeues_and_resumes(cluster, tiny_gpt2, lama, tmp_path):
    job = submit(cluster, tiny_gpt2, lama, tmp_path, "--relations", "P1376,P36", "--set",
                 "train.pack_units=1", "--set", "data.max_train=200", "--set", "train.max_epochs=25",
                 "--set", "train.patience=25", "--set", "logging.wandb=false")
    store = RunStore(tmp_path)
    deadline = time.time() + 600
    while time.time() < deadline:  # P1376 finished, P36 under way
        if (store.result("P1376") or {}).get("status") == "done" and store.progress("P36"):
            break
        time.sleep(0.2)
    else:
        pytest.fail("P1376 did not finish within 10 minutes: the machine is too loaded for this test's timing")
    # what SLURM sends --signal-seconds before the time limit, to the batch shell
    assert cluster.run("scancel", "--signal=USR1", "--batch", job).returncode == 0
    cluster.wait(job, release_requeued=True)
    log = (tmp_path / "slurm" / f"{job}.out").read_text()
    assert "time limit near: stopping the ranks and requeueing" in log
    assert f"[ptuning-lama] job {job} on" in log and "restart 1" in log
    assert "already final, skipped: P1376" in log and "P36: resuming" in log
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["epochs_run"] for r in results["relations"].values()] == [25, 25]


@pytest.mark.slow
def test_array_job_per_relation_group_then_collect(cluster, tiny_gpt2, lama, tmp_path):
    # one core per task: the node's two cores run both tasks at once
    job = submit(cluster, tiny_gpt2, lama, tmp_path, "--relations", RELATIONS, "--array", "2", "--set",
                 "logging.wandb=false", "--cpus-per-task", "1")
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
                 "#SBATCH --requeue", "--no_ssh --node_rank=$SLURM_NODEID", "trap requeue USR1"):
        assert line in script, line
    assert "submitted" not in capsys.readouterr().out


def script(*argv: str) -> str:
    opts, run_argv = parse_args(list(argv))
    return render_script(opts, run_argv, Path("/tmp/out"), None)


def test_more_ranks_than_gpus_per_node_is_a_one_line_error(tmp_path, capsys):
    assert slurm_main(["--dry-run", "--gpus-per-node", "2", "--procs-per-node", "4", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --procs-per-node 4 with --gpus-per-node 2 would share GPUs: start at most 2 ranks per "
                   "node, or --gpus-per-node 0 for CPU ranks")
    assert not (tmp_path / "slurm").exists()
    # CPU ranks, asked for explicitly: as many as wanted, on the CPU even where the node has GPUs
    text = script("--gpus-per-node", "0", "--procs-per-node", "4")
    assert "--nproc_per_node=4" in text and "run.py --set model.device=cpu" in text
    assert "model.device" not in script("--gpus-per-node", "2")


def test_the_job_asks_for_cores_and_memory_per_rank_and_shares_the_cores():
    text = script("--gpus-per-node", "2")
    assert "#SBATCH --cpus-per-task=8\n" in text and "#SBATCH --mem=64G\n" in text and "--exclusive" not in text
    assert "CPUS=${SLURM_CPUS_PER_TASK:-$SLURM_CPUS_ON_NODE}" in text
    assert "export OMP_NUM_THREADS=$(( CPUS / 2 > 0 ? CPUS / 2 : 1 ))" in text
    assert "srun --kill-on-bad-exit=1 --ntasks-per-node=1 --cpus-per-task=$CPUS " in text
    text = script("--gpus-per-node", "2", "--cpus-per-task", "6", "--mem", "100G")
    assert "#SBATCH --cpus-per-task=6\n" in text and "#SBATCH --mem=100G\n" in text
    text = script("--gpus-per-node", "8", "--exclusive")  # the whole node: all its cores, --mem=0 all its memory
    assert "#SBATCH --exclusive" in text and "#SBATCH --mem=0\n" in text and "#SBATCH --cpus-per-task" not in text
    shares = "\n".join(line for line in text.splitlines() if line.startswith(("CPUS=", "export OMP")))
    out = subprocess.run(["bash", "-c", shares + "\necho $OMP_NUM_THREADS"], env={"SLURM_CPUS_ON_NODE": "96"},
                         capture_output=True, text=True).stdout
    assert out == "12\n"


def test_deepspeed_names_the_gpus_slurm_gave_the_node():
    text = script("--gpus-per-node", "2", "--launcher", "deepspeed", "--nodes", "2")
    srun = text[text.index("\nsrun ") + 1:text.index(" &\nCHILD=$!")]  # its bash -c script spans lines
    words = shlex.split(srun)
    assert words[words.index("-c") + 1] == deepspeed_node_command(2, 2, Path("/tmp/out"))
    assert 'IDS=$(echo "${CUDA_VISIBLE_DEVICES:-0,1}" | cut -d, -f1-2)' in srun
    assert '--include="$(sed "s/$/:$IDS/" <<< "$HOSTS" | paste -sd @)"' in srun
    assert "IDS=0,1,2\n" in script("--procs-per-node", "3", "--launcher", "deepspeed")  # CPU ranks: ids only count


@pytest.mark.slow
def test_the_deepspeed_launcher_hands_its_ranks_the_jobs_gpus(tmp_path):
    """The real deepspeed launcher, as the script starts it on the second node of two, where SLURM gave the job
    GPUs `visible` of that node (no GPU needed: the launcher sets CUDA_VISIBLE_DEVICES the same on CPU). Two cases,
    side by side: the launcher's start is single-threaded."""
    bin_dir = tmp_path / "bin"  # scontrol as SLURM answers it for a two-node job
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'node-a\\nnode-b\\n'\n")
    (bin_dir / "scontrol").chmod(0o755)
    cases = {"2,3": "2,3", "4,6,7": "4,6"}  # CUDA_VISIBLE_DEVICES SLURM set -> the ranks' GPUs
    procs = {}
    for case, (visible, port) in enumerate(zip(cases, ("29618", "29619"))):
        folder = tmp_path / f"case{case}"
        (folder / "slurm").mkdir(parents=True)
        rank = folder / "rank.py"
        rank.write_text("import os, sys\nfrom pathlib import Path\n"  # a file each: ranks' prints would interleave
                        "e = os.environ\nPath(sys.argv[0]).with_name('rank' + e['RANK']).write_text("
                        "f\"{e['WORLD_SIZE']} {e['CUDA_VISIBLE_DEVICES']} {sys.argv[1:]}\")\n")
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node-[a-b]",
               "SLURM_JOB_ID": "7", "SLURM_NODEID": "1", "HEAD": "127.0.0.1", "PORT": port,
               "CUDA_VISIBLE_DEVICES": visible}
        command = deepspeed_node_command(len(visible.split(",")), 2, folder)
        procs[visible] = (folder, subprocess.Popen(
            ["bash", "-c", command, "ptuning", str(rank), "--config", "c.json"], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True))
    for visible, (folder, proc) in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, out[-2000:] + err[-2000:]
        for r in (0, 1):  # ranks 2 and 3 of 4, on the job's GPUs
            assert (folder / f"rank{2 + r}").read_text() == \
                f"4 {cases[visible]} ['--local_rank={r}', '--config', 'c.json']"
