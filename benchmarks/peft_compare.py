"""Against Hugging Face PEFT's P-tuning (PromptEncoderConfig, LSTM reparameterisation), same model, same number of
virtual tokens, same batch, same optimizer, same steps and the same examples in the same order: training
examples per second, dev P@1 after those steps (answers restricted to the same vocabulary), and peak memory.

    pip install -r benchmarks/requirements.txt
    python benchmarks/peft_compare.py [--relation P176] [--steps 100] [--data-dir ../shared/lama]

PEFT places its virtual tokens before the input (6, subject); ours uses the paper's (3, subject, 3). Each variant
runs in its own process, so the peak RSS it reports is its own.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch


def setup(relation: str, data_dir: str, batch: int, seed: int):
    from common import trainer_and_tasks
    from ptuning.config import load_config

    cfg = load_config(None, ["train.lr=1e-3", f"train.batch_size={batch}", "prompt.template=[3,3,0]",
                             "data.max_dev=200", f"train.seed={seed}"])
    trainer, (task,) = trainer_and_tasks(cfg, data_dir, [relation])
    return trainer, task


WARMUP = 3  # steps run but not timed (first-call allocations), the same for both variants


def timed_steps(plan: list[list[int]], step) -> float:
    for picked in plan[:WARMUP]:
        step(picked)
    start = time.perf_counter()
    for picked in plan[WARMUP:]:
        step(picked)
    return time.perf_counter() - start


def batches(n_train: int, batch: int, steps: int, seed: int) -> list[list[int]]:
    """The same example order for both variants: seeded shuffles, epoch after epoch."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch:
        order += torch.randperm(n_train, generator=generator).tolist()
    return [order[i * batch:(i + 1) * batch] for i in range(steps)]


def run_ours(relation: str, data_dir: str, batch: int, steps: int, seed: int) -> dict:
    trainer, task = setup(relation, data_dir, batch, seed)
    run, = trainer.prepare([task])
    def step(picked: list[int]) -> None:
        run.order, run.cursor = picked, 0
        trainer.step([run])

    seconds = timed_steps(batches(len(run.rows["train"]), batch, steps, seed), step)
    dev, test = (trainer.forward.evaluate_runs([run], split)[0] for split in ("dev", "test"))
    return {"seconds": seconds, "dev_p@1": dev["p@1"], "n_dev": dev["n"], "test_p@1": test["p@1"], "n_test": test["n"]}


