"""Wall time of one fixed tiny-model sweep with 1 rank and with 2 ranks (torchrun, gloo), side by side.

    python benchmarks/ranks.py [--data-dir ../shared/lama] [--relations 8] [--repeats 2]

The model is a random 4-layer GPT-2 (hidden 128) with SmolLM2's tokenizer, so the data path is the real one.
Both variants use all cores: 1 rank with 2 threads against 2 ranks with 1 thread each. Each wall time includes
process start, model load and the manual baseline, as a user would see it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RELATIONS = ["P1376", "P36", "P37", "P1001", "P108", "P127", "P178", "P463"]


def tiny_model(folder: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    from ptuning.config import ModelConfig
    from ptuning.model.loading import load_backbone

    tokenizer = load_backbone(ModelConfig(name="smollm2-135m")).tokenizer
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=128, n_layer=4, n_head=4, n_positions=128,
                                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sweep(prefix: list[str], threads: int, model: Path, data_dir: str, relations: list[str], out: Path) -> float:
    args = [str(REPO / "launcher" / "run.py"), "--set", f"model.name={model}", "--relations", ",".join(relations),
            "--data-dir", data_dir, "--out", str(out), "--set", "data.max_train=96", "--set", "data.max_dev=48",
            "--set", "data.max_test=96", "--set", "train.max_epochs=4", "--set", "train.lr=0.01",
            "--set", "logging.wandb=false", "--set", "logging.progress=off", "--set", "output.resume=false"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run(prefix + args, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("LAMA_DATA", str(REPO.parent / "shared" / "lama")))
    parser.add_argument("--relations", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    relations = RELATIONS[: args.relations]
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_model(Path(tmp) / "model")
        variants = {"1 rank, 2 threads": ([sys.executable], 2),
                    "2 ranks, 1 thread each": ([str(bin_dir / "torchrun"), "--nproc_per_node", "2"], 1)}
        times = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, (prefix, threads) in variants.items():
                times[name].append(sweep(prefix, threads, model, args.data_dir, relations, Path(tmp) / name[0]))
        one = json.loads((Path(tmp) / "1" / "results.json").read_text())
        two = json.loads((Path(tmp) / "2" / "results.json").read_text())
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"sweep: {len(relations)} relations x 96 training facts, 4 epochs, tiny GPT-2; cores {os.cpu_count()}")
    for name, value in median.items():
        print(f"  {name:24s} {value:6.1f} s  (runs: {', '.join(f'{t:.1f}' for t in times[name])})")
    print(f"1 rank / 2 ranks wall time = {median['1 rank, 2 threads'] / median['2 ranks, 1 thread each']:.2f}x")
    print(f"same figures: {one['macro'] == two['macro']}")


if __name__ == "__main__":
    main()
