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
import subprocess
import sys
import time

import torch


def setup(relation: str, data_dir: str, batch: int):
    from ptuning.config import load_config
    from ptuning.data import find_layout, read_relation_infos
    from ptuning.models import load_backbone
    from ptuning.tasks import prepare_task, read_relation
    from ptuning.trainer import Trainer
    from ptuning.vocab import build_answer_vocab

    cfg = load_config(None, ["train.lr=1e-3", f"train.batch_size={batch}", "prompt.template=[3,3,0]",
                             "data.max_dev=200"])
    backbone = load_backbone(cfg.model)
    layout = find_layout(data_dir)
    vocab = build_answer_vocab(backbone.tokenizer, backbone.vocab_size, "shared", layout, "bert-base-cased")
    task = prepare_task(read_relation_infos(layout)[relation], read_relation(layout, relation), vocab, cfg.data)
    return cfg, backbone, vocab, task, Trainer(backbone, cfg, vocab.allowed)


WARMUP = 3  # steps run but not timed (first-call allocations), the same for both variants


def timed_steps(plan: list[list[int]], step) -> float:
    for picked in plan[:WARMUP]:
        step(picked)
    start = time.perf_counter()
    for picked in plan[WARMUP:]:
        step(picked)
    return time.perf_counter() - start


def batches(n_train: int, batch: int, steps: int) -> list[list[int]]:
    """The same example order for both variants: seeded shuffles, epoch after epoch."""
    generator = torch.Generator().manual_seed(0)
    order: list[int] = []
    while len(order) < steps * batch:
        order += torch.randperm(n_train, generator=generator).tolist()
    return [order[i * batch:(i + 1) * batch] for i in range(steps)]


def run_ours(relation: str, data_dir: str, batch: int, steps: int) -> dict:
    cfg, backbone, vocab, task, trainer = setup(relation, data_dir, batch)
    run = trainer._new_run(task)
    def step(picked: list[int]) -> None:
        run.order, run.cursor = picked, 0
        trainer._step([run])

    seconds = timed_steps(batches(len(run.rows["train"]), batch, steps), step)
    dev = trainer.evaluate([(run.encoder, run.rows["dev"])])[0]
    return {"seconds": seconds, "dev_p@1": dev["p@1"], "n_dev": dev["n"]}


def run_peft(relation: str, data_dir: str, batch: int, steps: int) -> dict:
    from peft import PromptEncoderConfig, TaskType, get_peft_model

    from ptuning.metrics import restricted_ranks, summarize_ranks
    from ptuning.vocab import encode_in_context

    cfg, backbone, vocab, task, _ = setup(relation, data_dir, batch)
    tokenizer = backbone.tokenizer
    model = get_peft_model(backbone.model, PromptEncoderConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=6, encoder_hidden_size=backbone.hidden_size,
        encoder_reparameterization_type="LSTM"))
    model.base_model.eval()  # the frozen LM without dropout, as ours
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr,
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

    seconds = timed_steps(batches(len(train), batch, steps), step)
    dev = task.splits["dev"]
    dev_ids = encode_in_context(tokenizer, [e.subject for e in dev])
    ranks = []
    with torch.no_grad():
        for s in range(0, len(dev), 64):
            chunk = dev_ids[s:s + 64]
            inputs = collate(chunk, None)
            logits = model(**inputs).logits
            last = torch.tensor([6 + len(r) - 1 for r in chunk])  # 6 virtual tokens come first
            picked = logits[torch.arange(len(chunk)), last]
            ranks.append(restricted_ranks(picked, torch.tensor([e.label for e in dev[s:s + 64]]), vocab.allowed))
    m = summarize_ranks(torch.cat(ranks))
    return {"seconds": seconds, "dev_p@1": m["p@1"], "n_dev": m["n"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--relation", default="P176")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--data-dir", default=os.environ.get("LAMA_DATA", "../shared/lama"))
    parser.add_argument("--variant", choices=("ours", "peft"), help=argparse.SUPPRESS)  # one child process
    args = parser.parse_args()
    if args.variant:
        fn = run_ours if args.variant == "ours" else run_peft
        result = fn(args.relation, args.data_dir, args.batch, args.steps)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    results = {}
    for variant in ("ours", "peft"):
        proc = subprocess.run([sys.executable, __file__, "--variant", variant, "--relation", args.relation,
                               "--steps", str(args.steps), "--batch", str(args.batch), "--data-dir", args.data_dir],
                              capture_output=True, text=True, check=True)
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    facts = (args.steps - WARMUP) * args.batch
    print(f"SmolLM2-135M, relation {args.relation}, {args.steps} steps x batch {args.batch}, 6 virtual tokens, "
          f"Adam lr 1e-3, threads {torch.get_num_threads()}")
    for name, r in results.items():
        print(f"  {name:5s} {facts / r['seconds']:6.1f} train facts/s   dev P@1 {r['dev_p@1']:.3f} "
              f"({r['n_dev']} facts)   peak RSS {r['peak_rss_mb']:.0f} MB")
    speed = (facts / results["ours"]["seconds"]) / (facts / results["peft"]["seconds"])
    print(f"ours / PEFT training throughput = {speed:.2f}x; dev P@1 {results['ours']['dev_p@1']:.3f} vs "
          f"{results['peft']['dev_p@1']:.3f}")


if __name__ == "__main__":
    main()
