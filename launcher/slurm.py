"""Submit a sweep to SLURM: write an sbatch script, submit it, say where the logs and results go.

    python launcher/slurm.py --config C --nodes N --gpus-per-node G [--partition P --time T --account A]
                             [--cpus-per-task C --mem M | --exclusive] [--launcher torchrun|deepspeed] [--array K]
                             [--dry-run] [any launcher/run.py option]

- One GPU per rank: --procs-per-node (default: --gpus-per-node) may not exceed --gpus-per-node; --gpus-per-node 0
  runs CPU ranks (model.device=cpu).
- Each node's task asks for CPUS_PER_RANK cores and MEM_PER_RANK_GB GB of memory per rank (--cpus-per-task and
  --mem override them; --exclusive takes whole nodes instead), and each rank gets an equal share of the task's
  cores as OMP_NUM_THREADS.
- torchrun (default): srun starts one torchrun per node, with a c10d rendezvous on the first node.
- deepspeed: srun starts the deepspeed launcher on each node (--no_ssh, node rank from SLURM), with a hostfile of
  the job's nodes and --include naming the GPUs SLURM gave the node (deepspeed_node_command).
- Preemption: the job asks for SIGUSR1 --signal-seconds before its time limit; the script then stops the ranks
  and requeues itself. The ranks take that SIGTERM as a request to stop: each relation under way is
  checkpointed where it stands (mid-epoch), so the requeued job resumes it there and skips finished relations.
- --array K: one array task per group of relations (balanced by training facts), each with its own output
  folder <out>/group-<i>; `python launcher/slurm.py --collect <out>` merges them into <out>/results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from launcher.run import USER_ERRORS, config_from_args
from launcher.run import parse_args as parse_run_args
from ptuning.config import ConfigError
from ptuning.data.lama import find_layout, read_facts, resolve_data_dir, select_relations
from ptuning.parallel.packs import balance
from ptuning.config import config_from_dict
from ptuning.output.coordinator import Coordinator
from ptuning.files import atomic_write_text
from ptuning.output.markdown import render_markdown
from ptuning.output.results import header_of
from ptuning.output.store import RunStore
from ptuning.config.sweep import variants

REPO = Path(__file__).resolve().parents[1]
# Per rank: a GPU rank needs a few cores (its main thread, NCCL and gloo threads, tokenizing) and host memory to
# load its model before moving it to the GPU (gpt2-xl in float32 is 6 GB, a Megatron-11B part under 3 GB); a CPU
# rank computes with its cores. Asking for these instead of nothing keeps a job from being packed onto one core
# beside other jobs; --exclusive is left as a choice because partial-node GPU jobs are the norm on shared clusters.
CPUS_PER_RANK = 4
MEM_PER_RANK_GB = 32


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Other options go to launcher/run.py unchanged.")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=0)
    parser.add_argument("--procs-per-node", type=int, help="ranks per node (default: --gpus-per-node, or 1)")
    parser.add_argument("--cpus-per-task", type=int,
                        help=f"CPU cores of each node's task, for all its ranks (default: {CPUS_PER_RANK} per rank)")
    parser.add_argument("--mem", help=f"memory per node, in SLURM's syntax, e.g. 64G (default: {MEM_PER_RANK_GB}G "
                                      "per rank)")
    parser.add_argument("--exclusive", action="store_true",
                        help="whole nodes: all their cores and memory unless --cpus-per-task / --mem say otherwise")
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


def ranks_per_node(opts: argparse.Namespace) -> int:
    procs = opts.procs_per_node or opts.gpus_per_node or 1
    if opts.gpus_per_node and procs > opts.gpus_per_node:
        raise ConfigError(f"--procs-per-node {procs} with --gpus-per-node {opts.gpus_per_node} would share GPUs: "
                          f"start at most {opts.gpus_per_node} ranks per node, or --gpus-per-node 0 for CPU ranks")
    return procs


def deepspeed_node_command(gpus_per_node: int, procs: int, out_dir: Path) -> str:
    """The deepspeed launcher on one node (run by srun there, the run's arguments as "$@").

    The launcher hands each node's ranks CUDA_VISIBLE_DEVICES = the slots it picked from the hostfile, 0..slots-1
    by default, whatever the job was given: on a partial node (SLURM's CUDA_VISIBLE_DEVICES=2,3) that is another
    job's GPUs. So each node writes its own hostfile and names, with --include, the GPUs SLURM gave it on every
    host (only the local list is used on a node; the others only count ranks)."""
    if gpus_per_node:
        ids = f'$(echo "${{CUDA_VISIBLE_DEVICES:-{",".join(map(str, range(procs)))}}}" | cut -d, -f1-{procs})'
    else:
        ids = ",".join(map(str, range(procs)))  # CPU ranks: the ids only count them
    hostfile = out_dir / "slurm" / "hostfile-$SLURM_JOB_ID-$SLURM_NODEID"
    return "\n".join([
        f"IDS={ids}",
        '[[ $IDS =~ ^[0-9]+(,[0-9]+)*$ ]] || { echo "error: CUDA_VISIBLE_DEVICES=$IDS: the deepspeed launcher '
        'takes GPU indices; use --launcher torchrun" >&2; exit 2; }',
        'HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        "SLOTS=$(( $(tr , '\\n' <<< \"$IDS\" | sort -n | tail -n 1) + 1 ))  # the hostfile's slots hold every id",
        f'sed "s/$/ slots=$SLOTS/" <<< "$HOSTS" > "{hostfile}"',
        f"exec {Path(sys.executable).parent / 'deepspeed'} --hostfile=\"{hostfile}\" "
        '--include="$(sed "s/$/:$IDS/" <<< "$HOSTS" | paste -sd @)" --no_ssh --node_rank=$SLURM_NODEID '
        '--master_addr=$HEAD --master_port=$PORT "$@"',
    ])


def render_script(opts: argparse.Namespace, run_argv: list[str], out_dir: Path,
                  groups: list[list[str]] | None) -> str:
    procs = ranks_per_node(opts)
    log = out_dir / "slurm" / ("%A_%a.out" if groups else "%j.out")
    lines = ["#!/bin/bash", f"#SBATCH --job-name={opts.job_name}", f"#SBATCH --nodes={opts.nodes}",
             "#SBATCH --ntasks-per-node=1", f"#SBATCH --output={log}", "#SBATCH --open-mode=append",
             "#SBATCH --requeue", f"#SBATCH --signal=B:USR1@{opts.signal_seconds}"]
    cpus = opts.cpus_per_task or (None if opts.exclusive else CPUS_PER_RANK * procs)
    mem = opts.mem or ("0" if opts.exclusive else f"{MEM_PER_RANK_GB * procs}G")  # --mem=0: all of the node's
    for flag, value in (("gpus-per-node", opts.gpus_per_node or None), ("cpus-per-task", cpus), ("mem", mem),
                        ("partition", opts.partition), ("account", opts.account), ("time", opts.time)):
        if value:
            lines.append(f"#SBATCH --{flag}={value}")
    if opts.exclusive:
        lines.append("#SBATCH --exclusive")
    if groups:
        lines.append(f"#SBATCH --array=0-{len(groups) - 1}")
    cpu_ranks = [] if opts.gpus_per_node else ["--set", "model.device=cpu"]
    lines += [
        "# Written by launcher/slurm.py.",
        "set -uo pipefail",
        f"cd {shlex.quote(str(Path.cwd()))}",
        # CPU ranks stay off any GPU the node has but the job was not given (the user's own --set comes later, wins)
        f"RUN=({shlex.join([str(REPO / 'launcher' / 'run.py')] + cpu_ranks + run_argv)})",
    ]
    if groups:
        lines += [f"RELATION_GROUPS=({' '.join(shlex.quote(','.join(g)) for g in groups)})",
                  'RUN+=(--relations "${RELATION_GROUPS[$SLURM_ARRAY_TASK_ID]}" '
                  f'--out {shlex.quote(str(out_dir))}/group-$SLURM_ARRAY_TASK_ID)']
    port = opts.port or "$((20000 + SLURM_JOB_ID % 20000))"
    lines += ['export HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
              f"export PORT={port}",
              'echo "[ptuning-lama] job $SLURM_JOB_ID on $SLURM_JOB_NODELIST, restart ${SLURM_RESTART_COUNT:-0}"',
              # the cores SLURM gave each node's task (all of the node's under --exclusive), shared by its ranks
              "CPUS=${SLURM_CPUS_PER_TASK:-$SLURM_CPUS_ON_NODE}",
              f"export OMP_NUM_THREADS=$(( CPUS / {procs} > 0 ? CPUS / {procs} : 1 ))",
              # torchrun gives its ranks this long after a SIGTERM before it kills them (default 30 s): an 11B
              # rank writes ~2 GB of checkpoint per relation it holds. The deepspeed launcher's wait is fixed (30 s)
              f"export TORCH_ELASTIC_SHUTDOWN_TIMEOUT={max(30, opts.signal_seconds - 30)}"]
    if opts.launcher == "torchrun":
        command = (f"exec {Path(sys.executable).parent / 'torchrun'} --nnodes=$SLURM_NNODES --nproc_per_node={procs} "
                   f"--rdzv_id=$SLURM_JOB_ID --rdzv_backend=c10d --rdzv_endpoint=$HEAD:$PORT \"$@\"")
    else:
        command = deepspeed_node_command(opts.gpus_per_node, procs, out_dir)
    lines += [
        "requeue() {",
        '  echo "[ptuning-lama] time limit near: stopping the ranks and requeueing (they checkpoint first)"',
        # SIGTERM to the job's steps (the ranks), not to srun: srun takes a TERM as "cancel the step" and kills
        # the ranks before they can checkpoint; signalled directly, each ends its step, checkpoints and exits
        '  scancel --signal=TERM "$SLURM_JOB_ID"; wait "$CHILD"',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "  exit 0",
        "}",
        "trap requeue USR1",
        # one task per node; SLURM_NODEID and friends expand inside each task, the run's arguments arrive as "$@".
        # --cpus-per-task again: srun (SLURM 22.05 on) does not take it from sbatch and would pin the task to one core
        f'srun --kill-on-bad-exit=1 --ntasks-per-node=1 --cpus-per-task=$CPUS bash -c {shlex.quote(command)} '
        'ptuning "${RUN[@]}" &',
        "CHILD=$!",
        'wait "$CHILD"',
        "exit $?",
    ]
    return "\n".join(lines) + "\n"


def collect(out_dir: Path) -> dict:
    """Gather <out>/group-*/ of an array sweep into <out> as one output folder: every unit's files are linked
    under <out>/relations/, then results.json / results.md and the statistics are made from them as a single run
    would (a sweep's settings pooled over every group's relations)."""
    parts = sorted(out_dir.glob("group-*/results.json"))
    if not parts:
        raise SystemExit(f"error: {out_dir}: no group-*/results.json to collect")
    payloads = [json.loads(p.read_text()) for p in parts]
    for part in parts:
        for source in sorted((part.parent / "relations").rglob("*")):
            if source.is_file():
                target = out_dir / "relations" / source.relative_to(part.parent / "relations")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.unlink(missing_ok=True)
                try:
                    os.link(source, target)  # the same bytes, no copy of the prompt files
                except OSError:
                    shutil.copy2(source, target)
    header = header_of(payloads[0])
    relations = {rid: {k: v for k, v in r.items() if k != "variants"} for p in payloads
                 for rid, r in p["relations"].items()}
    cfg = config_from_dict(header["config"], "collected config")
    coordinator = Coordinator(RunStore(out_dir), header, relations, variants(cfg))
    return coordinator.finish()


def main(argv: list[str] | None = None) -> int:
    opts, run_argv = parse_args(argv)
    if opts.collect:
        merged = collect(Path(opts.collect))
        print(render_markdown(merged))
        return 0
    run_args = parse_run_args(run_argv)
    try:
        ranks_per_node(opts)
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
