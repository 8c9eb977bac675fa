"""What the library knows of parallelism: the process groups it is handed, never how they were launched.

World = data-parallel groups x tensor-parallel size. Relations are spread over the data-parallel groups (each
group trains its relations packed); the ranks of one tensor-parallel group hold shards of one model and train the
same relations, each relation's prompt encoder on one of them (ptuning/parallel/prompt_bank.py).
"""
from __future__ import annotations

import heapq
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class ParallelContext:
    rank: int = 0
    world_size: int = 1
    group_index: int = 0  # which data-parallel group (set of relations) this rank works on
    n_groups: int = 1
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

    def sync_module(self, module: torch.nn.Module) -> None:
        """Make a module identical across the tensor-parallel group: broadcast from its first rank."""
        if self.tp_group is None or dist.get_world_size(self.tp_group) == 1:
            return
        source = dist.get_global_rank(self.tp_group, 0)
        with torch.no_grad():
            for tensor in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(tensor.data, src=source, group=self.tp_group)


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


def balance(weights: dict[str, int], n_groups: int) -> list[list[str]]:
    """Largest first onto the least-loaded group; ties go to the lowest group index. Deterministic, so every rank
    computes the same assignment."""
    groups: list[list[str]] = [[] for _ in range(n_groups)]
    heap = [(0, i) for i in range(n_groups)]
    for name in sorted(weights, key=lambda n: (-weights[n], n)):
        load, index = heapq.heappop(heap)
        groups[index].append(name)
        heapq.heappush(heap, (load + weights[name], index))
    return groups


def assign_packs(weights: dict[str, int], pack_units: int | str, n_groups: int) -> list[list[list[str]]]:
    """Each data-parallel group's packs: the units that train together in one batch (weights: training facts per
    unit, in the run's order: relation by relation, each relation's variants side by side).

    pack_units N > 0: packs of N units in that order, a function of the config alone, so a unit trains with the
    same companions (and computes the same floats) whatever the world size; groups take whole packs, largest first
    onto the least loaded. 0 or "auto": each group's balanced share of the units as one pack (the trainer splits
    it by memory under "auto"): the quickest use of N groups, but the packs depend on N."""
    if isinstance(pack_units, int) and pack_units > 0:
        names = list(weights)
        packs = {names[i]: names[i:i + pack_units] for i in range(0, len(names), pack_units)}
        shares = balance({first: sum(weights[r] for r in pack) for first, pack in packs.items()}, n_groups)
        order = {first: k for k, first in enumerate(packs)}
        return [[packs[first] for first in sorted(share, key=order.get)] for share in shares]
    return [[share] if share else [] for share in balance(weights, n_groups)]


def set_compute(threads: int, deterministic: bool) -> None:
    """The process's compute settings from the config (parallel.threads, parallel.deterministic)."""
    if threads:
        torch.set_num_threads(threads)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS reads it when its handle is made
        torch.use_deterministic_algorithms(True)
