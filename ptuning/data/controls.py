"""What a relation's facts allow without any knowledge: the training split's majority object, and the objects a
reader can copy from the subject's name.

- Majority baseline: always answer the training split's most frequent object (the first of equals, in file order).
  Its test P@1 is the share of test facts with that object: the object prior a trained prompt can learn.
- In-subject: the object is a case-insensitive substring of the subject's name ("Toyota Corolla" -> "Toyota").
- UHN subset: the test facts that are not in-subject. This is the string rule of LAMA-UHN (Poerner et al. 2020).
  Their second rule, which drops facts whose person name alone gives the answer, needs a model's name-only
  predictions, so it is left out here.
"""
from __future__ import annotations

from collections import Counter

SUBSETS = ("uhn",)  # the test subsets compare/inspect can restrict to


def in_subject(subject: str, obj: str) -> bool:
    return obj.lower() in subject.lower()


def majority_object(task) -> str:
    """The training split's most frequent object word (the first of equals in file order)."""
    counts = Counter(e.obj for e in task.splits["train"])
    return counts.most_common(1)[0][0]


def relation_controls(task) -> dict:
    """The data-only figures of a relation's test split: majority object and its P@1, in-subject share, UHN size."""
    test = task.splits["test"]
    majority = majority_object(task)
    flags = [in_subject(e.subject, e.obj) for e in test]
    return {"majority_object": majority, "majority_p@1": sum(e.obj == majority for e in test) / len(test),
            "in_subject": sum(flags) / len(test), "n_uhn": len(test) - sum(flags)}


def facts_of(task) -> list[dict]:
    """Each test fact in the split's order (the order of every ranks file): subject, object, in-subject flag."""
    return [{"subject": e.subject, "object": e.obj, "in_subject": in_subject(e.subject, e.obj)}
            for e in task.splits["test"]]


def subset_mask(facts: list[dict], subset: str | None) -> list[bool]:
    """Which test facts a subset keeps (None: all)."""
    if subset is None:
        return [True] * len(facts)
    if subset == "uhn":
        return [not f["in_subject"] for f in facts]
    raise ValueError(f"unknown subset {subset!r} (known: {', '.join(SUBSETS)})")
