"""The runner under every launcher, with real process groups (gloo), the real launchers, W&B offline, and a
kill -9 in the middle of training."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ptuning.config import ConfigError, load_config
from ptuning.parallel.packs import assign_packs, balance
from ptuning.output.store import RunStore
from tests.conftest import REPO, free_port, free_ports
from tests.ranks import spawn, start
from tests.wandb_records import read_run

BIN = Path(sys.executable).parent
RELATIONS = "P1376,P36,P37,P1001"
FIGURES = ("n_test", "manual_p@1", "dev_p@1", "test_p@1", "test_p@10", "best_epoch", "epochs_run", "dev_history")


def sweep_args(model: Path, lama: Path, out: Path, *extra: str) -> list[str]:
    return [str(REPO / "launcher" / "run.py"), "--set", f"model.name={model}", "--relations", RELATIONS,
            "--data-dir", str(lama), "--out", str(out), "--set", "data.max_train=24", "--set", "data.max_dev=12",
            "--set", "data.max_test=30", "--set", "train.max_epochs=3", "--set", "train.lr=0.01", *extra]


def launch(*commands: list[str], timeout: int = 600) -> list[subprocess.CompletedProcess]:
    """Each command (a launcher, then run.py and its arguments) started at once; each must succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    logs = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in commands]  # pipes could fill
    procs = [subprocess.Popen(command, stdout=out, stderr=err, text=True, env=env, cwd=REPO)
             for command, (out, err) in zip(commands, logs)]
    done = []
    for command, proc, (out, err) in zip(commands, procs, logs):
        proc.wait(timeout=timeout)
        out.seek(0)
        err.seek(0)
        done.append(subprocess.CompletedProcess(command, proc.returncode, out.read(), err.read()))
        assert proc.returncode == 0, done[-1].stdout[-3000:] + done[-1].stderr[-3000:]
    return done


def figures(out: Path) -> dict:
    results = json.loads((out / "results.json").read_text())
    return {rid: {k: r.get(k) for k in FIGURES} for rid, r in results["relations"].items()}


@pytest.fixture(scope="module")
def single(tiny_gpt2, lama, tmp_path_factory):
    """One plain process, every launcher's reference: it starts here and runs beside the first launch that needs
    it; single() waits for it and gives its folder."""
    out = tmp_path_factory.mktemp("single")
    job = start(0, *sweep_args(tiny_gpt2, lama, out))

    def folder() -> Path:
        job.wait()
        return out
    return folder


def test_balance_puts_the_largest_first_on_the_least_loaded_group():
    groups = balance({"a": 800, "b": 700, "c": 400, "d": 300, "e": 300}, 2)
    assert groups == [["a", "d", "e"], ["b", "c"]]  # loads 1400 and 1100; the tie at 1100 went to group 0
    assert balance({"a": 1}, 3) == [["a"], [], []]


def test_packs_of_n_are_the_same_under_any_world_size_and_groups_take_whole_packs():
    weights = {"a": 800, "b": 700, "c": 400, "d": 300, "e": 300}
    one = assign_packs(weights, 2, 1)
    assert one == [[["a", "b"], ["c", "d"], ["e"]]]
    two = assign_packs(weights, 2, 2)
    assert two == [[["a", "b"]], [["c", "d"], ["e"]]]  # loads 1500 and 1000: whole packs, the same packs
    assert sorted(p for share in assign_packs(weights, 2, 3) for p in share) == sorted(one[0])
    assert assign_packs(weights, 0, 2) == [[["a", "d", "e"]], [["b", "c"]]]  # one balanced pack per group
    assert assign_packs({"a": 1}, 0, 2) == [[["a"]], []]


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(single, tiny_gpt2, lama, tmp_path):
    launch([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
            *sweep_args(tiny_gpt2, lama, tmp_path)])
    assert figures(tmp_path) == figures(single())
    assert json.loads((tmp_path / "results.json").read_text())["world_size"] == 2
    # each data-parallel group's writer wrote its own relations
    assert all(RunStore(tmp_path).encoder_path(r).is_file() for r in RELATIONS.split(","))


@pytest.mark.slow
def test_deepspeed_launcher_runs_the_same_config(single, tiny_gpt2, lama, tmp_path):
    """Two launches side by side: P-tuning, and LM fine-tuning with a deepspeed section (the trainable parameters
    go through deepspeed.initialize)."""
    ports = free_ports(2)
    _, proc = launch([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(ports[0]),
                      *sweep_args(tiny_gpt2, lama, tmp_path / "prompts")],
                     [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(ports[1]),
                      *sweep_args(tiny_gpt2, lama, tmp_path / "finetune", "--set", "train.mode=ptuning_finetune",
                                  "--set", 'deepspeed.zero_optimization={"stage": 1}', "--set",
                                  "train.max_epochs=1")])
    assert figures(tmp_path / "prompts") == figures(single())
    assert "deepspeed_shm_comm" not in proc.stdout + proc.stderr  # not compiled for CPU ranks (finetune.py)
    assert proc.stderr.count("DeepSpeed engine: ZeRO stage 1") + proc.stdout.count("DeepSpeed engine: ZeRO stage 1") >= 4
    results = json.loads((tmp_path / "finetune" / "results.json").read_text())
    assert {r["status"] for r in results["relations"].values()} == {"done"}


