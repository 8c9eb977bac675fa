"""Template rows -> tensors: which facts go through the LM together, and how they sit in batch rows.

Two levers against padding, neither of which changes a result beyond float rounding:
- length buckets: the rows of one step (or one evaluation) go through the LM in chunks of rows of similar length;
- shared rows: when the backbone packs rows, facts sit back to back in rows of up to `row_tokens` tokens, with
  attention kept inside each fact and positions restarting at each fact (backbone.Layout). A P-tuning fact is
  7-25 tokens; one per row pays for ~35% padding in a relation's batch of 8 and ~90% when 8 relations share a
  batch, shared rows for ~3% (measured on LAMA with SmolLM2's tokenizer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ptuning.model.backbone import Layout
from ptuning.data.templates import Row


@dataclass
class Batch:
    ids: torch.Tensor  # (B, L) token ids
    pseudo: torch.Tensor  # (B, L) index into the concatenated prompt vectors of the batch's relations, or -1
    layout: Layout  # where each of the N facts sits
    labels: torch.Tensor  # (N,) each fact's object id
    weights: torch.Tensor | None = None  # (N,) each fact's weight in the loss, when given


def to_device(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Tensors of one dtype built on the CPU, moved in ONE pinned, non-blocking copy: on a GPU a batch costs one
    transfer per dtype (its integers; the loss weights) and no host sync (a plain copy from pageable memory waits
    for the GPU's queue to drain)."""
    if device.type == "cpu":
        return tensors
    flat = torch.cat([t.flatten() for t in tensors]).pin_memory().to(device, non_blocking=True)
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def first_fit(lengths: list[int], width: int) -> list[list[int]]:
    """Facts into rows of at most `width` tokens, first fit in order of decreasing length."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(width - lengths[i])
    return rows


def fill_rows(lengths: list[int], max_width: int) -> list[list[int]]:
    """Group facts into shared rows: of the widths from the longest fact up to max_width, the one whose first-fit
    layout holds the fewest tokens, padding included (the narrowest of equals: less attention). A width of the
    longest fact is never worse than one fact per row. max_width 0: one fact per row."""
    if max_width <= 0 or not lengths:
        return [[i] for i in range(len(lengths))]
    best, best_tokens = None, None
    for width in range(max(lengths), max(max_width, max(lengths)) + 1):
        rows = first_fit(lengths, width)
        tokens = len(rows) * max(sum(lengths[i] for i in row) for row in rows)
        if best_tokens is None or tokens < best_tokens:
            best, best_tokens = rows, tokens
    return best


def collate(rows: list[Row], owners: list[int], offsets: list[int], pad_id: int, side: str, row_tokens: int,
            device: torch.device, weights: list[float] | None = None, separate: bool = False) -> Batch:
    """Lay the facts out in batch rows (shared rows of `row_tokens`, or one per row when 0) padded on `side`;
    pseudo slots point into the concatenation of the items' prompt vectors (owners[i]: fact i's item). Facts
    keep their input order in labels and the layout's targets. separate: facts share rows only with facts of
    the same item (an inf in one item's backward cannot reach another's through attention's). Built on the CPU,
    then moved at once."""
    if separate:
        groups = []
        for owner in dict.fromkeys(owners):
            mine = [i for i, o in enumerate(owners) if o == owner]
            groups += [[mine[j] for j in group] for group in fill_rows([len(rows[i].ids) for i in mine], row_tokens)]
    else:
        groups = fill_rows([len(r.ids) for r in rows], row_tokens)
    width = max(sum(len(rows[i].ids) for i in group) for group in groups)
    ids = torch.full((len(groups), width), pad_id, dtype=torch.long)
    pseudo = torch.full((len(groups), width), -1, dtype=torch.long)
    segment = torch.full((len(groups), width), -1, dtype=torch.long)
    position = torch.zeros((len(groups), width), dtype=torch.long)
    target_row = torch.zeros(len(rows), dtype=torch.long)
    target_col = torch.zeros(len(rows), dtype=torch.long)
    for b, group in enumerate(groups):
        col = width - sum(len(rows[i].ids) for i in group) if side == "left" else 0
        for k, i in enumerate(group):
            row, n = rows[i], len(rows[i].ids)
            ids[b, col:col + n] = torch.tensor(row.ids)
            pseudo[b, col:col + n] = torch.tensor([p + offsets[owners[i]] if p >= 0 else -1 for p in row.pseudo])
            segment[b, col:col + n] = k
            position[b, col:col + n] = torch.arange(n)
            target_row[i], target_col[i] = b, col + row.target
            col += n
    labels = torch.tensor([r.label for r in rows], dtype=torch.long)
    ids, pseudo, segment, position, target_row, target_col, labels = to_device(
        [ids, pseudo, segment, position, target_row, target_col, labels], device)
    layout = Layout(segment, position, target_row, target_col, packed=any(len(g) > 1 for g in groups))
    weight = None if weights is None else to_device([torch.tensor(weights, dtype=torch.float32)], device)[0]
    return Batch(ids, pseudo, layout, labels, weight)


def length_buckets(vectors: list, rows: list[list[Row]], size: int) -> Iterator[tuple[list, list[tuple[int, int]]]]:
    """Split the rows of several relations into chunks of at most `size` rows of similar length (size 0: one
    chunk). Yields (pack items for Trainer.packed_logits, the (relation, row) each logits row belongs to)."""
    flat = [(i, j, row) for i, rs in enumerate(rows) for j, row in enumerate(rs)]
    if size:
        flat.sort(key=lambda x: len(x[2].ids))
    size = size or len(flat)
    for start in range(0, len(flat), size):
        by_owner: dict[int, list[tuple[int, Row]]] = {}
        for i, j, row in flat[start:start + size]:
            by_owner.setdefault(i, []).append((j, row))
        chunk = [(vectors[i], [row for _, row in pairs]) for i, pairs in by_owner.items()]
        yield chunk, [(i, j) for i, pairs in by_owner.items() for j, _ in pairs]  # packed_logits' row order
