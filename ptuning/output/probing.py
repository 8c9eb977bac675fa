"""Is a P@1 recall or a learned guess? The figures beside every P@1 (ptuning/data/controls.py says what each
control is), read from the output folder's per-fact files:

- per relation: the majority baseline and in-subject share (data only, recorded when the run starts), the manual
  prompt's P@1 on the UHN subset;
- per unit: its P@1 on the UHN subset, and its prior share (how often its top-1 is the training majority object,
  against the gold's share, the majority baseline);
- per unit, predictions.jsonl: every test fact with the manual and P-tuned top-10 and the gold's rank under each.
"""
from __future__ import annotations

import numpy as np

from ptuning.data.controls import subset_mask
from ptuning.output import stats


def _p_at_1(ranks: list[int], keep: list[bool]) -> float | None:
    kept = [r for r, k in zip(ranks, keep) if k]
    return sum(r == 1 for r in kept) / len(kept) if kept else None


def manual_fields(facts: list[dict], ranks: list[int]) -> dict:
    return {"manual_uhn_p@1": _p_at_1(ranks, subset_mask(facts, "uhn"))}


def unit_fields(facts: list[dict], ranks: list[int], top: list[list[str]] | None, majority: str) -> dict:
    fields = {"test_uhn_p@1": _p_at_1(ranks, subset_mask(facts, "uhn"))}
    if top is not None:
        fields["prior_share"] = sum(t[0] == majority for t in top) / len(top)
    return fields


def prediction_lines(facts: list[dict], manual: tuple[list[int], list[list[str]] | None] | None,
                     ptuned: tuple[list[int], list[list[str]] | None]) -> list[dict]:
    """One line per test fact: subject, object, in_subject, and per prompt (manual where it ran, ptuning) the gold's
    rank and the top answers."""
    lines = []
    for i, fact in enumerate(facts):
        line = dict(fact)
        for name, kept in (("manual", manual), ("ptuning", ptuned)):
            if kept is not None:
                ranks, top = kept
                line[f"{name}_rank"] = ranks[i]
                if top is not None:
                    line[f"{name}_top"] = top[i]
        lines.append(line)
    return lines


def subset_setting(setting: stats.Setting, masks: dict[str, list[bool]]) -> stats.Setting:
    """The setting's hits on a subset of each relation's test facts (relations with none left out)."""
    hits = {r: h[:, np.asarray(masks[r], dtype=bool)] for r, h in setting.hits.items() if any(masks[r])}
    return stats.Setting(setting.seeds, hits)


def majority_setting(facts: dict[str, list[dict]], majority: dict[str, str]) -> stats.Setting:
    """Always answering the training majority object, as a setting with one "seed" (for its interval)."""
    return stats.Setting([0], {r: np.asarray([[f["object"] == majority[r] for f in fs]], dtype=np.float64)
                               for r, fs in facts.items()})
