"""The command line end to end on tiny random models: the results contract and one-line errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launcher.distributed import choose_device
from launcher.run import main
from ptuning.config import ConfigError
from ptuning.files import load_tensors
from tests.conftest import REPO, free_port
from tests.ranks import spawn

SMALL = ["--set", "data.max_train=16", "--set", "data.max_dev=8", "--set", "data.max_test=20",
         "--set", "train.max_epochs=2", "--set", "logging.progress=lines"]
RELATION_KEYS = {"label", "status", "n_train", "n_dev", "n_test", "dropped", "manual_p@1", "dev_p@1", "test_p@1",
                 "test_p@10", "test_mrr", "best_epoch", "epochs_run", "seconds"}


@pytest.mark.slow
def test_cli_writes_the_results_contract(tiny_bert, lama, tmp_path):
    out = tmp_path / "out"
    proc = spawn(0, REPO / "launcher" / "run.py", "--set", f"model.name={tiny_bert}", "--relations", "P36,P1376",
                 "--data-dir", lama, "--out", out, *SMALL, timeout=300)
    assert "| **macro average** |" in proc.stdout and "P36 epoch 1: dev P@1" in proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["vocab"] == "LAMA-29k (bert-base-cased list mapped)" and results["kind"] == "masked"
    assert results["config"]["train"]["lr"] == 1e-5 and results["config"]["data"]["max_train"] == 16
    assert set(results["relations"]) == {"P36", "P1376"}
    for rid, r in results["relations"].items():
        assert RELATION_KEYS <= set(r), rid
        assert r["status"] == "done" and r["n_train"] == 16 and set(r["dropped"]) == {"train", "dev", "test"}
        vectors = load_tensors(out / "relations" / rid / "prompt_vectors.safetensors")["prompt_vectors"]
        assert vectors.shape == (9, 32)  # (3, subject, 3, [MASK], 3) with hidden size 32
        assert (out / "relations" / rid / "prompt_encoder.safetensors").is_file()
    assert set(results["macro"]) >= {"test_p@1", "manual_p@1", "n_relations"}
    assert results["micro"]["n_test_facts"] == 40
    mean = sum(r["test_p@1"] for r in results["relations"].values()) / 2
    assert results["macro"]["test_p@1"] == pytest.approx(mean)
    assert "| P36 | capital |" in (out / "results.md").read_text()
    assert not list(out.rglob(".*"))  # no temporary files left behind


def test_only_evaluate_reproduces_the_saved_prompts(tiny_gpt2, lama, tmp_path, capsys):
    args = ["--set", f"model.name={tiny_gpt2}", "--relations", "P37", "--data-dir", str(lama), "--out",
            str(tmp_path), *SMALL]
    assert main(args) == 0
    trained = json.loads((tmp_path / "results.json").read_text())["relations"]["P37"]
    assert main(args + ["--only-evaluate"]) == 0
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["mode"] == "evaluate" and again["relations"]["P37"]["status"] == "evaluated"
    for key in ("test_p@1", "test_p@10", "test_mrr", "dev_p@1"):
        assert again["relations"]["P37"][key] == pytest.approx(trained[key], abs=1e-9), key


def test_manual_baseline_only(tiny_gpt2, lama, tmp_path):
    assert main(["--set", f"model.name={tiny_gpt2}", "--relations", "P36", "--data-dir", str(lama),
                 "--out", str(tmp_path), "--manual-baseline", *SMALL]) == 0
    r = json.loads((tmp_path / "results.json").read_text())["relations"]["P36"]
    assert r["status"] == "manual_only" and "manual_p@1" in r and "test_p@1" not in r
    assert "****" not in (tmp_path / "results.md").read_text()  # no empty headline cell


def test_empty_relation_is_skipped_and_recorded(tiny_gpt2, lama_copy, tmp_path):
    path = lama_copy / "fact-retrieval/original/P37/test.jsonl"
    path.write_text(path.read_text().replace('"obj_label": "', '"obj_label": "Zzqx'))
    assert main(["--set", f"model.name={tiny_gpt2}", "--relations", "P36,P37", "--data-dir", str(lama_copy),
                 "--out", str(tmp_path), *SMALL]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["relations"]["P37"]["status"] == "skipped"
    assert "no test facts left" in results["relations"]["P37"]["reason"]
    assert results["macro"]["n_relations"] == 1


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    return err


def test_errors_are_one_line(tiny_gpt2, lama_copy, tmp_path, capsys):
    base = ["--set", f"model.name={tiny_gpt2}", "--out", str(tmp_path / "o")]
    err = one_line_error(capsys, base + ["--data-dir", str(tmp_path / "missing")])
    assert "LAMA data folder not found" in err
    broken = lama_copy / "fact-retrieval/original/P36/dev.jsonl"
    broken.write_text(broken.read_text().replace("}", "", 1))
    err = one_line_error(capsys, base + ["--data-dir", str(lama_copy), "--relations", "P36"])
    assert "P36/dev.jsonl, line 1: not valid JSON" in err
    err = one_line_error(capsys, base + ["--data-dir", str(lama_copy), "--set", "train.learning_rate=1"])
    assert "train.learning_rate: unknown key" in err
    err = one_line_error(capsys, base + ["--data-dir", str(lama_copy), "--relations", "P4242"])
    assert "unknown relation id(s) P4242" in err
    assert not (tmp_path / "o" / "results.json").exists()


def test_the_device_rule_one_gpu_per_rank_or_cpu():
    cpu, cuda1 = torch.device("cpu"), torch.device("cuda:1")
    assert choose_device("cpu", 1, 2, 2) == cpu  # forced, GPUs or not
    assert choose_device("auto", 1, 2, 2) == cuda1 and choose_device("cuda", 1, 2, 4) == cuda1
    assert choose_device("auto", 1, 2, 0) == cpu
    with pytest.raises(ConfigError, match=r"^2 processes per node were started but this node has 1 GPU\(s\): start "
                                          r"at most 1 per node, or set model.device=cpu"):
        choose_device("auto", 0, 2, 1)  # every rank of the node stops, the first one too
    with pytest.raises(ConfigError, match="model.device=cuda but this node has no CUDA GPU"):
        choose_device("cuda", 0, 1, 0)
    with pytest.raises(ConfigError, match="model.device=cuda:1: expected auto, cpu or cuda"):
        choose_device("cuda:1", 0, 1, 2)


@pytest.mark.slow
def test_model_device_cpu_runs_and_cuda_without_a_gpu_is_a_one_line_error(tiny_gpt2, lama, tmp_path, capsys):
    base = ["--set", f"model.name={tiny_gpt2}", "--relations", "P37", "--data-dir", str(lama), *SMALL]
    spawn(0, REPO / "launcher" / "run.py", *base, "--out", tmp_path / "cpu", "--set", "model.device=cpu", "--set",
          "logging.wandb=false", timeout=300)
    results = json.loads((tmp_path / "cpu" / "results.json").read_text())
    assert results["config"]["model"]["device"] == "cpu" and results["relations"]["P37"]["status"] == "done"
    if not torch.cuda.is_available():
        err = one_line_error(capsys, base + ["--out", str(tmp_path / "cuda"), "--set", "model.device=cuda"])
        assert "model.device=cuda but this node has no CUDA GPU: set model.device=cpu" in err


@pytest.mark.slow
def test_torchrun_with_more_ranks_than_gpus_stops_every_rank_with_the_error(tmp_path):
    """On this machine's GPU count + 1 ranks: every rank stops before any collective (no rank waits for a peer)."""
    n_gpus = torch.cuda.device_count()
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(n_gpus + 1), "--master_port", str(free_port()),
         str(REPO / "launcher" / "run.py"), "--out", str(tmp_path), "--set",
         f"model.device={'auto' if n_gpus else 'cuda'}"],
        capture_output=True, text=True, timeout=120)
    expected = (f"error: {n_gpus + 1} processes per node were started but this node has {n_gpus} GPU(s): start at most"
                if n_gpus else "error: model.device=cuda but this node has no CUDA GPU: set model.device=cpu")
    assert proc.returncode != 0 and proc.stderr.count(expected) == n_gpus + 1, proc.stderr[-3000:]
    assert "exitcode: 2" in proc.stderr  # run.py's user-error status; torchrun itself then exits 1
