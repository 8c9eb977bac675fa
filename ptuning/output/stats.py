"""Statistics over seeds and test facts: means, spreads and bootstrap confidence intervals for macro (and micro) P@1.

A setting's result is, per relation, one row of test hits (1 where the restricted rank is 1) per seed. The macro
P@1 is the mean over relations of each relation's P@1 averaged over seeds. Its 95% interval comes from resampling
both sources of noise (the percentile bootstrap):

    repeat B times:  draw the seeds with replacement; within every relation draw its test facts with replacement
                     (the same facts for every seed: the seeds saw the same test set); take the macro P@1
    interval:        the 2.5th and 97.5th percentiles of the B values

A difference between two settings is paired: the same facts drawn for both, and, when both ran the same seeds,
the same seeds (seed k of one against seed k of the other). The manual prompt is a setting with one "seed".
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

import numpy as np

BOOTSTRAP = 2000  # resamples: the percentiles move by ~0.1 point between runs of the bootstrap at this count


@dataclass
class Setting:
    """Test hits by relation: hits[relation] is a (seeds, facts) 0/1 array; seeds[k] names row k."""
    seeds: list[int]
    hits: dict[str, np.ndarray]

    def macro_by_seed(self) -> list[float]:
        return [float(np.mean([h[k].mean() for h in self.hits.values()])) for k in range(len(self.seeds))]

    def micro_by_seed(self) -> list[float]:
        return [float(np.concatenate([h[k] for h in self.hits.values()]).mean()) for k in range(len(self.seeds))]


def setting_from_ranks(ranks: dict[str, list[list[int]]], seeds: list[int]) -> Setting:
    """ranks[relation][k]: the test ranks of seed k, facts in the split's order."""
    return Setting(seeds, {r: (np.asarray(rows) == 1).astype(np.float64) for r, rows in ranks.items()})


def _draws(n_relation_facts: dict[str, int], n_seeds: int, generator: np.random.Generator):
    facts = {r: generator.integers(0, n, size=(BOOTSTRAP, n)) for r, n in n_relation_facts.items()}
    seeds = generator.integers(0, n_seeds, size=(BOOTSTRAP, n_seeds))
    return facts, seeds


def _resampled(setting: Setting, facts: dict[str, np.ndarray], seeds: np.ndarray) -> dict[str, np.ndarray]:
    """Each relation's P@1 in each resample, (B,): the drawn seeds' mean at the drawn facts."""
    out = {}
    for relation, hits in setting.hits.items():
        p_by_seed = hits[:, facts[relation]].mean(axis=2)  # (seeds, B)
        out[relation] = np.take_along_axis(p_by_seed.T, seeds, axis=1).mean(axis=1)
    return out


def _macro(per_relation: dict[str, np.ndarray]) -> np.ndarray:
    return np.mean(list(per_relation.values()), axis=0)


def _micro(setting: Setting, per_relation: dict[str, np.ndarray]) -> np.ndarray:
    """Relations weighted by their test facts."""
    sizes = {r: h.shape[1] for r, h in setting.hits.items()}
    return sum(sizes[r] * p for r, p in per_relation.items()) / sum(sizes.values())


def _check_same_facts(a: Setting, b: Setting) -> None:
    if a.hits.keys() != b.hits.keys() or any(a.hits[r].shape[1] != b.hits[r].shape[1] for r in a.hits):
        raise ValueError("the two settings were tested on different facts: a paired comparison needs the same "
                         "relations and test sets")


def summary(setting: Setting, seed: int = 0) -> dict:
    """Macro and micro P@1: mean over seeds, spread across seeds, and the bootstrap 95% interval (the same draws)."""
    generator = np.random.default_rng(seed)
    facts, seeds = _draws({r: h.shape[1] for r, h in setting.hits.items()}, len(setting.seeds), generator)
    per_relation = _resampled(setting, facts, seeds)
    macro, micro = setting.macro_by_seed(), setting.micro_by_seed()
    out = {"seeds": setting.seeds, "macro_by_seed": macro}
    for name, by_seed, values in (("macro", macro, _macro(per_relation)),
                                  ("micro", micro, _micro(setting, per_relation))):
        out.update({f"{name}_mean": statistics.mean(by_seed),
                    f"{name}_std": statistics.stdev(by_seed) if len(by_seed) > 1 else 0.0,
                    f"{name}_ci95": [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]})
    return out


def difference(a: Setting, b: Setting, seed: int = 0) -> dict:
    """Macro P@1 of a minus b: the mean difference and its paired bootstrap 95% interval."""
    _check_same_facts(a, b)
    generator = np.random.default_rng(seed)
    sizes = {r: h.shape[1] for r, h in a.hits.items()}
    facts, seeds_a = _draws(sizes, len(a.seeds), generator)
    paired = a.seeds == b.seeds
    seeds_b = seeds_a if paired else generator.integers(0, len(b.seeds), size=(BOOTSTRAP, len(b.seeds)))
    values = _macro(_resampled(a, facts, seeds_a)) - _macro(_resampled(b, facts, seeds_b))
    mean = statistics.mean(a.macro_by_seed()) - statistics.mean(b.macro_by_seed())
    return {"mean": mean, "ci95": [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))],
            "paired_seeds": paired}


def relation_spread(setting: Setting) -> dict[str, dict[str, float]]:
    """Per relation: test P@1 mean and standard deviation across seeds."""
    out = {}
    for relation, hits in setting.hits.items():
        by_seed = hits.mean(axis=1).tolist()
        out[relation] = {"mean": statistics.mean(by_seed),
                         "std": statistics.stdev(by_seed) if len(by_seed) > 1 else 0.0}
    return out
