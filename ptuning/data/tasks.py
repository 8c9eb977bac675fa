"""One relation's facts, filtered to the answer vocabulary, ready for a template."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from ptuning.config import DataConfig
from ptuning.data.lama import SPLITS, Fact, LamaLayout, RelationInfo, read_facts
from ptuning.data.vocab import AnswerVocab


@dataclass(frozen=True)
class Example:
    subject: str
    obj: str
    label: int  # the object's token id


@dataclass
class RelationTask:
    info: RelationInfo
    splits: dict[str, list[Example]]
    dropped: dict[str, int]  # facts whose object is not in the answer vocabulary, per split
    skip_reason: str | None = None
    capped: dict[str, int] = field(default_factory=dict)  # facts left out by data.max_<split>, per split

    @property
    def id(self) -> str:
        return self.info.id

    def counts(self) -> dict[str, int]:
        return {f"n_{s}": len(self.splits[s]) for s in SPLITS}

    def fingerprint(self, split: str) -> str:
        """The split's facts, in order, as a short hash: two runs can be paired on facts when theirs agree."""
        text = "\n".join(f"{e.subject}\t{e.obj}" for e in self.splits[split])
        return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def read_relation(layout: LamaLayout, relation: str) -> dict[str, list[Fact]]:
    return {split: read_facts(layout, relation, split) for split in SPLITS}


def prepare_task(info: RelationInfo, facts_by_split: dict[str, list[Fact]], vocab: AnswerVocab,
                 data: DataConfig) -> RelationTask:
    splits, dropped, capped = {}, {}, {}
    caps = {"train": data.max_train, "dev": data.max_dev, "test": data.max_test}
    for split in SPLITS:
        facts = facts_by_split[split]
        labels = vocab.object_ids([f.obj for f in facts])
        kept = [Example(f.subject, f.obj, y) for f, y in zip(facts, labels) if y is not None]
        dropped[split] = len(facts) - len(kept)
        cap = caps[split]
        capped[split] = max(0, len(kept) - cap) if cap is not None else 0
        splits[split] = kept[:cap] if cap is not None else kept
    empty = [s for s in SPLITS if not splits[s]]
    reason = f"no {'/'.join(empty)} facts left in {vocab.name}" if empty else None
    return RelationTask(info, splits, dropped, reason, capped)
