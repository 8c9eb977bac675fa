"""Probing controls (ptuning/data/controls.py, ptuning/output/probing.py): the majority baseline, the in-subject
share and the UHN subset on a hand-made relation; the top-k answers against the ranks; predictions.jsonl, compare
--subset uhn and inspect on a real run of a tiny model; the random-lm control's weights."""
import json
import re

import pytest
import torch

from launcher.run import main
from ptuning.config import load_config
from ptuning.data.controls import facts_of, majority_object, relation_controls, subset_mask
from ptuning.data.lama import RelationInfo
from ptuning.data.tasks import Example, RelationTask
from ptuning.model.loading import ModelError, load_backbone
from ptuning.model.metrics import restricted_ranks, restricted_top
from ptuning.output.compare import main as compare
from ptuning.output.inspect import main as inspect
from tests.ranks import spawn
from tests.conftest import REPO


def hand_made() -> RelationTask:
    train = [Example(s, o, 0) for s, o in [("a", "Japan"), ("b", "France"), ("c", "France"), ("d", "Japan"),
                                          ("e", "Italy")]]
    test = [Example("Toyota Corolla", "Toyota", 0), Example("Honda Civic", "toyota", 0),  # case-insensitive
            Example("Paris", "France", 0), Example("Lyon", "France", 0), Example("Rome", "Italy", 0),
            Example("Japanese garden", "Japan", 0)]  # "Japan" is in "Japanese garden"
    return RelationTask(RelationInfo("P1", "label", "[X] is [Y] ."), {"train": train, "dev": [], "test": test}, {})


def test_majority_and_in_subject_figures_on_a_hand_made_relation():
    task = hand_made()
    assert majority_object(task) == "Japan"  # Japan and France twice each: the first in file order
    controls = relation_controls(task)
    assert controls == {"majority_object": "Japan", "majority_p@1": 1 / 6, "in_subject": 2 / 6, "n_uhn": 4}
    facts = facts_of(task)
    assert [f["in_subject"] for f in facts] == [True, False, False, False, False, True]
    assert subset_mask(facts, "uhn") == [False, True, True, True, True, False]  # UHN: the in-subject facts removed
    assert subset_mask(facts, None) == [True] * 6
    with pytest.raises(ValueError):
        subset_mask(facts, "person-names")


def test_top_answers_agree_with_the_ranks_ties_broken_by_id():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randint(0, 5, (64, 30), generator=generator).float()  # many ties
    allowed = torch.rand(30, generator=generator) < 0.5
    top = restricted_top(logits, allowed, 10)
    for j in range(10):  # the j-th answer has rank j + 1, and only allowed ids appear
        assert (restricted_ranks(logits, top[:, j], allowed) == j + 1).all()
        assert allowed[top[:, j]].all()
    argmax = logits.masked_fill(~allowed, float("-inf")).argmax(1)
    assert torch.equal(top[:, 0], argmax)


@pytest.mark.slow
def test_top_answers_from_vocab_shards_equal_the_full_logits():
    run = spawn(2, REPO / "tests" / "top_worker.py", timeout=120)
    assert run.returncode == 0 and run.stdout.count("equal") == 2, run.stdout + run.stderr


SMALL = ["--set", "data.max_train=16", "--set", "data.max_dev=8", "--set", "data.max_test=24",
         "--set", "train.max_epochs=2", "--set", "logging.progress=off", "--set", "train.lr=1e-3"]


