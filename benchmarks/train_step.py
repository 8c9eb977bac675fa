"""Step overhead, side by side on the same batch: one P-tuning training step against the raw frozen model's
forward+backward to its input embeddings, and our evaluation against a plain forward.

    python benchmarks/train_step.py [--model smollm2-135m] [--batch 8] [--reps 20] [--data-dir ../shared/lama]

The raw baselines are what any P-tuning implementation must at least do: `model(inputs_embeds=...)` with all
logits (as Hugging Face PEFT runs it), then a loss at the object position and backward to the embeddings.
Timings are medians over --reps after warm-up, interleaved so drift hits all variants alike.

Efficiency against the limit: the step's model FLOP/s (forward over every token, the head at the targets only,
backward to the inputs only, as the frozen LM needs: about twice the forward's matrix products) as a fraction of
this machine's matrix-multiply rate measured in the same run, at a large square product and at the model's own
shapes, for float32 weights and, where the CPU has bf16 matrix units (AMX), for bf16 weights.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from common import trainer_and_tasks
from ptuning.train.batching import collate
from ptuning.config import load_config
from ptuning.data.lama import resolve_data_dir


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def with_setting(fn, owner: object, name: str, value):
    """fn run with owner.name set to value, restored afterwards."""
    def call() -> None:
        default = getattr(owner, name)
        setattr(owner, name, value)
        try:
            fn()
        finally:
            setattr(owner, name, default)
    return call


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
    trainer, (task,) = trainer_and_tasks(cfg, resolve_data_dir(args.data_dir, None), [args.relation])
    backbone = trainer.backbone
    run, = trainer.prepare([task])
    rows = run.rows["train"][: args.batch]

    # The raw baselines: one padded fact per row, prompt slots filled once.
    batch = collate(rows, [0] * len(rows), [0], backbone.pad_id, backbone.padding_side, 0, backbone.device)
    with torch.no_grad():
        fixed = backbone.embed(batch.ids)
    kwargs = backbone.forward_kwargs(batch.layout)
    positions, targets = batch.layout.target_row, batch.layout.target_col

    def ptuning_step() -> None:
        trainer.step([run])
        run.cursor = 0  # stay on the same batch

    def raw_forward_backward() -> None:
        embeds = fixed.clone().requires_grad_(True)
        logits = backbone.model(inputs_embeds=embeds, **kwargs).logits[positions, targets]
        F.cross_entropy(logits.float(), batch.labels).backward()

    def ours_eval() -> None:
        with torch.no_grad():
            trainer.forward.ranks([(trainer.forward.vectors([run])[0], rows)])

    def raw_forward() -> None:
        with torch.no_grad():
            backbone.model(inputs_embeds=fixed, **kwargs).logits

    padded = (trainer.cfg.train, "row_tokens", 0)  # one fact per padded row, as the raw baselines
    bf16 = (backbone, "bf16", True)  # the bf16-autocast lever (model.bf16)
    variants = {"ptuning_step": ptuning_step, "ptuning_step_padded": with_setting(ptuning_step, *padded),
                "raw_fwd_bwd": raw_forward_backward, "our_eval": ours_eval,
                "our_eval_padded": with_setting(ours_eval, *padded), "raw_forward": raw_forward,
                "ptuning_step_bf16": with_setting(ptuning_step, *bf16), "our_eval_bf16": with_setting(ours_eval, *bf16),
                "ptuning_step_bf16_padded": with_setting(with_setting(ptuning_step, *bf16), *padded),
                "our_eval_bf16_padded": with_setting(with_setting(ours_eval, *bf16), *padded)}
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
    efficiency(args, trainer, run, rows, median["ptuning_step"])
    print(f"bf16 autocast lever: train step {median['ptuning_step_bf16'] / median['ptuning_step']:.2f}x the fp32 "
          f"time, evaluation {median['our_eval_bf16'] / median['our_eval']:.2f}x; on one padded fact per row "
          f"{median['ptuning_step_bf16_padded'] / median['ptuning_step_padded']:.2f}x and "
          f"{median['our_eval_bf16_padded'] / median['our_eval_padded']:.2f}x")


def step_flops(backbone, rows) -> float:
    """Matrix-product FLOPs of one step: 2 x parameters x tokens forward (the body), the LM head at the targets,
    and the same again backward to the inputs (no weight gradients: the LM is frozen)."""
    model = backbone.model
    head = model.get_output_embeddings().weight
    body = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    if head.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        body -= head.numel()
    tokens = sum(len(r.ids) for r in rows)
    forward = 2 * body * tokens + 2 * head.numel() * len(rows)
    return 2 * forward


def matmul_rate(dtype: torch.dtype, m: int, k: int, n: int, reps: int = 10) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * m * k * n * reps / (time.perf_counter() - start)


def efficiency(args, trainer, run, rows, step_seconds: float) -> None:
    """The step's FLOP/s against matrix-multiply rates, float32 and (with AMX) bf16 weights."""
    config = trainer.backbone.model.config
    hidden, ffn = config.hidden_size, getattr(config, "intermediate_size", 4 * config.hidden_size)
    tokens = sum(len(r.ids) for r in rows)
    flops = step_flops(trainer.backbone, rows)
    dtypes = [torch.float32] + ([torch.bfloat16] if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
                                else [])
    print(f"efficiency: {flops / 1e9:.1f} GFLOP a step ({len(rows)} facts, {tokens} tokens)")
    for dtype in dtypes:
        seconds = step_seconds
        if dtype is torch.bfloat16:  # the same step with bf16 weights (model.dtype bfloat16)
            cfg = load_config(None, [f"model.name={args.model}", f"train.batch_size={args.batch}",
                                     "prompt.template=[3,3,0]", "model.dtype=bfloat16"])
            other, (task,) = trainer_and_tasks(cfg, resolve_data_dir(args.data_dir, None), [args.relation])
            bf16_run, = other.prepare([task])

            def step() -> None:
                other.step([bf16_run])
                bf16_run.cursor = 0
            for _ in range(3):
                step()
            seconds = statistics.median([timed(step) for _ in range(args.reps)])
        square = matmul_rate(dtype, 2048, 2048, 2048)
        shaped = matmul_rate(dtype, tokens, hidden, ffn)
        rate = flops / seconds
        print(f"  {str(dtype).split('.')[-1]:8s} step {1000 * seconds:7.1f} ms = {rate / 1e9:6.1f} GFLOP/s; matmul "
              f"2048^3 {square / 1e9:6.1f} GFLOP/s ({rate / square:.0%} of it), at the model's shape "
              f"{tokens}x{hidden}x{ffn} {shaped / 1e9:6.1f} GFLOP/s ({rate / shaped:.0%})")


if __name__ == "__main__":
    main()