@pytest.mark.slow
def test_offline_wandb_run_holds_the_summary_and_the_table(single):
    folder = single()
    results = json.loads((folder / "results.json").read_text())
    run = read_run(folder)
    assert run["group"] == "tiny-gpt20-shared" and run["job_type"] == "ptuning"
    assert run["summary"]["macro_p@1"] == pytest.approx(results["macro"]["test_p@1"])
    assert run["summary"]["micro_p@1"] == pytest.approx(results["micro"]["test_p@1"])
    assert run["summary"]["vocab"] == results["vocab"] and run["summary"]["n_relations"] == 4
    table = run["history"]["relations"]
    assert table["_type"] == "table-file" and table["nrows"] == 4
    table_file = next(run["files"][0].parent.glob("files/media/table/relations_*.table.json"))
    rows = json.loads(table_file.read_text())
    assert [r[0] for r in rows["data"]] == RELATIONS.split(",")
    assert rows["columns"][:6] == ["relation", "label", "n_test", "manual_p@1", "dev_p@1", "test_p@1"]
    column = rows["columns"].index("majority_p@1")  # the probing controls stand beside every P@1
    assert [r[column] for r in rows["data"]] == [results["relations"][rid]["majority_p@1"] for rid in RELATIONS.split(",")]
    assert run["summary"]["macro_majority_p@1"] == pytest.approx(results["macro"]["majority_p@1"])
    assert run["summary"]["micro_test_uhn_p@1"] == pytest.approx(results["micro"]["test_uhn_p@1"])
    assert "P36/dev_p@1" in run["history"] and "P36/test_p@1" in run["history"]
    assert (folder / "p_at_1.png").stat().st_size > 1000
    assert all(str(p).startswith(str(folder)) for p in run["files"])


def interrupted_args(model: Path, lama: Path, out: Path, *extra: str) -> list[str]:
    return sweep_args(model, lama, out, "--relations", "P1376,P36", "--set", "train.pack_units=1", "--set",
                      "data.max_train=200", "--set", "train.max_epochs=25", "--set", "train.patience=25", "--set",
                      "logging.wandb=false", *extra)


def checkpoint_epoch(store: RunStore, relation: str) -> int | None:
    import torch

    try:
        return torch.load(store.checkpoint_path(relation), weights_only=True)["epoch"]
    except (FileNotFoundError, RuntimeError, EOFError):
        return None


