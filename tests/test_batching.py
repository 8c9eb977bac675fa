"""Batching: facts laid out in shared rows (first fit, longest first) and length-bucketed chunks."""
import torch

from ptuning.train.batching import collate, fill_rows, first_fit, length_buckets
from ptuning.data.templates import Row


def row(n: int, target: int, label: int = 0, pseudo: tuple[int, ...] | None = None) -> Row:
    return Row(tuple(range(100 + n * 10, 100 + n * 10 + n)), pseudo or (-1,) * n, target, label)


def test_first_fit_longest_first():
    assert first_fit([5, 9, 4, 7, 3, 20], 20) == [[5], [1, 3, 2], [0, 4]]  # 20; 9+7+4; 5+3


def test_fill_rows_picks_the_width_with_the_fewest_tokens():
    lengths = [5, 9, 4, 7, 3, 20]
    groups = fill_rows(lengths, 32)
    assert sorted(i for g in groups for i in g) == list(range(6))
    width = max(sum(lengths[i] for i in g) for g in groups)
    assert len(groups) * width == min(len(g) * max(sum(lengths[i] for i in r) for r in g)
                                      for g in (first_fit(lengths, w) for w in range(20, 33)))
    assert len(groups) * width <= 6 * 20  # never worse than one fact per padded row
    assert fill_rows(lengths, 0) == [[0], [1], [2], [3], [4], [5]]
    assert fill_rows([30, 2], 8) == [[0], [1]]  # a fact longer than max_width shares with none


def test_collate_places_each_fact_and_keeps_the_input_order():
    rows = [row(3, 2, 7), row(5, 4, 8, pseudo=(0, -1, 1, -1, -1)), row(1, 0, 9)]
    batch = collate(rows, [0, 1, 1], [0, 2], pad_id=-5, side="left", row_tokens=6, device=torch.device("cpu"))
    # width 5 (10 tokens) beats 6 (12): the 5 alone, then 3+1 left-padded by one
    assert batch.ids.tolist() == [list(rows[1].ids), [-5] + list(rows[0].ids + rows[2].ids)]
    assert batch.layout.segment.tolist() == [[0, 0, 0, 0, 0], [-1, 0, 0, 0, 1]]
    assert batch.layout.position.tolist() == [[0, 1, 2, 3, 4], [0, 0, 1, 2, 0]]
    assert batch.pseudo.tolist()[0] == [2, -1, 3, -1, -1]  # relation 1's slots start at offset 2
    for i, r in enumerate(rows):  # each fact's target token is where its row says
        assert batch.ids[batch.layout.target_row[i], batch.layout.target_col[i]] == r.ids[r.target]
    assert batch.labels.tolist() == [7, 8, 9]
    assert batch.layout.packed


def test_collate_one_fact_per_row_pads_on_the_right_for_masked_models():
    rows = [row(3, 1), row(5, 2)]
    batch = collate(rows, [0, 0], [0], pad_id=0, side="right", row_tokens=0, device=torch.device("cpu"))
    assert batch.layout.mask.tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert batch.layout.target_col.tolist() == [1, 2] and not batch.layout.packed


def test_length_buckets_cover_every_row_once_in_sorted_chunks():
    rows = [[row(n, 0) for n in (9, 3, 6)], [row(n, 0) for n in (4, 8)]]
    seen = []
    for chunk, positions in length_buckets(["v0", "v1"], rows, 2):
        assert len(positions) <= 2
        lengths = [len(r.ids) for _, rs in chunk for r in rs]
        assert lengths == [len(rows[i][j].ids) for i, j in positions]
        seen.extend(positions)
    assert sorted(seen) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
