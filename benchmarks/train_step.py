"""Step overhead, side by side on the same batch: one P-tuning training step against the raw frozen model's
forward+backward to its input embeddings, and our evaluation against a plain forward.

    python benchmarks/train_step.py [--model smollm2-135m] [--batch 8] [--reps 20] [--data-dir ../shared/lama]

The raw baselines are what any P-tuning implementation must at least do: `model(inputs_embeds=...)` with all
logits (as Hugging Face PEFT runs it), then a loss at the object position and backward to the embeddings.
Timings are medians over --reps after warm-up, interleaved so drift hits all variants alike.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from ptuning.batching import collate
from ptuning.config import load_config
from ptuning.data import find_layout, read_relation_infos, resolve_data_dir
from ptuning.models import load_backbone
from ptuning.tasks import prepare_task, read_relation
from ptuning.trainer import Trainer
from ptuning.vocab import build_answer_vocab


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--relation", default="P19")
    parser.add_argument("--data-dir")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice, the core count)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load_config(None, [f"model.name={args.model}", f"train.batch_size={args.batch}",
                             f"train.eval_batch_size={args.batch}", "prompt.template=[3,3,0]"])
    backbone = load_backbone(cfg.model)
    layout = find_layout(resolve_data_dir(args.data_dir, None))
    vocab = build_answer_vocab(backbone.tokenizer, backbone.vocab_size, "shared", layout, "bert-base-cased")
    task = prepare_task(read_relation_infos(layout)[args.relation], read_relation(layout, args.relation), vocab,
                        cfg.data)
    trainer = Trainer(backbone, cfg, vocab.allowed)
    run = trainer._new_run(task)
    rows = run.rows["train"][: args.batch]

    # The raw baselines: one padded fact per row, prompt slots filled once.
    batch = collate(rows, [0] * len(rows), [0], backbone.pad_id, backbone.padding_side, 0, backbone.device)
    with torch.no_grad():
        fixed = backbone.embed(batch.ids)
    kwargs = backbone._forward_kwargs(batch.layout)
    positions, targets = batch.layout.target_row, batch.layout.target_col

    def ptuning_step() -> None:
        trainer._step([run])
        run.cursor = 0  # stay on the same batch

    def with_row_tokens(fn, row_tokens: int):
        """The same call with facts laid out one per padded row (row_tokens 0), as the raw baselines are."""
        def call() -> None:
            default, trainer.cfg.train.row_tokens = trainer.cfg.train.row_tokens, row_tokens
            try:
                fn()
            finally:
                trainer.cfg.train.row_tokens = default
        return call

    def raw_forward_backward() -> None:
        embeds = fixed.clone().requires_grad_(True)
        logits = backbone.model(inputs_embeds=embeds, **kwargs).logits[positions, targets]
        F.cross_entropy(logits.float(), batch.labels).backward()

    def ours_eval() -> None:
        trainer.ranks([(run.encoder, rows)])

    def raw_forward() -> None:
        with torch.no_grad():
            backbone.model(inputs_embeds=fixed, **kwargs).logits

    def with_bf16(fn):
        """The bf16-autocast lever (model.bf16): the same call with autocast on."""
        def call() -> None:
            backbone.bf16 = True
            try:
                fn()
            finally:
                backbone.bf16 = False
        return call

    variants = {"ptuning_step": ptuning_step, "ptuning_step_padded": with_row_tokens(ptuning_step, 0),
                "raw_fwd_bwd": raw_forward_backward, "our_eval": ours_eval,
                "our_eval_padded": with_row_tokens(ours_eval, 0), "raw_forward": raw_forward,
                "ptuning_step_bf16": with_bf16(ptuning_step), "our_eval_bf16": with_bf16(ours_eval)}
    for fn in variants.values():
        for _ in range(3):
            fn()
    times = {name: [] for name in variants}
    for _ in range(args.reps):
        for name, fn in variants.items():
            times[name].append(timed(fn))
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"model {args.model}, batch {args.batch}, padded sequence length {batch.ids.shape[1]}, "
          f"threads {torch.get_num_threads()}, reps {args.reps}")
    for name, value in median.items():
        print(f"  {name:20s} {1000 * value:8.1f} ms")
    step, evaluation = median["ptuning_step"] / median["raw_fwd_bwd"], median["our_eval"] / median["raw_forward"]
    print(f"train step / raw forward+backward = {step:.3f} (one padded fact per row, as the raw: "
          f"{median['ptuning_step_padded'] / median['raw_fwd_bwd']:.3f}); targets: core <= 1.15, performance <= 1.10")
    print(f"evaluation / raw forward          = {evaluation:.3f} (one padded fact per row: "
          f"{median['our_eval_padded'] / median['raw_forward']:.3f}); targets: core <= 1.10, performance <= 1.05")
    print(f"bf16 autocast lever: train step {median['ptuning_step_bf16'] / median['ptuning_step']:.2f}x the fp32 "
          f"time, evaluation {median['our_eval_bf16'] / median['our_eval']:.2f}x")


if __name__ == "__main__":
    main()
