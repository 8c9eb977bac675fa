"""Packs: the units that train together in one step, and which data-parallel replica trains which packs (by their
training work, so that the replicas finish together)."""
from __future__ import annotations

import heapq


def balance(weights: dict[str, int], n_replicas: int) -> list[list[str]]:
    """Each replica's share: largest first onto the least-loaded replica; ties go to the lowest index.
    Deterministic, so every rank computes the same assignment."""
    shares: list[list[str]] = [[] for _ in range(n_replicas)]
    heap = [(0, i) for i in range(n_replicas)]
    for name in sorted(weights, key=lambda n: (-weights[n], n)):
        load, index = heapq.heappop(heap)
        shares[index].append(name)
        heapq.heappush(heap, (load + weights[name], index))
    return shares


def assign_packs(weights: dict[str, int], pack_units: int | str, n_replicas: int) -> list[list[list[str]]]:
    """Each replica's packs: the units that train together in one batch (weights: training facts per
    unit, in the run's order: relation by relation, each relation's variants side by side).

    pack_units N > 0: packs of N units in that order, a function of the config alone, so a unit trains with the
    same companions (and computes the same floats) whatever the world size; replicas take whole packs, largest
    first onto the least loaded. 0 or "auto": each replica's balanced share of the units as one pack (the trainer
    splits it by memory under "auto"): the quickest use of N replicas, but the packs depend on N."""
    if isinstance(pack_units, int) and pack_units > 0:
        names = list(weights)
        packs = {names[i]: names[i:i + pack_units] for i in range(0, len(names), pack_units)}
        shares = balance({first: sum(weights[r] for r in pack) for first, pack in packs.items()}, n_replicas)
        order = {first: k for k, first in enumerate(packs)}
        return [[packs[first] for first in sorted(share, key=order.get)] for share in shares]
    return [[share] if share else [] for share in balance(weights, n_replicas)]
