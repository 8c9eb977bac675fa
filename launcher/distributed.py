"""Process groups from the launcher's environment: python (one process), torchrun, or the deepspeed launcher.

Both torchrun and the deepspeed launcher set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. The device
follows model.device (choose_device): one GPU per rank, nccl; or CPU, gloo.
"""
from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

from ptuning.config import ConfigError
from ptuning.parallel.context import ParallelContext

# Data-parallel groups finish their relations at different times and wait for the others at the end.
GROUP_TIMEOUT = datetime.timedelta(hours=72)


def launched_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or dist.is_initialized()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def choose_device(requested: str, local_rank: int, local_procs: int, n_gpus: int) -> torch.device:
    """The device of rank local_rank of the local_procs ranks on a node with n_gpus visible GPUs, for model.device
    `requested`: cpu (even with GPUs), cuda (a GPU or an error), auto (cuda when the node has GPUs, else cpu).
    Rank r takes cuda:r; ranks never share a GPU silently."""
    if requested == "cpu" or (requested == "auto" and n_gpus == 0):
        return torch.device("cpu")
    if requested not in ("auto", "cuda"):
        raise ConfigError(f"model.device={requested}: expected auto, cpu or cuda (rank r of a node takes cuda:r; "
                          "choose the GPUs with CUDA_VISIBLE_DEVICES)")
    if n_gpus == 0:
        raise ConfigError("model.device=cuda but this node has no CUDA GPU: set model.device=cpu (or auto)")
    if local_procs > n_gpus:
        raise ConfigError(f"{local_procs} processes per node were started but this node has {n_gpus} GPU(s): start "
                          f"at most {n_gpus} per node, or set model.device=cpu to run them on CPU (gloo)")
    return torch.device(f"cuda:{local_rank}")


def describe_job() -> str:
    """This process, as the output folder's lock records it."""
    job = f"pid {os.getpid()} on {socket.gethostname()}"
    if os.environ.get("SLURM_JOB_ID"):
        job += f", SLURM job {os.environ['SLURM_JOB_ID']}"
    return job + f", since {datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S')}"


def init_parallel(tensor_parallel: int = 1, solo_groups: bool = False, device: str = "auto") -> ParallelContext:
    """device: the config's model.device (choose_device). solo_groups: also make a process group of each rank alone
    (DeepSpeed's data-parallel groups); a single process then gets a one-rank process group too."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # torchrun says LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE; every rank of a node checks the same count,
    # so all of them stop with the same error before any collective
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or local_rank + 1)
    chosen = choose_device(device, local_rank, local_procs, torch.cuda.device_count())
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if not launched_distributed():
        if tensor_parallel != 1:
            raise ConfigError(f"parallel.tensor_parallel={tensor_parallel} needs that many processes per group; "
                             "launch with torchrun or deepspeed")
        if not solo_groups:
            return ParallelContext(device=chosen, job=describe_job())
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if not dist.is_initialized():
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo", timeout=GROUP_TIMEOUT)
    if world % tensor_parallel:
        raise ConfigError(f"world size {world} is not a multiple of parallel.tensor_parallel={tensor_parallel}")
    if tensor_parallel > 1:
        # megatron-core's layers reduce over its own tensor-parallel groups: consecutive ranks, as ours
        from megatron.core import parallel_state

        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel)
        tp_group = parallel_state.get_tensor_model_parallel_group()
        # host-side agreement inside a group (stop requests, the pack size) over gloo: no GPU sync. Made here,
        # where every rank passes, since every rank must create every group
        control = tp_group if dist.get_backend() == "gloo" else [
            dist.new_group(list(range(start, start + tensor_parallel)), backend="gloo", timeout=GROUP_TIMEOUT)
            for start in range(0, world, tensor_parallel)][rank // tensor_parallel]
    else:
        # every rank creates every group, in the same order (torch.distributed requires it)
        tp_groups = [dist.new_group([r], timeout=GROUP_TIMEOUT) for r in range(world)]
        tp_group, control = tp_groups[rank], None
    solo = [dist.new_group([r], timeout=GROUP_TIMEOUT) for r in range(world)] if solo_groups else None
    return ParallelContext(rank=rank, world_size=world, replica=rank // tensor_parallel,
                           n_replicas=world // tensor_parallel, tp_size=tensor_parallel,
                           tp_rank=rank % tensor_parallel, tp_group=tp_group, tp_control=control, device=chosen,
                           solo_group=solo[rank] if solo else None, job=describe_job())


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
