"""Reading LAMA T-REx as packed by P-tuning: facts per relation and split, relation templates, shared vocabularies.

Accepted layout (the P-tuning archive, Zenodo record 5578210, and ../shared/lama here):

    <data_dir>/fact-retrieval/original/P<id>/{train,dev,test}.jsonl
    <data_dir>/relations.jsonl                  or <data_dir>/single_relations/P<id>.jsonl
    <data_dir>/29k-vocab.json, 34k-vocab.json   or the same under <data_dir>/vocab/

Every problem is a DataError naming the file (and line, and field) it came from.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ptuning.files import DataError, read_json, read_jsonl

SPLITS = ("train", "dev", "test")
VOCAB_FILES = {"shared": "29k-vocab.json", "lama": "34k-vocab.json"}
VOCAB_NAMES = {"shared": "LAMA-29k", "lama": "LAMA-34k", "original": "full model vocabulary"}
REPO = Path(__file__).resolve().parents[2]
FETCHED = REPO / "data" / "lama"  # where `python -m ptuning.data fetch` (make data) puts the full set
QUICKSTART = REPO / "data" / "quickstart"  # the facts configs/quickstart.json reads, shipped with the code
DOWNLOAD_HINT = (
    "Fetch the full LAMA with `python -m ptuning.data fetch` (make data; into data/lama, found there by default), "
    "or point --data-dir (or $LAMA_DATA, or data.data_dir) at a folder holding fact-retrieval/ (data/README.md)."
)
SUBSET_FILE = "SUBSET.json"  # marks a shipped subset: which relations, and how many facts of each split it holds


@dataclass(frozen=True)
class Fact:
    subject: str
    obj: str


@dataclass(frozen=True)
class RelationInfo:
    id: str
    label: str
    template: str  # manual prompt, e.g. "[X] was born in [Y] ."


@dataclass(frozen=True)
class LamaLayout:
    root: Path
    facts_dir: Path
    subset: dict | None = None  # a shipped subset's SUBSET.json: {"relations": [...], "facts": {split: n}}

    def split_path(self, relation: str, split: str) -> Path:
        return self.facts_dir / relation / f"{split}.jsonl"

    def relation_ids(self) -> list[str]:
        return sorted(p.name for p in self.facts_dir.iterdir() if p.is_dir() and p.name.startswith("P"))

    def vocab_path(self, strategy: str) -> Path:
        name = VOCAB_FILES[strategy]
        for candidate in (self.root / "vocab" / name, self.root / name):
            if candidate.is_file():
                return candidate
        raise DataError(f"{self.root}: no {name} (looked in {self.root}/vocab/ and {self.root}/). {DOWNLOAD_HINT}")


def resolve_data_dir(cli_value: str | None, config_value: str | None) -> Path:
    """--data-dir, then the config's data.data_dir, then $LAMA_DATA, then data/lama (a fetched set), then the
    quick start's shipped subset (data/quickstart)."""
    for value in (cli_value, config_value, os.environ.get("LAMA_DATA")):
        if value:
            return Path(value).expanduser()
    return FETCHED if (FETCHED / "fact-retrieval").is_dir() else QUICKSTART


def find_layout(data_dir: str | Path) -> LamaLayout:
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"{root}: LAMA data folder not found. {DOWNLOAD_HINT}")
    facts_dir = root / "fact-retrieval" / "original"
    if not facts_dir.is_dir():
        raise DataError(f"{root}: no fact-retrieval/original/ folder inside. {DOWNLOAD_HINT}")
    subset = read_json(root / SUBSET_FILE) if (root / SUBSET_FILE).is_file() else None
    if subset is not None and not (isinstance(subset, dict) and isinstance(subset.get("relations"), list)
                                   and isinstance(subset.get("facts"), dict)):
        raise DataError(f"{root / SUBSET_FILE}: expected 'relations' (a list) and 'facts' (facts per split)")
    return LamaLayout(root=root, facts_dir=facts_dir, subset=subset)


def describe(layout: LamaLayout) -> str:
    """Where the facts come from, for the log: the folder, and what a shipped subset holds."""
    if layout.subset is None:
        return str(layout.root)
    n = layout.subset["facts"]
    return (f"{layout.root}: the quick start's shipped subset of LAMA ({len(layout.subset['relations'])} relations, "
            f"up to the first {n['train']} train, {n['dev']} dev and {n['test']} test facts of each; `make data` "
            "fetches the full set)")


