"""What the library knows of parallelism: the process groups it is handed, never how they were launched.

World = replicas x tensor-parallel size. A replica is one copy of the model: a tensor-parallel group of ranks that
hold its shards and train the same units (each unit's prompt encoder on one of them: ptuning/train/prompt_bank.py).
Units are spread over the replicas (ptuning/parallel/packs.py). "Group" means a torch.distributed process group,
nothing else.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class ParallelContext:
    rank: int = 0
    world_size: int = 1
    replica: int = 0  # which data-parallel replica (one model copy, its units) this rank works on
    n_replicas: int = 1
    tp_size: int = 1
    tp_rank: int = 0  # rank inside the tensor-parallel group
    tp_group: Any = None  # torch.distributed group of this rank's tensor-parallel peers (None: no peers)
    tp_control: Any = None  # the same peers over gloo, for host-side agreement (None: no peers)
    device: torch.device | None = None  # None: the config's model.device
    solo_group: Any = None  # a process group of this rank alone (DeepSpeed's data-parallel group), when needed
    job: str = ""  # who this job is, for the output folder's lock (e.g. "pid 12 on node3, SLURM job 55")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def writer(self) -> bool:
        """The rank of a tensor-parallel group that writes the group's shared records (the manual baseline);
        each relation's own files come from the rank that holds its encoder."""
        return self.tp_rank == 0

    @property
    def coordinator(self) -> bool:
        """Rank 0 gathers every relation's result into results.json and W&B."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def agree(self, value: int, op: str = "max") -> int:
        """The max (or min) of an integer over this rank's tensor-parallel peers: decisions every peer must share
        (stop after this step, how many relations to pack), taken on the host."""
        if self.tp_control is None:
            return value
        tensor = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN, group=self.tp_control)
        return int(tensor.item())

    def sync_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Make tensors identical across the tensor-parallel group: broadcast from its first rank (on the device
        the group's backend needs)."""
        if self.tp_group is None or dist.get_world_size(self.tp_group) == 1:
            return
        source = dist.get_global_rank(self.tp_group, 0)
        with torch.no_grad():
            for tensor in tensors:
                dist.broadcast(tensor, src=source, group=self.tp_group)

    def solo_mpu(self) -> "SoloMPU":
        if self.solo_group is None:
            raise ValueError("DeepSpeed needs a process group: launch through launcher/run.py")
        return SoloMPU(self.solo_group)


class SoloMPU:
    """The model-parallel-unit interface DeepSpeed asks for, with this rank alone as its data-parallel group:
    ranks fine-tune different relations, so their gradients must never be averaged together."""

    def __init__(self, group: Any):
        self.group = group

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_group(self) -> Any:
        return self.group

    def get_data_parallel_rank(self) -> int:
        return 0

    def get_data_parallel_world_size(self) -> int:
        return 1

    def get_data_parallel_group(self) -> Any:
        return self.group


def set_compute(threads: int, deterministic: bool) -> None:
    """The process's compute settings from the config (parallel.threads, parallel.deterministic)."""
    if threads:
        torch.set_num_threads(threads)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS reads it when its handle is made
        torch.use_deterministic_algorithms(True)
