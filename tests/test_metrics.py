import torch

from ptuning.model.metrics import restricted_ranks, summarize_ranks


def test_ranks_respect_the_allowed_vocabulary():
    logits = torch.tensor([[5.0, 1.0, 4.0, 3.0, 2.0],
                           [5.0, 1.0, 4.0, 3.0, 2.0],
                           [0.0, 9.0, 1.0, 1.0, 1.0]])
    allowed = torch.tensor([False, True, True, True, True])  # id 0 (the overall best) is not an answer
    labels = torch.tensor([2, 4, 3])
    ranks = restricted_ranks(logits, labels, allowed)
    assert ranks.tolist() == [1, 3, 3]  # row 3: ties at 1.0 break by id, as argmax does (2 before 3)
    argmax = logits.masked_fill(~allowed, float("-inf")).argmax(1)
    assert ((ranks == 1) == (argmax == labels)).all()


def test_summary():
    m = summarize_ranks(torch.tensor([1, 2, 11, 1]))
    assert m["p@1"] == 0.5 and m["p@10"] == 0.75 and abs(m["mrr"] - (1 + 0.5 + 1 / 11 + 1) / 4) < 1e-7
    assert summarize_ranks(torch.tensor([], dtype=torch.long))["n"] == 0