def check_subset(layout: LamaLayout, caps: dict[str, int | None]) -> None:
    """A shipped subset holds only its relations and the first facts of each split: a run that wants more needs
    the full set (before the model loads; select_relations has refused relations the subset lacks)."""
    if layout.subset is None:
        return
    held = layout.subset["facts"]
    for split, cap in caps.items():
        if cap is None or cap > held[split]:
            raise DataError(f"{layout.root} holds the first {held[split]} {split} facts of each relation (a "
                            f"shipped subset); data.max_{split} {cap if cap is not None else 'unset'} needs the full "
                            f"LAMA. {DOWNLOAD_HINT}")


def check_subset_task(layout: LamaLayout, relation: str, kept: dict[str, int], caps: dict[str, int | None]) -> None:
    """After the answer vocabulary's filter: the subset was cut for the quick start's model; another tokenizer may
    keep fewer of its facts than the caps ask for."""
    if layout.subset is None:
        return
    for split, cap in caps.items():
        if kept[split] < cap and f"{relation}/{split}" not in layout.subset.get("whole_files", []):
            raise DataError(f"{layout.root}: {relation} keeps {kept[split]} {split} facts under this model's "
                            f"vocabulary, fewer than data.max_{split} {cap} (the shipped subset was cut for the "
                            f"quick start's model). {DOWNLOAD_HINT}")


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise DataError(f"{path}: file not found. {DOWNLOAD_HINT}")
    return read_jsonl(path)


def _text_field(record: dict, key: str, path: Path, number: int) -> str:
    if key not in record:
        raise DataError(f"{path}, line {number}: field '{key}' is missing")
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{path}, line {number}: field '{key}' must be a non-empty string, got {value!r:.40}")
    return value.strip()


def read_facts(layout: LamaLayout, relation: str, split: str) -> list[Fact]:
    path = layout.split_path(relation, split)
    return [
        Fact(_text_field(r, "sub_label", path, n), _text_field(r, "obj_label", path, n))
        for n, r in _read_jsonl(path)
    ]


def read_relation_infos(layout: LamaLayout) -> dict[str, RelationInfo]:
    """Manual templates and labels, from relations.jsonl or single_relations/P<id>.jsonl."""
    paths = [layout.root / "relations.jsonl"]
    if not paths[0].is_file():
        paths = sorted((layout.root / "single_relations").glob("P*.jsonl"))
    if not paths:
        raise DataError(f"{layout.root}: no relations.jsonl (nor single_relations/). {DOWNLOAD_HINT}")
    infos = {}
    for path in paths:
        for number, record in _read_jsonl(path):
            rid = _text_field(record, "relation", path, number)
            template = _text_field(record, "template", path, number)
            if "[X]" not in template or "[Y]" not in template:
                raise DataError(f"{path}, line {number}: field 'template' must contain [X] and [Y]: {template!r}")
            label = _text_field(record, "label", path, number) if "label" in record else rid
            infos[rid] = RelationInfo(rid, label, template)
    return infos


def select_relations(layout: LamaLayout, wanted: list[str] | None) -> list[str]:
    available = layout.relation_ids()
    if not available:
        raise DataError(f"{layout.facts_dir}: no relation folders (P<id>/) inside. {DOWNLOAD_HINT}")
    if wanted is None:
        return available
    unknown = [r for r in wanted if r not in available]
    if unknown:
        what = " (a shipped subset). " + DOWNLOAD_HINT if layout.subset is not None else ""
        raise DataError(
            f"unknown relation id(s) {', '.join(unknown)}: {layout.facts_dir} has {', '.join(available)}{what}"
        )
    return list(dict.fromkeys(wanted))


def read_vocab_words(layout: LamaLayout, strategy: str, key: str) -> list[str]:
    """One word list of 29k-vocab.json / 34k-vocab.json, with GPT-2's leading-space marker 'Ġ' removed."""
    path = layout.vocab_path(strategy)
    table = read_json(path)
    if not isinstance(table, dict):
        raise DataError(f"{path}: expected an object of word lists by model, got a JSON {type(table).__name__}")
    if key not in table:
        raise DataError(f"{path}: no word list for '{key}' (keys: {', '.join(table) or 'none'}); set data.vocab_key")
    words = table[key]
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise DataError(f"{path}: field '{key}' must be a list of words (strings)")
    return [word[1:] if word.startswith("Ġ") else word for word in words]

