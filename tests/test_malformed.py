"""Every kind of file the program reads, malformed in a few ways: a one-line `error:` naming the file (and the line,
for text), exit status 2, and nothing written. A folder being resumed is checked whole before anything is written;
two jobs on one folder do not interleave."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launcher.run import main
from ptuning.config import load_config
from ptuning.output.store import RunStore
from tests.conftest import REPO

SMALL = ["--set", "data.max_train=16", "--set", "data.max_dev=8", "--set", "data.max_test=8", "--set",
         "train.max_epochs=2", "--set", "train.lr=0.01", "--set", "logging.wandb=false", "--set",
         "logging.progress=off"]


def _rewrite(path: Path, edit) -> None:
    path.write_bytes(edit(path.read_bytes()))


def _line(path: Path, number: int, text: bytes) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    lines[number - 1] = text + b"\n"
    path.write_bytes(b"".join(lines))


def _json(path: Path, edit) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


@pytest.fixture(scope="module")
def trained(tiny_gpt2, lama, tmp_path_factory) -> Path:
    """A finished folder (P36) plus a real mid-training checkpoint of P37, as a stop would leave it."""
    from ptuning.data.lama import find_layout, read_relation_infos
    from ptuning.model.loading import load_backbone
    from ptuning.data.tasks import prepare_task, read_relation
    from ptuning.train import checkpoint
    from ptuning.train.trainer import Trainer
    from ptuning.data.vocab import build_answer_vocab

    out = tmp_path_factory.mktemp("trained")
    assert main(["--set", f"model.name={tiny_gpt2}", "--relations", "P36", "--data-dir", str(lama), "--out",
                 str(out), *SMALL]) == 0
    cfg = load_config(None, [f"model.name={tiny_gpt2}", "data.max_train=16"])
    backbone = load_backbone(cfg.model)
    layout = find_layout(lama)
    vocab = build_answer_vocab(backbone.tokenizer, backbone.vocab_size, "shared", layout, "bert-base-cased")
    task = prepare_task(read_relation_infos(layout)["P37"], read_relation(layout, "P37"), vocab, cfg.data)
    trainer = Trainer(backbone, cfg, vocab.allowed)
    checkpoint.write(RunStore(out).checkpoint_path("P37"),
                     checkpoint.state_of(trainer.prepare([task])[0], trainer.bank, trainer.lm, trainer.scaler))
    return out


def _checkpoint(edit):
    def apply(folder: Path) -> None:
        path = RunStore(folder).checkpoint_path("P37")
        state = torch.load(path, weights_only=True)
        torch.save(edit(state), path)
    return apply


# (where the broken file lives, how it is broken, what the one line must say)
DATA = [
    ("fact-retrieval/original/P36/train.jsonl", lambda p: _line(p, 2, b'{"sub_label": "x", "obj_label": '),
     r"P36/train\.jsonl, line 2: not valid JSON"),
    ("fact-retrieval/original/P36/dev.jsonl", lambda p: _line(p, 3, b'{"sub_label": "Caf\xe9", "obj_label": "x"}'),
     r"P36/dev\.jsonl, line 3: not UTF-8 text \(byte 0xe9 at column 19\)"),
    ("fact-retrieval/original/P36/test.jsonl", lambda p: _line(p, 1, b'{"sub_label": "Paris"}'),
     r"P36/test\.jsonl, line 1: field 'obj_label' is missing"),
    ("fact-retrieval/original/P36/train.jsonl", lambda p: _line(p, 4, b'{"sub_label": 12, "obj_label": "x"}'),
     r"P36/train\.jsonl, line 4: field 'sub_label' must be a non-empty string, got 12"),
    ("fact-retrieval/original/P36/train.jsonl", lambda p: _line(p, 1, b'["Paris", "France"]'),
     r"P36/train\.jsonl, line 1: expected a JSON object, got a JSON list"),
    ("fact-retrieval/original/P36/test.jsonl", lambda p: _rewrite(p, lambda b: b[:-40]),
     r"P36/test\.jsonl, line \d+: not valid JSON"),
    ("relations.jsonl", lambda p: _line(p, 1, b'{"relation": "P19", "template": '),
     r"relations\.jsonl, line 1: not valid JSON"),
    ("relations.jsonl", lambda p: _rewrite(p, lambda b: b.replace(b'"[X] is the capital of [Y] ."', b'"[X] is it"')),
     r"relations\.jsonl, line \d+: field 'template' must contain \[X\] and \[Y\]"),
    ("relations.jsonl", lambda p: _line(p, 2, b'{"relation": "P20", "template": "[X] d\xc3\x28 [Y]"}'),
     r"relations\.jsonl, line 2: not UTF-8 text \(byte 0xc3 at column 39\)"),
    ("vocab/29k-vocab.json", lambda p: _rewrite(p, lambda b: b[: len(b) // 2]), r"29k-vocab\.json, line 1: not valid JSON"),
    ("vocab/29k-vocab.json", lambda p: p.write_text('["Paris", "France"]'),
     r"29k-vocab\.json: expected an object of word lists by model, got a JSON list"),
    ("vocab/29k-vocab.json", lambda p: p.write_text('{"roberta-large": ["Paris"]}'),  # tiny-gpt2 reads gpt2-xl
     r"29k-vocab\.json: no word list for 'gpt2-xl' \(keys: roberta-large\)"),
    ("vocab/29k-vocab.json", lambda p: p.write_text('{"gpt2-xl": ["Paris", 3]}'),
     r"29k-vocab\.json: field 'gpt2-xl' must be a list of words"),
    ("vocab/29k-vocab.json", lambda p: p.write_bytes(b'{"gpt2-xl": ["\xff"]}'),
     r"29k-vocab\.json, line 1: not UTF-8 text \(byte 0xff at column 15\)"),
]


@pytest.mark.parametrize("relative, corrupt, message", DATA, ids=[f"{c[0].split('/')[-1]}-{i}" for i, c in
                                                                  enumerate(DATA)])
def test_malformed_data(relative, corrupt, message, tiny_gpt2, lama_copy, tmp_path, capsys):
    corrupt(lama_copy / relative)
    out = tmp_path / "out"
    assert main(["--set", f"model.name={tiny_gpt2}", "--relations", "P36,P37", "--data-dir", str(lama_copy),
                 "--out", str(out), *SMALL]) == 2
    _one_line(capsys, message)
    assert not out.exists()  # data errors stop before the model loads


CONFIGS = [
    (b'{\n  "train": {"lr": 1e-5,}\n}', r"c\.json, line 2: not valid JSON"),
    (b'{"model": {"name": "caf\xe9"}}', r"c\.json, line 1: not UTF-8 text \(byte 0xe9 at column 24\)"),
    (b'[1, 2]', r"c\.json: the top level must be an object"),
    (b'{"train": 5}', r"c\.json: train: expected an object of keys"),
    (b'{"train": {"lr": 1e-', r"c\.json, line 1: not valid JSON"),
    (b'{"train": {"lr": "fast"}}', r"c\.json: train\.lr: expected a number, got 'fast'"),
]


@pytest.mark.parametrize("content, message", CONFIGS)
def test_malformed_config(content, message, lama, tmp_path, capsys):
    (tmp_path / "c.json").write_bytes(content)
    assert main(["--config", str(tmp_path / "c.json"), "--data-dir", str(lama), "--out", str(tmp_path / "o")]) == 2
    _one_line(capsys, message)
    assert not (tmp_path / "o").exists()


FOLDER = [
    ("relations/P36/result.json", lambda p: _rewrite(p, lambda b: b[:-5]),
     r"P36/result\.json, line \d+: not valid JSON", False),
    ("relations/P36/result.json", lambda p: p.write_text("[1]"),
     r"P36/result\.json: expected a JSON object \(a record this program wrote\), got a JSON list", False),
    ("relations/P36/progress.json", lambda p: p.write_bytes(b'{"dev_history": [0.5, \x80]}'),
     r"P36/progress\.json, line 1: not UTF-8 text \(byte 0x80 at column 23\)", False),
    ("run_config.json", lambda p: _rewrite(p, lambda b: b[:10]), r"run_config\.json, line \d+: not valid JSON", False),
    ("relations/P37/checkpoint.pt", lambda p: p.write_bytes(b"not a checkpoint"),
     r"P37/checkpoint\.pt: cannot read the checkpoint .*; delete it to restart P37 from scratch", False),
    ("relations/P37/checkpoint.pt", lambda p: _rewrite(p, lambda b: b[: len(b) // 2]),
     r"P37/checkpoint\.pt: cannot read the checkpoint \(not a whole torch checkpoint: truncated, or another kind "
     r"of file\); delete it to restart P37", False),
    ("", _checkpoint(lambda s: {k: v for k, v in s.items() if k != "order"}),
     r"P37/checkpoint\.pt: not a checkpoint of this program \(no 'order'\); delete it to restart P37", False),
    ("", _checkpoint(lambda s: {**s, "epoch": "3"}),
     r"P37/checkpoint\.pt: field 'epoch' is a str; delete it to restart P37", False),
    ("relations/P36/prompt_encoder.safetensors", lambda p: _rewrite(p, lambda b: b[: len(b) // 2]),
     r"P36/prompt_encoder\.safetensors: cannot read the saved prompt encoder \(.*\); delete .*P36 to train P36 again",
     False),
    ("relations/P36/prompt_encoder.safetensors", lambda p: _rewrite(p, lambda b: b[: len(b) // 2]),
     r"P36/prompt_encoder\.safetensors: cannot read the saved prompt encoder", True),
]


@pytest.mark.parametrize("relative, corrupt, message, evaluate", FOLDER, ids=[
    f"{c[0].split('/')[-1] or 'checkpoint'}-{i}" for i, c in enumerate(FOLDER)])
def test_malformed_output_folder(relative, corrupt, message, evaluate, trained, tiny_gpt2, lama, tmp_path, capsys):
    folder = tmp_path / "out"
    shutil.copytree(trained, folder)
    corrupt(folder / relative) if relative else corrupt(folder)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != "run.lock"}
    args = ["--set", f"model.name={tiny_gpt2}", "--relations", "P36,P37", "--data-dir", str(lama), "--out",
            str(folder), *SMALL] + (["--only-evaluate"] if evaluate else [])
    assert main(args) == 2
    _one_line(capsys, message)
    after = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != "run.lock"}
    assert after == before  # nothing written, not even results.json


def test_a_saved_encoder_of_another_shape_is_named(trained, tiny_gpt2, lama, tmp_path, capsys):
    folder = tmp_path / "out"
    shutil.copytree(trained, folder)
    args = ["--set", f"model.name={tiny_gpt2}", "--relations", "P36", "--data-dir", str(lama), "--out",
            str(folder), *SMALL, "--only-evaluate"]
    from ptuning.files import load_tensors, save_tensors

    path = RunStore(folder).encoder_path("P36")
    save_tensors(path, {k: v[..., :-1] for k, v in load_tensors(path).items()})
    assert main(args) == 2
    _one_line(capsys, r"P36/prompt_encoder\.safetensors: does not fit the configured prompt encoder")


def test_a_second_job_on_the_same_folder_stops_naming_the_first(tiny_gpt2, lama, tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from ptuning.output.store import RunStore; "
        f"RunStore({str(tmp_path)!r}).lock('pid 4242 on node7, SLURM job 99'); print('held', flush=True); "
        "time.sleep(60)")], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        args = ["--set", f"model.name={tiny_gpt2}", "--relations", "P36", "--data-dir", str(lama), "--out",
                str(tmp_path), *SMALL]
        assert main(args) == 2
        _one_line(capsys, rf"{tmp_path}: in use by pid 4242 on node7, SLURM job 99; wait for that job to end, or "
                          r"use another output\.dir")
        assert not (tmp_path / "results.json").exists()
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    assert main(args) == 0  # the lock went with its process
    assert "pid" in (tmp_path / "run.lock").read_text()


def _one_line(capsys, message: str) -> None:
    import re

    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and err.splitlines()[-1] == lines[0], err[-2000:]
    assert re.search(message, lines[0]), lines[0]


def test_starting_over_with_a_model_that_does_not_load_keeps_the_old_folder(trained, lama, tmp_path, capsys):
    """output.resume=false clears a folder only once the model has loaded: a typo in model.name loses nothing."""
    folder = tmp_path / "out"
    shutil.copytree(trained, folder)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != "run.lock"}
    assert main(["--set", f"model.name={tmp_path / 'no-such-model'}", "--relations", "P36", "--data-dir", str(lama),
                 "--out", str(folder), "--set", "output.resume=false", *SMALL]) == 2
    _one_line(capsys, r"no-such-model")
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != "run.lock"} == before
