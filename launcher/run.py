"""Entry point, the same under every launcher:

    python launcher/run.py --config C                         one process
    torchrun --nproc_per_node N launcher/run.py --config C    N ranks (gloo on CPU, nccl on GPU)
    deepspeed --num_gpus N launcher/run.py --config C         N ranks through the DeepSpeed launcher

Bad input (config, data, model) ends with a one-line error and exit status 2; a rank that fails while training
ends with exit status 1 and a message naming the rank and the relation(s); SIGTERM or SIGUSR1 (a SLURM time
limit, a preemption) checkpoints the relations under way and ends with exit status 143. Finished relations stay on
disk and a restart resumes.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from launcher.distributed import init_parallel, shutdown
from ptuning.config import ExperimentConfig, load_config
from ptuning.data.lama import resolve_data_dir
from ptuning.experiment import USER_ERRORS, RelationFailure, Stopped, run_experiment
STOPPED = 143  # 128 + SIGTERM: stopped on request, relations checkpointed; the same command resumes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="P-tuning on the LAMA knowledge probe.")
    parser.add_argument("--config", help="JSON experiment config (sections model, data, prompt, train, output, "
                                         "logging, parallel, deepspeed); defaults when omitted")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config key; repeatable")
    parser.add_argument("--sweep", action="append", default=[], metavar="SECTION.KEY=V1,V2",
                        help="train every relation under each value (an axis of the sweep's grid, e.g. "
                             "train.seed=34,35,36); repeatable: every combination")
    parser.add_argument("--relations", help="comma-separated relation ids, e.g. P19,P1001 (default: the config's)")
    parser.add_argument("--data-dir", help="LAMA folder holding fact-retrieval/ (default: data.data_dir, "
                                           "$LAMA_DATA, ./data)")
    parser.add_argument("--out", help="output folder (same as --set output.dir=...)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher
    parser.add_argument("--control", choices=["random-lm"],
                        help="a probing control: random-lm P-tunes the same architecture with freshly initialised, "
                             "seeded weights (same as --set model.control=random-lm)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--only-evaluate", action="store_true",
                      help="evaluate the prompt encoders saved in the output folder; no training")
    mode.add_argument("--manual-baseline", action="store_true",
                      help="evaluate the manual LAMA prompts only; no training")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """The config file with --set, --relations and --out applied."""
    overrides = list(args.overrides)
    if args.relations:
        overrides.append(f"data.relations={args.relations}")
    if args.out:
        overrides.append(f"output.dir={args.out}")
    if args.control:
        overrides.append(f"model.control={args.control}")
    return load_config(args.config, overrides, args.sweep)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = "evaluate" if args.only_evaluate else "manual" if args.manual_baseline else "train"
    try:
        cfg = config_from_args(args)
        parallel = init_parallel(cfg.parallel.tensor_parallel,
                                 solo_groups=cfg.deepspeed is not None and cfg.train.tunes_lm,
                                 device=cfg.model.device)
        payload = run_experiment(cfg, resolve_data_dir(args.data_dir, cfg.data.data_dir), mode, parallel)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RelationFailure as error:
        traceback.print_exception(error.__cause__, file=sys.stderr)
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Stopped as error:
        print(f"stopped: {error}", file=sys.stderr)
        return STOPPED
    finally:
        shutdown()
    if payload is not None:
        from ptuning.output.markdown import render_markdown

        print(render_markdown(payload))
        print(f"results: {cfg.output.dir}/results.json, {cfg.output.dir}/results.md")
        plot = Path(cfg.output.dir) / "p_at_1.png"
        if plot.is_file():
            print(f"plot: {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
