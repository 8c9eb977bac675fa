"""Integrity on a shared cluster: outputs with the mode the umask gives, renames made durable, a full disk or a
read-only file system as one line that says what is safe (and the same command resuming to the same results),
an output folder that cannot be one refused before anything loads, and sweeps that would count a unit twice
refused.

The full disk is a real one: a 400 KB tmpfs (the kernel's own ENOSPC, at whichever write it falls on), mounted by
the test as root. Where mounting is not allowed, the same run gets its ENOSPC from a patched rename of the first
prompt file instead (the error the kernel would raise, at one chosen write); the test says which it used.
"""
from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
import torch

from launcher.run import main
from ptuning.config import ConfigError, config_from_dict
from ptuning.files import file_mode
from ptuning.output.store import RunStore
from ptuning.train import checkpoint

RELATIONS = "P1376,P36,P37"


def run_args(model, lama, out, *extra) -> list[str]:
    return ["--set", f"model.name={model}", "--relations", RELATIONS, "--data-dir", str(lama), "--out", str(out),
            "--set", "data.max_train=20", "--set", "data.max_dev=8", "--set", "data.max_test=16", "--set",
            "train.max_epochs=2", "--set", "train.lr=0.01", "--set", "train.pack_units=1", "--set",
            "output.checkpoint_minutes=0", "--set", "logging.wandb=false", "--set", "logging.progress=off", *extra]


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def mount(path: Path, *options: str) -> bool:
    """A small tmpfs at path (root only); False where this machine does not allow it."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)],
                          capture_output=True)
    return done.returncode == 0


def unmount(path: Path) -> None:
    subprocess.run(["umount", "--lazy", str(path)], capture_output=True)  # the run.lock may still be open here


def figures(out: Path) -> dict:
    return {r: (v["test_p@1"], v["test_mrr"], v["dev_history"])
            for r, v in json.loads((out / "results.json").read_text())["relations"].items()}


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_file_and_folder_gets_the_mode_the_umask_gives(umask, tiny_gpt2, lama, tmp_path):
    previous = os.umask(umask)
    try:
        assert main(run_args(tiny_gpt2, lama, tmp_path / "out")) == 0
        checkpoint.write(RunStore(tmp_path / "out").checkpoint_path("P36"), {"epoch": 1})  # the same way
    finally:
        os.umask(previous)
    paths = [p for p in (tmp_path / "out").rglob("*")]
    assert len([p for p in paths if p.is_file()]) >= 20
    for path in paths:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o777 & ~umask if path.is_dir() else 0o666 & ~umask), (path, oct(mode))


def test_a_rename_is_made_durable_by_syncing_its_folder(tmp_path, monkeypatch):
    import ptuning.files as files

    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", recording_fsync)
    store = RunStore(tmp_path)
    store.write_result("P36", {"status": "done"})
    checkpoint.write(store.checkpoint_path("P36"), {"epoch": 1})
    store.save_prompt("P36", {"w": torch.ones(2)}, torch.ones(2, 2), {})
    folder = str(store.unit_dir("P36"))
    for name in ("result.json", "checkpoint.pt", "prompt_encoder.safetensors", "prompt_vectors.safetensors"):
        # the temporary file is synced, renamed, then the folder: the entry after the file's is the folder
        index = next(i for i, p in enumerate(synced) if Path(p).name.startswith(f".{name}."))
        assert synced[index + 1] == folder, (name, synced)


def test_a_full_disk_is_one_line_the_finished_units_stay_and_the_same_command_resumes(tiny_gpt2, lama, tmp_path,
                                                                                     capsys, monkeypatch):
    reference = tmp_path / "reference"
    assert main(run_args(tiny_gpt2, lama, reference)) == 0
    disk = tmp_path / "disk"
    out = disk / "out"
    real_disk = mount(disk, "size=400k")
    try:
        if not real_disk:  # no mount here: the kernel's ENOSPC, raised at the first prompt file's rename
            import ptuning.files as files

            real_replace = os.replace

            def full(src, dst):
                if Path(dst).name == "prompt_encoder.safetensors" and "P36" in str(dst):
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real_replace(src, dst)

            monkeypatch.setattr(files.os, "replace", full)
        capsys.readouterr()
        assert main(run_args(tiny_gpt2, lama, out)) == 2
        err = one_line(capsys)
        assert ": no space left on device; every file here is written whole or not at all, so what is on disk " \
               "stays readable; finished units are kept and the same command resumes" in err, err
        assert (RunStore(out).result("P1376") or {}).get("status") == "done"  # finished before the disk filled
        for path in out.rglob("*"):
            assert not path.name.startswith("."), path  # no temporary file left behind
            if path.suffix == ".json":
                json.loads(path.read_text())  # every file there reads back whole
        if real_disk:
            subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        else:
            monkeypatch.undo()
        assert main(run_args(tiny_gpt2, lama, out)) == 0
        assert figures(out) == figures(reference)
    finally:
        if real_disk:
            unmount(disk)


def test_a_read_only_file_system_is_one_line(tiny_gpt2, lama, tmp_path, capsys):
    disk = tmp_path / "ro"
    if not mount(disk, "ro", "size=64k"):
        pytest.skip("this machine does not allow mounting a read-only tmpfs (not root)")
    try:
        assert main(run_args(tiny_gpt2, lama, disk)) == 2
        assert one_line(capsys).startswith(f"error: {disk}/run.lock: read-only file system;")
    finally:
        unmount(disk)


@pytest.mark.parametrize("where, says", [
    ("a file", "exists and is not a folder; choose another output.dir"),
    ("below a file", "cannot make the output folder (a part of the path is a file, not a folder); choose another "
                     "output.dir"),
])
def test_an_output_folder_that_cannot_be_one_is_refused_before_anything_loads(where, says, lama, tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    out = tmp_path / "taken" if where == "a file" else tmp_path / "taken" / "out"
    # a model that does not exist: the folder's error comes first, before any model is looked for
    assert main(["--set", "model.name=/nowhere/model", "--relations", "P36", "--data-dir", str(lama), "--out",
                 str(out)]) == 2
    assert one_line(capsys) == f"error: {out}: {says}"


@pytest.mark.parametrize("sweep, says", [
    ({"variants": [{"train.seed": 34}, {}]}, "variants 'seed=34' and 'base' resolve to the same settings"),
    ({"variants": [{"train.lr": 1e-5}, {"train.weight_decay": 5e-4}]},
     "variants 'lr=1e-05' and 'weight_decay=0.0005' resolve to the same settings"),
    ({"variants": [{"prompt.init": "random"}], "grid": {"train.seed": [35, 35.0]}}, "appears twice"),
])
def test_variants_that_would_train_one_unit_twice_are_refused_by_name(sweep, says):
    with pytest.raises(ConfigError, match=says.replace("(", r"\(").replace(")", r"\)")):
        config_from_dict({"sweep": sweep})


def test_the_mode_follows_the_umask_of_the_moment():
    previous = os.umask(0o077)
    try:
        assert file_mode() == 0o600
    finally:
        os.umask(previous)
    assert file_mode() == 0o666 & ~previous
