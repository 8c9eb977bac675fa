"""Compare runs: per-relation and macro test P@1 of run folders or of the settings of a sweep, the differences to
the first with paired bootstrap 95% intervals, and a plot of per-relation P@1 with the seeds' spread.

    python -m ptuning.compare RUN_A RUN_B [...] [--plot compare.png] [--subset uhn]

Each argument is an output folder (every setting it holds: the run's own, or each setting of a sweep), or
FOLDER:SETTING for one of them (FOLDER:manual for its manual prompt). Entries are paired on test facts, which
needs the same relations with the same test facts (checked by a fingerprint of each relation's test set); the
relations all entries finished are compared. --subset uhn compares on each relation's UHN subset only (the test
facts whose object is not in the subject's name: ptuning/data/controls.py); a random-lm control's folder
(--control random-lm) compares like any other.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from ptuning.data.controls import SUBSETS, subset_mask
from ptuning.output import probing, stats
from ptuning.files import DataError, read_json_object
from ptuning.output.results import grouped_bars
from ptuning.output.store import RunStore
from ptuning.config.sweep import unit_id


@dataclass
class Entry:
    label: str
    setting: stats.Setting
    fingerprints: dict[str, str]  # relation -> its test set's fingerprint


def entries(spec: str, subset: str | None = None) -> list[Entry]:
    """The settings of one argument (FOLDER or FOLDER:SETTING), on a subset of the test facts (None: all)."""
    folder, _, wanted = spec.partition(":")
    store = RunStore(folder)
    payload = read_json_object(Path(folder) / "results.json", "a run's results.json")
    relations = {rid: r for rid, r in payload.get("relations", {}).items() if r.get("status") != "skipped"}
    prints = {rid: r.get("test_facts", "") for rid, r in relations.items()}
    variants = payload.get("variants") or {"": {"setting": "", "overrides": {}}}
    by_setting: dict[str, list[tuple[str, int]]] = {}
    for name, spec_ in variants.items():
        seed = spec_.get("overrides", {}).get("train.seed", payload["config"]["train"]["seed"])
        by_setting.setdefault(spec_.get("setting", ""), []).append((name, seed))
    out = []
    names = [wanted] if ":" in spec else list(by_setting)
    for name in names:
        if name == "manual":
            ranks = {rid: [r] for rid in relations if (r := store.ranks(rid, "manual")) is not None}
            seeds = [0]
        elif name in by_setting:
            members = by_setting[name]
            ranks = {}
            for rid in relations:
                rows = [store.ranks(unit_id(rid, v), "test") for v, _ in members]
                if all(r is not None for r in rows):
                    ranks[rid] = rows
            seeds = [s for _, s in members]
        else:
            raise DataError(f"{folder}: no setting {name!r} (it has: {', '.join(map(repr, by_setting))}, 'manual')")
        if not ranks:
            raise DataError(f"{folder}: no finished unit of setting {name!r} has test ranks")
        label = Path(folder).name + (f":{name}" if name else "")
        setting = stats.setting_from_ranks(ranks, seeds)
        if subset is not None:
            setting = probing.subset_setting(setting, _masks(store, list(ranks), subset))
        out.append(Entry(label, setting, prints))
    return out


def _masks(store: RunStore, relations: list[str], subset: str) -> dict[str, list[bool]]:
    out = {}
    for rid in relations:
        facts = store.facts(rid)
        if facts is None:
            raise DataError(f"{store.unit_dir(rid) / 'test_facts.jsonl'}: missing (a run from before the probing "
                            f"controls): --subset {subset} needs it")
        out[rid] = subset_mask(facts, subset)
    return out


def _common(group: list[Entry]) -> list[Entry]:
    """Every entry cut to the relations all of them have, with the same test facts."""
    shared = set.intersection(*(set(e.setting.hits) for e in group))
    for rid in sorted(shared):
        prints = {e.fingerprints.get(rid) for e in group}
        if len(prints) > 1:
            raise DataError(f"{rid}: the runs were tested on different facts (another vocabulary, data or cap?): "
                            "they cannot be paired")
    return [Entry(e.label, stats.Setting(e.setting.seeds, {r: e.setting.hits[r] for r in sorted(shared)}),
                  e.fingerprints) for e in group]


def table(group: list[Entry]) -> str:
    base = group[0]
    spreads = [stats.relation_spread(e.setting) for e in group]
    lines = ["| relation | " + " | ".join(e.label for e in group) + " | "
             + " | ".join(f"{e.label} - {base.label}" for e in group[1:]) + " |",
             "|---|" + "---:|" * (2 * len(group) - 1)]
    for rid in base.setting.hits:
        cells = [f"{100 * s[rid]['mean']:.1f} ± {100 * s[rid]['std']:.1f}" for s in spreads]
        cells += [f"{100 * (s[rid]['mean'] - spreads[0][rid]['mean']):+.1f}" for s in spreads[1:]]
        lines.append(f"| {rid} | " + " | ".join(cells) + " |")
    summaries = [stats.summary(e.setting) for e in group]
    diffs = [stats.difference(e.setting, base.setting) for e in group[1:]]
    lines.append("| **macro** | " + " | ".join(
        f"**{100 * s['macro_mean']:.1f}** [{100 * s['macro_ci95'][0]:.1f}, {100 * s['macro_ci95'][1]:.1f}]"
        for s in summaries) + " | " + " | ".join(
        f"**{100 * d['mean']:+.1f}** [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]" for d in diffs) + " |")
    notes = [f"{len(base.setting.hits)} relations; cells: test P@1 mean ± std over seeds; macro: 95% bootstrap "
             "interval over test facts and seeds; differences paired on the same facts"]
    notes += [f"{e.label}: seeds {', '.join(map(str, e.setting.seeds))}" for e in group]
    notes += [f"{e.label} - {base.label}: seeds {'paired' if d['paired_seeds'] else 'drawn independently'}"
              for e, d in zip(group[1:], diffs)]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def plot(group: list[Entry], path: Path) -> Path:
    relations = list(group[0].setting.hits)
    series = []
    for entry in group:
        spread = stats.relation_spread(entry.setting)
        series.append((f"{entry.label} ({100 * stats.summary(entry.setting)['macro_mean']:.1f})",
                       [100 * spread[r]["mean"] for r in relations], [100 * spread[r]["std"] for r in relations]))
    return grouped_bars(path, relations, series, "per relation: mean over seeds, whiskers: std (legend: macro)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="output folders, or FOLDER:SETTING (FOLDER:manual)")
    parser.add_argument("--plot", default="compare.png", help="where the per-relation plot goes")
    parser.add_argument("--subset", choices=SUBSETS, help="compare on this subset of each relation's test facts")
    opts = parser.parse_args(argv)
    try:
        group = _common([e for spec in opts.runs for e in entries(spec, opts.subset)])
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if len(group) < 2:
        print("error: give two entries to compare (two folders, or a sweep with two settings)", file=sys.stderr)
        return 2
    if opts.subset:
        facts = sum(hits.shape[1] for hits in group[0].setting.hits.values())
        print(f"On the {opts.subset.upper()} subset of the test facts ({facts} facts).\n")
    print(table(group))
    print(f"plot: {plot(group, Path(opts.plot))}")
    return 0