def run_peft(relation: str, data_dir: str, batch: int, steps: int, seed: int) -> dict:
    from peft import PromptEncoderConfig, TaskType, get_peft_model

    from ptuning.model.metrics import restricted_ranks, summarize_ranks
    from ptuning.data.vocab import encode_in_context

    trainer, task = setup(relation, data_dir, batch, seed)
    cfg, backbone = trainer.cfg, trainer.backbone
    tokenizer = backbone.tokenizer
    torch.manual_seed(seed)  # PEFT's prompt encoder initialisation
    model = get_peft_model(backbone.model, PromptEncoderConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=6, encoder_hidden_size=backbone.hidden_size,
        encoder_reparameterization_type="LSTM"))
    model.base_model.eval()  # the frozen LM without dropout, as ours
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr, fused=True,
                                 weight_decay=cfg.train.weight_decay)
    train = task.splits["train"]
    subjects = encode_in_context(tokenizer, [e.subject for e in train])
    pad = tokenizer.pad_token_id

    def collate(ids_list: list[list[int]], labels: list[int] | None):
        length = max(len(i) for i in ids_list) + (1 if labels is not None else 0)
        ids, mask, targets = [], [], []
        for k, row in enumerate(ids_list):
            seq = row + ([labels[k]] if labels is not None else [])
            ids.append(seq + [pad] * (length - len(seq)))
            mask.append([1] * len(seq) + [0] * (length - len(seq)))
            targets.append([-100] * len(row) + [labels[k]] + [-100] * (length - len(seq))
                           if labels is not None else None)
        out = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
        if labels is not None:
            out["labels"] = torch.tensor(targets)
        return out

    def step(picked: list[int]) -> None:
        inputs = collate([subjects[i] for i in picked], [train[i].label for i in picked])
        loss = model(**inputs).loss  # PEFT shifts the labels: the last subject position predicts the object
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed_steps(batches(len(train), batch, steps, seed), step)

    def p_at_1(facts) -> dict:
        ids = encode_in_context(tokenizer, [e.subject for e in facts])
        ranks = []
        with torch.no_grad():
            for s in range(0, len(facts), 64):
                chunk = ids[s:s + 64]
                logits = model(**collate(chunk, None)).logits
                last = torch.tensor([6 + len(r) - 1 for r in chunk])  # 6 virtual tokens come first
                picked = logits[torch.arange(len(chunk)), last]
                ranks.append(restricted_ranks(picked, torch.tensor([e.label for e in facts[s:s + 64]]),
                                              trainer.forward.allowed))
        return summarize_ranks(torch.cat(ranks))

    dev, test = p_at_1(task.splits["dev"]), p_at_1(task.splits["test"])
    return {"seconds": seconds, "dev_p@1": dev["p@1"], "n_dev": dev["n"], "test_p@1": test["p@1"], "n_test": test["n"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--relation", default="P176")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--data-dir", default=os.environ.get("LAMA_DATA", "../shared/lama"))
    parser.add_argument("--seeds", type=int, default=3, help="runs per variant (seeds 0..N-1: order and init)")
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=("ours", "peft"), help=argparse.SUPPRESS)  # one child process
    args = parser.parse_args()
    if args.variant:
        fn = run_ours if args.variant == "ours" else run_peft
        result = fn(args.relation, args.data_dir, args.batch, args.steps, args.seed)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    results = {"ours": [], "peft": []}
    for seed in range(args.seeds):
        for variant in results:
            proc = subprocess.run([sys.executable, __file__, "--variant", variant, "--seed", str(seed), "--relation",
                                   args.relation, "--steps", str(args.steps), "--batch", str(args.batch),
                                   "--data-dir", args.data_dir], capture_output=True, text=True, check=True)
            results[variant].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    facts = (args.steps - WARMUP) * args.batch
    first = results["ours"][0]
    print(f"SmolLM2-135M, relation {args.relation}, {args.steps} steps x batch {args.batch}, 6 virtual tokens, "
          f"Adam lr 1e-3, {args.seeds} seeds, dev {first['n_dev']} / test {first['n_test']} facts, "
          f"threads {torch.get_num_threads()}")
    mean = {}
    for name, runs in results.items():
        mean[name] = {k: statistics.mean(r[k] for r in runs) for k in ("dev_p@1", "test_p@1")}
        mean[name]["facts/s"] = statistics.mean(facts / r["seconds"] for r in runs)
        seeds = ", ".join(f"{r['dev_p@1']:.3f}/{r['test_p@1']:.3f}" for r in runs)
        print(f"  {name:5s} {mean[name]['facts/s']:6.1f} train facts/s   dev P@1 {mean[name]['dev_p@1']:.3f}   "
              f"test P@1 {mean[name]['test_p@1']:.3f}   (dev/test by seed: {seeds})   peak RSS "
              f"{max(r['peak_rss_mb'] for r in runs):.0f} MB")
    print(f"ours / PEFT training throughput = {mean['ours']['facts/s'] / mean['peft']['facts/s']:.2f}x; mean dev P@1 "
          f"{mean['ours']['dev_p@1']:.3f} vs {mean['peft']['dev_p@1']:.3f}, test P@1 {mean['ours']['test_p@1']:.3f} vs "
          f"{mean['peft']['test_p@1']:.3f}")


if __name__ == "__main__":
    main()