@pytest.mark.slow
def test_kill_9_between_interval_checkpoints_then_restart_equals_an_uninterrupted_run(tiny_gpt2, lama, tmp_path):
    """Checkpoints every 0.02 minutes (1.2 s): several epochs between them, and the kill lands after the last one,
    so the restart redoes epochs that had already run. (Every-epoch checkpoints: test_sharded_prompts.py.)"""
    whole = start(0, *interrupted_args(tiny_gpt2, lama, tmp_path / "whole"))  # the reference, never stopped
    minutes = 0.02
    out = tmp_path / "stopped"
    args = interrupted_args(tiny_gpt2, lama, out, "--set", f"output.checkpoint_minutes={minutes}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable] + args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    store = RunStore(out)
    deadline = time.time() + 300

    def between_checkpoints() -> bool:  # P1376 finished, P36 a checkpoint in and (interval) two epochs past it
        progress = (store.progress("P36") or {}) if (store.result("P1376") or {}).get("status") == "done" else {}
        saved = checkpoint_epoch(store, "P36")
        ran = len(progress.get("dev_history", []))
        return ran >= 3 and saved is not None and ran >= saved + 2

    while time.time() < deadline:
        if between_checkpoints():
            proc.send_signal(signal.SIGSTOP)  # frozen, then checked again: no checkpoint lands between check and kill
            if between_checkpoints():
                break
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (store.result("P36") or {}).get("status") != "done", "the run finished before it could be killed"
    saved, ran = checkpoint_epoch(store, "P36"), len(store.progress("P36")["dev_history"])
    assert saved is not None and saved < ran, (saved, ran)

    restarted = spawn(0, *args)
    assert "already final, skipped: P1376" in restarted.stderr
    assert f"P36: resuming after epoch {saved}" in restarted.stderr
    whole.wait()
    assert figures(out) == figures(tmp_path / "whole")
    assert not store.checkpoint_path("P36").exists()


@pytest.mark.slow
def test_a_failing_rank_stops_the_job_naming_rank_and_relation(tiny_gpt2, lama_copy, tmp_path):
    """P36 falls to rank 1 (three relations of 24 facts: P1376 and P37 on group 0); one of its training facts is
    longer than the tiny model's 128 positions, so its first training step fails inside the model."""
    train = lama_copy / "fact-retrieval" / "original" / "P36" / "train.jsonl"
    lines = train.read_text().splitlines()
    lines[0] = json.dumps({"sub_label": " ".join(["Springfield"] * 150), "obj_label": "Paris"})
    train.write_text("\n".join(lines) + "\n")
    args = sweep_args(tiny_gpt2, lama_copy, tmp_path, "--relations", "P1376,P36,P37", "--set", "logging.wandb=false")
    run = spawn(2, *args, timeout=300, check=False)
    assert run.codes[1] == 1
    assert "error: rank 1 failed on unit(s) P36: IndexError" in run.rank_stderr[1], run.stderr[-3000:]


@pytest.mark.slow
def test_a_broken_checkpoint_stops_the_job_before_anything_is_written(tiny_gpt2, lama, tmp_path):
    store = RunStore(tmp_path)
    store.checkpoint_path("P37").parent.mkdir(parents=True)
    store.checkpoint_path("P37").write_bytes(b"not a checkpoint")
    run = spawn(2, *sweep_args(tiny_gpt2, lama, tmp_path, "--set", "logging.wandb=false"), timeout=300,
                check=False)
    assert run.codes[0] == 2  # rank 0's user-error status
    assert "P37/checkpoint.pt: cannot read the checkpoint" in run.rank_stderr[0]
    assert "delete it to restart P37 from scratch" in run.rank_stderr[0]
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "run_config.json").exists()


def test_a_folder_made_with_other_settings_is_not_resumed(tmp_path):
    store = RunStore(tmp_path)
    store.begin(load_config(None, ["train.lr=1e-3"]))
    store.check_resumable(load_config(None, ["train.lr=1e-3", "train.pack_units=2", "data.relations=P19"]))
    with pytest.raises(ConfigError, match=r"other settings \(train.lr\)"):
        store.check_resumable(load_config(None, ["train.lr=3e-3"]))
    store.check_resumable(load_config(None, ["train.lr=3e-3", "output.resume=false"]))  # will start it over
    # a folder from before pack_relations was renamed still resumes (packing does not change results)
    old = json.loads((tmp_path / "run_config.json").read_text())
    old["train"]["pack_relations"] = old["train"].pop("pack_units", 0)
    (tmp_path / "run_config.json").write_text(json.dumps(old))
    store.check_resumable(load_config(None, ["train.lr=1e-3"]))


@pytest.mark.slow
def test_one_rank_and_two_ranks_compute_the_same_floats_in_deterministic_mode(lama, tmp_path):
    """SmolLM2-135M, packs of one relation, one thread per rank: one process runs both packs, two ranks one each, and
    every figure (MRR and the dev curve included) is the same to the last bit. The three processes start at once
    from an empty model cache: one dequantizes the GGUF while the others wait, whichever rank it is."""
    args = [str(REPO / "launcher" / "run.py"), "--relations", "P36,P1376", "--data-dir", str(lama), "--set",
            "data.max_train=24", "--set", "data.max_dev=16", "--set", "data.max_test=24", "--set",
            "train.max_epochs=2", "--set", "train.lr=1e-3", "--set", "prompt.anchors=true", "--set",
            "prompt.init=manual", "--set", "train.pack_units=1", "--set",
            "parallel.threads=1", "--set", "parallel.deterministic=true", "--set", "logging.wandb=false"]
    cache = {"PTUNING_LAMA_CACHE": str(tmp_path / "cache")}
    one = start(0, *args, "--out", str(tmp_path / "one"), env=cache)  # side by side: three processes of one thread
    spawn(2, *args, "--out", str(tmp_path / "two"), env=cache)
    one.wait()
    [made] = (tmp_path / "cache").glob("SmolLM2-*")
    assert sorted(p.name for p in made.iterdir()) == ["chat_template.jinja", "config.json", "model.safetensors",
                                                      "tokenizer.json", "tokenizer_config.json"]
    one, two = (json.loads((tmp_path / name / "results.json").read_text())["relations"] for name in ("one", "two"))
    for rid in ("P36", "P1376"):
        assert {k: one[rid][k] for k in FIGURES + ("test_mrr",)} == {k: two[rid][k] for k in FIGURES + ("test_mrr",)}
    assert min(one[rid]["test_p@1"] for rid in one) > 0.05  # prompts that do something
