"""The command line end to end on tiny random models: the results contract and one-line errors."""
import json
import subprocess
import sys

import pytest

from launcher.run import main
from ptuning.results import load_tensors
from tests.conftest import REPO

SMALL = ["--set", "data.max_train=16", "--set", "data.max_dev=8", "--set", "data.max_test=20",
         "--set", "train.max_epochs=2", "--set", "logging.progress=lines"]
RELATION_KEYS = {"label", "status", "n_train", "n_dev", "n_test", "dropped", "manual_p@1", "dev_p@1", "test_p@1",
                 "test_p@10", "test_mrr", "best_epoch", "epochs_run", "seconds"}


def test_cli_writes_the_results_contract(tiny_bert, lama, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "launcher" / "run.py"), "--set", f"model.name={tiny_bert}",
         "--relations", "P36,P1376", "--data-dir", str(lama), "--out", str(out), *SMALL],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
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
