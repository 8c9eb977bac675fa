"""A relation's predictions, read from a run's predictions.jsonl: where P-tuning and the manual prompt disagree
(flips, with examples) and what P-tuning answers against what the gold objects are.

    python -m ptuning.inspect RUN --relation P36 [--variant seed=35] [--examples 5]
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from ptuning.config.sweep import unit_id
from ptuning.files import DataError, read_json_object
from ptuning.output.store import RunStore


def _unit(folder: str, relation: str, variant: str | None) -> str:
    payload = read_json_object(Path(folder) / "results.json", "a run's results.json")
    if relation not in payload.get("relations", {}):
        raise DataError(f"{folder}: no relation {relation} (it has: {', '.join(payload.get('relations', {}))})")
    variants = list(payload.get("variants") or {})
    if variants and variant not in variants:
        raise DataError(f"{folder}: a sweep; give --variant, one of {', '.join(variants)}")
    if not variants and variant:
        raise DataError(f"{folder}: not a sweep; leave out --variant")
    return unit_id(relation, variant or "")


def _example(line: dict) -> str:
    manual = (line.get("manual_top") or ["?"])[0]
    ptuned = (line.get("ptuning_top") or ["?"])[0]
    flag = " (object in subject)" if line["in_subject"] else ""
    return f"  {line['subject']} -> {line['object']}{flag}: manual {manual}, P-tuned {ptuned}"


def report(lines: list[dict], unit: str, examples: int) -> str:
    n = len(lines)
    out = [f"{unit}: {n} test facts, {sum(line['in_subject'] for line in lines)} with the object in the subject's name"]
    if "ptuning_rank" not in lines[0] or "manual_rank" not in lines[0]:
        raise DataError(f"{unit}: predictions.jsonl needs both the manual and the P-tuned ranks to show flips")
    right = {(m, p): [] for m in (True, False) for p in (True, False)}
    for line in lines:
        right[line["manual_rank"] == 1, line["ptuning_rank"] == 1].append(line)
    manual_p1 = sum(line["manual_rank"] == 1 for line in lines) / n
    ptuned_p1 = sum(line["ptuning_rank"] == 1 for line in lines) / n
    out += [f"P@1: manual {100 * manual_p1:.1f}, P-tuned {100 * ptuned_p1:.1f}", "",
            "                 P-tuned right  P-tuned wrong",
            f"manual right     {len(right[True, True]):>13}  {len(right[True, False]):>13}",
            f"manual wrong     {len(right[False, True]):>13}  {len(right[False, False]):>13}"]
    for title, key in (("manual wrong -> P-tuned right", (False, True)), ("manual right -> P-tuned wrong", (True, False))):
        flips = right[key]
        out += ["", f"{title}: {len(flips)}"] + [_example(line) for line in flips[:examples]]
    if "ptuning_top" in lines[0]:
        answers = Counter(line["ptuning_top"][0] for line in lines)
        gold = Counter(line["object"] for line in lines)
        out += ["", "P-tuned top-1 answers against the gold objects (the 10 most frequent of either):",
                f"  {'answer':<24} {'P-tuned':>8} {'gold':>8}"]
        for word in sorted(set(answers) | set(gold), key=lambda w: (-max(answers[w], gold[w]), w))[:10]:
            out.append(f"  {word:<24} {answers[word]:>8} {gold[word]:>8}")
        out.append(f"  {len(answers)} distinct P-tuned answers, {len(gold)} distinct gold objects")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="an output folder")
    parser.add_argument("--relation", required=True, help="a relation id, e.g. P36")
    parser.add_argument("--variant", help="a sweep's variant, e.g. seed=35")
    parser.add_argument("--examples", type=int, default=5, help="examples of each kind of flip")
    opts = parser.parse_args(argv)
    try:
        unit = _unit(opts.run, opts.relation, opts.variant)
        store = RunStore(opts.run)
        lines = store.predictions(unit)
        if not lines:
            raise DataError(f"{store.unit_dir(unit) / 'predictions.jsonl'}: missing or empty (the unit has not "
                            "finished, or the run is from before the probing controls)")
        print(report(lines, unit, opts.examples))
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
