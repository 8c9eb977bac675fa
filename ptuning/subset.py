"""The quick start's shipped data (data/quickstart), cut out of a full LAMA folder:

    python -m ptuning.subset --config configs/quickstart.json --source <full LAMA> --dest data/quickstart

It needs the config's model (its tokenizer decides which facts its answer vocabulary keeps), so it sits above the
rooms, like ptuning/experiment.py."""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from ptuning.data.fetch import FetchError
from ptuning.files import DataError


def write_subset(config: Path, source: Path, dest: Path) -> None:
    """The facts `config` reads, cut out of the full LAMA at `source` into `dest` (how data/quickstart was made):
    per relation and split, the file's first lines up to the one holding the last fact the config keeps (after
    its model's answer-vocabulary filter and data.max_<split>), byte for byte; the relations' templates; the one
    word list of the vocabulary file it uses; SUBSET.json (what the subset holds) and SHA256SUMS."""
    from ptuning.config import load_config
    from ptuning.data.lama import SPLITS, SUBSET_FILE, VOCAB_FILES, find_layout, read_facts
    from ptuning.data.vocab import answer_vocab, vocab_key_of
    from ptuning.files import read_json
    from ptuning.model.loading import load_backbone

    cfg = load_config(config)
    caps = {"train": cfg.data.max_train, "dev": cfg.data.max_dev, "test": cfg.data.max_test}
    if cfg.data.relations is None or None in caps.values() or not cfg.data.uses_vocab_file:
        raise FetchError(f"{config}: a subset needs data.relations, every data.max_<split> and a vocabulary file")
    layout = find_layout(source)
    vocab, _ = answer_vocab(cfg, load_backbone(cfg.model), layout)
    dest.mkdir(parents=True, exist_ok=True)
    written, whole = [], []
    for relation in cfg.data.relations:
        for split in SPLITS:
            path = layout.split_path(relation, split)
            labels = vocab.object_ids([f.obj for f in read_facts(layout, relation, split)])
            kept = [i for i, label in enumerate(labels) if label is not None]
            lines = path.read_bytes().splitlines(keepends=True)
            if len(kept) > caps[split]:  # else the whole file: the cap keeps every answerable fact
                lines = lines[:kept[caps[split] - 1] + 1]
            else:
                whole.append(f"{relation}/{split}")
            target = dest / "fact-retrieval" / "original" / relation / f"{split}.jsonl"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"".join(lines))
            written.append(target)
    templates = [line for line in (layout.root / "relations.jsonl").read_bytes().splitlines(keepends=True)
                 if json.loads(line)["relation"] in cfg.data.relations]
    (dest / "relations.jsonl").write_bytes(b"".join(templates))
    key = vocab_key_of(cfg)
    name = VOCAB_FILES[cfg.data.vocab]
    (dest / "vocab").mkdir(exist_ok=True)
    (dest / "vocab" / name).write_text(json.dumps({key: read_json(layout.vocab_path(cfg.data.vocab))[key]}) + "\n")
    subset = {"made_from": "LAMA T-REx, AutoPrompt splits as packed by P-tuning (SOURCE.md)",
              "made_by": f"python -m ptuning.subset --config {config} --source <LAMA> --dest {dest}",
              "relations": list(cfg.data.relations), "facts": caps, "whole_files": whole, "vocab_key": key,
              "model": cfg.model.name}
    (dest / SUBSET_FILE).write_text(json.dumps(subset, indent=2) + "\n")
    files = written + [dest / "relations.jsonl", dest / "vocab" / name, dest / SUBSET_FILE]
    (dest / "SHA256SUMS").write_text("".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  "
                                             f"{p.relative_to(dest)}\n" for p in sorted(files)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ptuning.subset", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--source", required=True, help="a full LAMA folder")
    parser.add_argument("--dest", required=True)
    args = parser.parse_args(argv)
    try:
        write_subset(Path(args.config), Path(args.source), Path(args.dest))
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