@pytest.fixture(scope="module")
def probed(tiny_gpt2, lama, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe") / "out"
    assert main(["--set", f"model.name={tiny_gpt2}", "--relations", "P176,P103", "--data-dir", str(lama),
                 "--out", str(out), *SMALL]) == 0
    return out


def test_predictions_agree_with_the_recorded_p_at_1_and_controls(probed):
    results = json.loads((probed / "results.json").read_text())
    for rid, record in results["relations"].items():
        lines = [json.loads(x) for x in (probed / "relations" / rid / "predictions.jsonl").read_text().splitlines()]
        facts = [json.loads(x) for x in (probed / "relations" / rid / "test_facts.jsonl").read_text().splitlines()]
        assert len(lines) == record["n_test"] == len(facts)
        assert set(lines[0]) == {"subject", "object", "in_subject", "manual_rank", "manual_top", "ptuning_rank",
                                 "ptuning_top"}
        for name, key in (("ptuning", "test_p@1"), ("manual", "manual_p@1")):
            hits = [line[f"{name}_rank"] == 1 for line in lines]
            assert sum(hits) / len(lines) == pytest.approx(record[key])
            # the top-1 is the gold exactly where its rank is 1; the gold is at its rank when that is within 10
            assert hits == [line[f"{name}_top"][0] == line["object"] for line in lines]
            assert all(line[f"{name}_top"][line[f"{name}_rank"] - 1] == line["object"]
                       for line in lines if line[f"{name}_rank"] <= 10)
        majority = record["majority_object"]
        assert record["majority_p@1"] == pytest.approx(sum(f["object"] == majority for f in facts) / len(facts))
        assert record["in_subject"] == pytest.approx(sum(f["in_subject"] for f in facts) / len(facts))
        uhn = [line for line in lines if not line["in_subject"]]
        assert record["n_uhn"] == len(uhn)
        assert record["test_uhn_p@1"] == pytest.approx(sum(line["ptuning_rank"] == 1 for line in uhn) / len(uhn))
        assert record["prior_share"] == pytest.approx(sum(line["ptuning_top"][0] == majority for line in lines)
                                                      / len(lines))
    statistics = results["statistics"]
    assert statistics["majority"]["macro_mean"] == pytest.approx(results["macro"]["majority_p@1"])
    assert statistics["settings"][""]["uhn"]["macro_mean"] == pytest.approx(results["macro"]["test_uhn_p@1"])
    assert "| P176 |" in (probed / "results.md").read_text().split("Probing controls")[1]


def test_compare_on_the_uhn_subset_and_inspect(probed, capsys):
    results = json.loads((probed / "results.json").read_text())
    assert compare([str(probed), f"{probed}:manual", "--subset", "uhn", "--plot", str(probed / "c.png")]) == 0
    printed = capsys.readouterr().out
    uhn = results["statistics"]["settings"][""]["uhn"]["macro_mean"]
    assert "On the UHN subset" in printed and f"**{100 * uhn:.1f}**" in printed
    assert inspect([str(probed), "--relation", "P176", "--examples", "2"]) == 0
    printed = capsys.readouterr().out
    table = re.findall(r"^manual (?:right|wrong) +(\d+) +(\d+)$", printed, re.M)  # the 2x2 table of flips
    counts = [int(x) for row in table for x in row]
    assert len(counts) == 4
    assert sum(counts) == results["relations"]["P176"]["n_test"]
    assert inspect([str(probed), "--relation", "P99"]) == 2
    assert "no relation P99" in capsys.readouterr().err


def test_the_random_lm_control_has_the_same_layout_and_other_weights(tiny_gpt2):
    def weights(control: str, seed: int) -> dict[str, torch.Tensor]:
        cfg = load_config(None, [f"model.name={tiny_gpt2}", f"model.control={control}"]).model
        return {k: v.clone() for k, v in load_backbone(cfg, seed=seed).model.state_dict().items()}

    real, control, again, other = weights("none", 34), weights("random-lm", 34), weights("random-lm", 34), \
        weights("random-lm", 35)
    assert {k: v.shape for k, v in real.items()} == {k: v.shape for k, v in control.items()}
    differ = [k for k in real if real[k].is_floating_point() and real[k].std() > 0 and not torch.equal(real[k], control[k])]
    trained = [k for k in real if real[k].is_floating_point() and real[k].std() > 0]
    assert differ == trained  # every trained weight is another one
    assert all(torch.equal(control[k], again[k]) for k in control)  # seeded: the same seed, the same weights
    assert any(not torch.equal(control[k], other[k]) for k in trained)
    state = torch.get_rng_state()
    weights("random-lm", 36)
    assert torch.equal(torch.get_rng_state(), state)  # the run's own random stream is untouched


def test_the_control_is_recorded_and_refused_for_an_unknown_name(tiny_gpt2, lama, tmp_path, capsys):
    out = tmp_path / "control"
    assert main(["--set", f"model.name={tiny_gpt2}", "--relations", "P176", "--data-dir", str(lama), "--out", str(out),
                 "--control", "random-lm", *SMALL]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["control"] == "random-lm" and results["config"]["model"]["control"] == "random-lm"
    assert "Control random-lm" in (out / "results.md").read_text()
    assert main(["--set", "model.control=random", "--relations", "P176", "--data-dir", str(lama)]) == 2
    assert "model.control" in capsys.readouterr().err
