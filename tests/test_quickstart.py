"""The quick start on a fresh machine: its facts ship in data/quickstart, the runner falls back to them when no
LAMA folder is found (and says so), they give the full set's figures, and a run that needs more is refused with
the fetch command named."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ptuning.config import load_config
from ptuning.data.lama import QUICKSTART, DataError, find_layout, select_relations
from ptuning.experiment import run_experiment
from tests.conftest import REPO
from tests.ranks import start

# the quick start's config at a budget for a test: its caps lowered, one epoch
SMALL = ["--set", "data.max_train=16", "--set", "data.max_dev=8", "--set", "data.max_test=24", "--set",
         "train.max_epochs=1", "--set", "logging.wandb=false", "--set", "logging.progress=lines"]


def clone(tmp_path: Path) -> Path:
    """The repository's files (as git tracks them, in their working-tree state; every file but the ignored ones
    outside a git checkout) in a folder with nothing beside it."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True)
    if listed.returncode == 0:
        names = [n for n in listed.stdout.decode().split("\0") if n]
    else:
        skip = {".git", ".venv", "runs", "__pycache__", ".pytest_cache"}
        names = [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file()
                 and not skip & set(p.relative_to(REPO).parts) and not str(p.relative_to(REPO)).startswith("data/lama")]
    target = tmp_path / "clone"
    for name in names:
        if (REPO / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes((REPO / name).read_bytes())
    return target


def figures(out: Path) -> dict:
    results = json.loads((out / "results.json").read_text())
    return {rid: (r["manual_p@1"], r["test_p@1"], r["dev_history"]) for rid, r in results["relations"].items()}


@pytest.mark.slow
def test_the_quick_start_runs_from_a_clone_with_nothing_beside_it_and_gives_the_full_sets_figures(lama, tmp_path):
    repo = clone(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "LAMA_DATA"}
    env.update(PYTHONPATH=str(repo), OMP_NUM_THREADS="1")  # one thread each: the two runs go side by side
    shipped = subprocess.Popen([sys.executable, "launcher/run.py", "--config", "configs/quickstart.json", "--out",
                                str(tmp_path / "shipped"), *SMALL], cwd=repo, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    # the same quick start on the full data set (this checkout, forked from the tests' warm process)
    full = start(0, REPO / "launcher" / "run.py", "--config", REPO / "configs" / "quickstart.json", "--out",
                 tmp_path / "full", "--data-dir", lama, *SMALL, env={"OMP_NUM_THREADS": "1"})
    stdout, stderr = shipped.communicate(timeout=600)
    full.wait()
    assert shipped.returncode == 0, stderr[-3000:]
    assert f"data: {repo / 'data' / 'quickstart'}: the quick start's shipped subset" in stderr
    assert "| **macro average** | 5 relations |" in stdout
    assert figures(tmp_path / "shipped") == figures(tmp_path / "full")


def test_the_shipped_subset_is_small_and_checks_out():
    sums = (QUICKSTART / "SHA256SUMS").read_text().splitlines()
    import hashlib

    for line in sums:
        digest, name = line.split("  ", 1)
        assert hashlib.sha256((QUICKSTART / name).read_bytes()).hexdigest() == digest, name
    assert sum(p.stat().st_size for p in QUICKSTART.rglob("*") if p.is_file()) < 1_000_000
    layout = find_layout(QUICKSTART)
    quick = load_config(REPO / "configs" / "quickstart.json")
    assert select_relations(layout, None) == sorted(quick.data.relations)
    assert layout.subset["facts"] == {"train": quick.data.max_train, "dev": quick.data.max_dev,
                                      "test": quick.data.max_test}


@pytest.mark.parametrize("override, says", [
    ("data.relations=P36", "unknown relation id(s) P36"),
    ("data.max_train=500", "holds the first 160 train facts of each relation"),
])
def test_a_run_that_needs_more_than_the_subset_is_refused_naming_the_fetch(override, says, tmp_path):
    cfg = load_config(REPO / "configs" / "quickstart.json", [override, f"output.dir={tmp_path}"])
    with pytest.raises(DataError) as error:
        run_experiment(cfg, QUICKSTART)  # refused before the model loads
    assert says in str(error.value) and "python -m ptuning.data fetch" in str(error.value)
    assert not (tmp_path / "results.json").exists()
