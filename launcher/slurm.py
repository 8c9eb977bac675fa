"""Submit a sweep to SLURM: write an sbatch script, submit it, say where the logs and results go.

    python launcher/slurm.py --config C --nodes N --gpus-per-node G [--partition P --time T --account A]
                             [--launcher torchrun|deepspeed] [--array K] [--dry-run] [any launcher/run.py option]

- torchrun (default): srun starts one torchrun per node, with a c10d rendezvous on the first node.
- deepspeed: a hostfile is written from the job's nodes and srun starts the deepspeed launcher on each node
  (--no_ssh, node rank from SLURM).
- Preemption: the job asks for SIGUSR1 --signal-seconds before its time limit; the script then stops the ranks
  and requeues itself. Every relation keeps an epoch checkpoint, so the requeued job resumes where it was
  (at most one epoch per relation is redone) and skips finished relations.
- --array K: one array task per group of relations (balanced by training facts), each with its own output
  folder <out>/group-<i>; `python launcher/slurm.py --collect <out>` merges them into <out>/results.json.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from launcher.run import USER_ERRORS, config_from_args
from launcher.run import parse_args as parse_run_args
from ptuning.data import find_layout, read_facts, resolve_data_dir, select_relations
from ptuning.parallel import balance
from ptuning.results import atomic_write_text, averages, render_markdown

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Other options go to launcher/run.py unchanged.")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=0)
    parser.add_argument("--procs-per-node", type=int, help="ranks per node (default: --gpus-per-node, or 1)")
    parser.add_argument("--cpus-per-task", type=int, help="CPU cores per node's task")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--time", help="time limit, e.g. 12:00:00")
    parser.add_argument("--job-name", default="ptuning-lama")
    parser.add_argument("--launcher", choices=("torchrun", "deepspeed"), default="torchrun")
    parser.add_argument("--array", type=int, metavar="K", help="one array task per group of relations")
    parser.add_argument("--signal-seconds", type=int, default=300,
                        help="ask for SIGUSR1 this long before the time limit, to requeue (default 300)")
    parser.add_argument("--port", type=int,
                        help="rendezvous port on the first node (default: from the job id, so jobs sharing a node "
                             "do not collide)")
    parser.add_argument("--dry-run", action="store_true", help="write the script, do not submit it")
    parser.add_argument("--collect", metavar="OUT", help="merge an array sweep's group folders, then exit")
    return parser.parse_known_args(argv)


def relation_groups(run_args: argparse.Namespace, k: int) -> list[list[str]]:
    """K groups of relations balanced by training facts (the work), read from the data without the model."""
    cfg = config_from_args(run_args)
    layout = find_layout(resolve_data_dir(run_args.data_dir, cfg.data.data_dir))
    cap = cfg.data.max_train or sys.maxsize
    weights = {r: min(cap, len(read_facts(layout, r, "train"))) for r in select_relations(layout, cfg.data.relations)}
    return [g for g in balance(weights, k) if g]


def render_script(opts: argparse.Namespace, run_argv: list[str], out_dir: Path,
                  groups: list[list[str]] | None) -> str:
    procs = opts.procs_per_node or opts.gpus_per_node or 1
    log = out_dir / "slurm" / ("%A_%a.out" if groups else "%j.out")
    lines = ["#!/bin/bash", f"#SBATCH --job-name={opts.job_name}", f"#SBATCH --nodes={opts.nodes}",
             "#SBATCH --ntasks-per-node=1", f"#SBATCH --output={log}", "#SBATCH --open-mode=append",
             "#SBATCH --requeue", f"#SBATCH --signal=B:USR1@{opts.signal_seconds}"]
    for flag, value in (("gpus-per-node", opts.gpus_per_node or None), ("cpus-per-task", opts.cpus_per_task),
                        ("partition", opts.partition), ("account", opts.account), ("time", opts.time)):
        if value:
            lines.append(f"#SBATCH --{flag}={value}")
    if groups:
        lines.append(f"#SBATCH --array=0-{len(groups) - 1}")
    lines += [
        "# Written by launcher/slurm.py.",
        "set -uo pipefail",
        f"cd {shlex.quote(str(Path.cwd()))}",
        f"RUN=({shlex.join([str(REPO / 'launcher' / 'run.py')] + run_argv)})",
    ]
    if groups:
        lines += [f"RELATION_GROUPS=({' '.join(shlex.quote(','.join(g)) for g in groups)})",
                  'RUN+=(--relations "${RELATION_GROUPS[$SLURM_ARRAY_TASK_ID]}" '
                  f'--out {shlex.quote(str(out_dir))}/group-$SLURM_ARRAY_TASK_ID)']
    port = opts.port or "$((20000 + SLURM_JOB_ID % 20000))"
    lines += ['export HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
              f"export PORT={port}",
              'echo "[ptuning-lama] job $SLURM_JOB_ID on $SLURM_JOB_NODELIST, restart ${SLURM_RESTART_COUNT:-0}"']
    bin_dir = Path(sys.executable).parent
    if opts.launcher == "torchrun":
        command = (f"{bin_dir / 'torchrun'} --nnodes=$SLURM_NNODES --nproc_per_node={procs} "
                   f"--rdzv_id=$SLURM_JOB_ID --rdzv_backend=c10d --rdzv_endpoint=$HEAD:$PORT \"$@\"")
    else:
        hostfile = out_dir / "slurm" / "hostfile-$SLURM_JOB_ID"
        lines.append(f'scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/$/ slots={procs}/" > {hostfile}')
        command = (f"{bin_dir / 'deepspeed'} --hostfile={hostfile} --no_ssh --node_rank=$SLURM_NODEID "
                   f"--master_addr=$HEAD --master_port=$PORT \"$@\"")
    lines += [
        "requeue() {",
        '  echo "[ptuning-lama] time limit near: stopping the ranks and requeueing; epoch checkpoints are on disk"',
        '  kill -TERM "$CHILD" 2>/dev/null; wait "$CHILD"',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "  exit 0",
        "}",
        "trap requeue USR1",
        # one task per node; SLURM_NODEID and friends expand inside each task, the run's arguments arrive as "$@"
        f'srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c {shlex.quote("exec " + command)} ptuning "${{RUN[@]}}" &',
        "CHILD=$!",
        'wait "$CHILD"',
        "exit $?",
    ]
    return "\n".join(lines) + "\n"


def collect(out_dir: Path) -> dict:
    """Merge <out>/group-*/results.json of an array sweep into <out>/results.json and results.md."""
    parts = sorted(out_dir.glob("group-*/results.json"))
    if not parts:
        raise SystemExit(f"error: {out_dir}: no group-*/results.json to collect")
    payloads = [json.loads(p.read_text()) for p in parts]
    merged = {**payloads[0], "relations": {}}
    for payload in payloads:
        merged["relations"].update(payload["relations"])
    merged.update(averages(merged["relations"]))
    atomic_write_text(out_dir / "results.json", json.dumps(merged, indent=2) + "\n")
    atomic_write_text(out_dir / "results.md", render_markdown(merged))
    return merged


def main(argv: list[str] | None = None) -> int:
    opts, run_argv = parse_args(argv)
    if opts.collect:
        merged = collect(Path(opts.collect))
        print(render_markdown(merged))
        return 0
    run_args = parse_run_args(run_argv)
    try:
        cfg = config_from_args(run_args)
        groups = relation_groups(run_args, opts.array) if opts.array else None
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out_dir = Path(cfg.output.dir).resolve()
    script = out_dir / "slurm" / "ptuning.sbatch"
    atomic_write_text(script, render_script(opts, run_argv, out_dir, groups))
    (out_dir / "slurm").mkdir(parents=True, exist_ok=True)
    print(f"sbatch script: {script}")
    if opts.dry_run:
        return 0
    if shutil.which("sbatch") is None:
        print("error: sbatch not found: run this on a SLURM login node (or use --dry-run)", file=sys.stderr)
        return 2
    proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"error: sbatch failed: {proc.stderr.strip()}", file=sys.stderr)
        return 1
    job = proc.stdout.strip().split(";")[0]
    logs = out_dir / "slurm" / (f"{job}_<task>.out" if groups else f"{job}.out")
    print(f"submitted job {job}\nlogs: {logs}\nresults: {out_dir / 'results.json'}"
          + (f" (after: python launcher/slurm.py --collect {out_dir})" if groups else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
