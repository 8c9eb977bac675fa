"""Sweeps as packing: units of (relation, variant) trained together, a sweep of one variant being the run it always
was, the statistics over seeds and facts, W&B's run per variant, and the compare command."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from launcher.run import main
from ptuning.output import stats
from ptuning.config import ConfigError, load_config
from ptuning.files import load_tensors
from ptuning.output.store import RunStore
from ptuning.config.sweep import variants
from tests.ranks import spawn
from tests.wandb_records import read_run

RELATIONS = "P1376,P36,P37"
SMALL = ["--relations", RELATIONS, "--set", "data.max_train=24", "--set", "data.max_dev=12", "--set",
         "data.max_test=30", "--set", "train.max_epochs=3", "--set", "train.lr=0.01", "--set",
         "logging.progress=lines"]
FIGURES = ("dev_p@1", "test_p@1", "test_p@10", "test_mrr", "best_epoch", "epochs_run", "dev_history")


def run(model, lama, out, *extra) -> dict:
    assert main(["--set", f"model.name={model}", "--data-dir", str(lama), "--out", str(out), *SMALL, *extra]) == 0
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def seeds(tiny_gpt2, lama, tmp_path_factory):
    """One command: three seeds of three relations, nine units in one packed batch."""
    out = tmp_path_factory.mktemp("seeds")
    return out, run(tiny_gpt2, lama, out, "--sweep", "train.seed=34,35,36")


def test_variants_of_a_grid_and_a_list(tmp_path):
    cfg = load_config(None, ['sweep.variants=[{"prompt.encoder": "mlp"}, {"prompt.encoder": "lstm"}]'],
                      ["train.seed=34,35"])
    names = [v.name for v in variants(cfg)]
    assert names == ["encoder=mlp,seed=34", "encoder=mlp,seed=35", "encoder=lstm,seed=34", "encoder=lstm,seed=35"]
    assert [v.setting for v in variants(cfg)][:2] == ["encoder=mlp", "encoder=mlp"]
    assert variants(cfg)[1].cfg.train.seed == 35 and variants(cfg)[1].cfg.prompt.encoder == "mlp"
    assert [v.name for v in variants(load_config(None))] == [""]  # no sweep: the run's own settings
    listed = load_config(None, ['sweep.variants=[{}, {"train.lr": 0.003}]'])
    assert [(v.name, v.setting) for v in variants(listed)] == [("base", ""), ("lr=0.003", "lr=0.003")]
    with pytest.raises(ConfigError, match="'train.sed': unknown key"):
        load_config(None, [], ["train.sed=1,2"])
    with pytest.raises(ConfigError, match="'model.dtype' cannot vary within a sweep: it changes what every unit "
                                          "shares"):
        load_config(None, [], ["model.dtype=float16,float32"])
    with pytest.raises(ConfigError, match="'protocol.lm_dropout' cannot vary within a sweep"):
        load_config(None, [], ["protocol.lm_dropout=true,false"])
    with pytest.raises(ConfigError, match=r"sweep variant 'lr=0': train\.lr: must be > 0"):
        load_config(None, [], ["train.lr=1e-3,0"])


def test_a_sweep_of_one_variant_is_the_plain_run_bit_for_bit(tiny_gpt2, lama, tmp_path):
    plain = run(tiny_gpt2, lama, tmp_path / "plain", "--set", "logging.wandb=false")
    sweep = run(tiny_gpt2, lama, tmp_path / "sweep", "--set", "logging.wandb=false", "--sweep", "train.seed=34")
    for rid in RELATIONS.split(","):
        unit = sweep["relations"][rid]["variants"]["seed=34"]
        assert {k: unit[k] for k in FIGURES} == {k: plain["relations"][rid][k] for k in FIGURES}
        a = load_tensors(RunStore(tmp_path / "plain").unit_dir(rid) / "prompt_vectors.safetensors")
        b = load_tensors(RunStore(tmp_path / "sweep").unit_dir(f"{rid}/seed=34") / "prompt_vectors.safetensors")
        assert torch.equal(a["prompt_vectors"], b["prompt_vectors"])
    assert sweep["macro"]["test_p@1"] == plain["macro"]["test_p@1"]  # the one variant is every relation's best


def test_three_seeds_in_one_command_give_mean_spread_and_intervals(seeds, capsys):
    out, payload = seeds
    assert list(payload["variants"]) == ["seed=34", "seed=35", "seed=36"]
    setting = payload["statistics"]["settings"][""]
    assert setting["seeds"] == [34, 35, 36] and len(setting["macro_by_seed"]) == 3
    assert setting["macro_mean"] == pytest.approx(np.mean(setting["macro_by_seed"]))
    assert setting["macro_std"] == pytest.approx(np.std(setting["macro_by_seed"], ddof=1))
    low, high = setting["macro_ci95"]
    assert low <= setting["macro_mean"] <= high and high > low
    for rid in RELATIONS.split(","):
        hits = [np.mean(np.array(RunStore(out).ranks(f"{rid}/seed={s}", "test")) == 1) for s in (34, 35, 36)]
        assert setting["relations"][rid]["mean"] == pytest.approx(np.mean(hits))
        assert payload["relations"][rid]["variants"]["seed=35"]["status"] == "done"
    text = (out / "results.md").read_text()
    assert "| (the run settings) | 34, 35, 36 |" in text and "± " in text and "manual prompt" in text
    assert "gain over manual" in text and "best variant per relation, chosen on dev" in text
    assert (out / "p_at_1.png").stat().st_size > 1000


def test_each_seed_of_the_sweep_equals_its_own_run(seeds, tiny_gpt2, lama, tmp_path):
    _, payload = seeds
    alone = run(tiny_gpt2, lama, tmp_path / "s35", "--set", "train.seed=35", "--set", "logging.wandb=false")
    for rid in RELATIONS.split(","):
        unit = payload["relations"][rid]["variants"]["seed=35"]
        assert (unit["test_p@1"], unit["best_epoch"]) == (alone["relations"][rid]["test_p@1"],
                                                          alone["relations"][rid]["best_epoch"])
        assert unit["test_mrr"] == pytest.approx(alone["relations"][rid]["test_mrr"], abs=1e-6)


def test_wandb_has_one_run_per_variant_in_one_group(seeds):
    out, payload = seeds
    files = sorted((out / "wandb").glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 3
    runs = [read_run(out, f) for f in files]
    assert {r["group"] for r in runs} == {"tiny-gpt20-shared"}
    by_seed = {r["config"]["train.seed"]: r for r in runs}
    assert set(by_seed) == {34, 35, 36}
    for seed, r in by_seed.items():
        assert r["summary"]["macro_p@1"] == pytest.approx(payload["variants"][f"seed={seed}"]["macro"]["test_p@1"])
        assert r["summary"]["setting_macro_mean"] == pytest.approx(
            payload["statistics"]["settings"][""]["macro_mean"])


def test_a_sweep_folder_takes_another_seed_and_trains_only_it(seeds, tiny_gpt2, lama, tmp_path, capsys):
    import shutil

    out = tmp_path / "more"
    shutil.copytree(seeds[0], out)
    payload = run(tiny_gpt2, lama, out, "--sweep", "train.seed=34,35,36,37", "--set", "logging.wandb=false")
    err = capsys.readouterr().err
    assert "already final, skipped: P1376/seed=34, P1376/seed=35, P1376/seed=36, P36/seed=34" in err
    assert "P36/seed=37 epoch 1" in err and "P36/seed=35 epoch 1" not in err
    assert payload["statistics"]["settings"][""]["seeds"] == [34, 35, 36, 37]


def test_bootstrap_intervals_behave():
    rng = np.random.default_rng(0)
    hits = {f"P{i}": (rng.random((3, 400)) < 0.3 + 0.1 * i).astype(float) for i in range(4)}
    setting = stats.Setting([1, 2, 3], hits)
    s = stats.summary(setting)
    assert s["macro_ci95"][0] < s["macro_mean"] < s["macro_ci95"][1]
    assert s["macro_ci95"][1] - s["macro_ci95"][0] < 0.06  # 4 x 1200 facts: a few points wide at most
    assert s["micro_ci95"][0] < s["micro_mean"] < s["micro_ci95"][1]
    # relations of unequal size: micro weights facts, macro weights relations
    uneven = stats.summary(stats.Setting([1, 2, 3], {"P0": np.ones((3, 900)), "P1": np.zeros((3, 100))}))
    assert uneven["micro_mean"] == uneven["micro_ci95"][0] == 0.9 and uneven["macro_mean"] == 0.5
    same = stats.difference(setting, setting)
    assert same["mean"] == 0 and same["ci95"] == [0.0, 0.0] and same["paired_seeds"]
    better = stats.Setting([1, 2, 3], {r: np.maximum(h, (rng.random(h.shape) < 0.2)) for r, h in hits.items()})
    diff = stats.difference(better, setting)
    assert diff["ci95"][0] > 0  # every fact at least as good, many better: the interval excludes 0
    with pytest.raises(ValueError, match="different facts"):
        stats.difference(setting, stats.Setting([1], {"P0": hits["P0"][:1]}))


@pytest.mark.slow
def test_compare_two_folders(seeds, tiny_gpt2, lama, tmp_path):
    other = tmp_path / "lr"
    run(tiny_gpt2, lama, other, "--sweep", "train.seed=34,35,36", "--set", "train.lr=0.03", "--set",
        "logging.wandb=false")
    plot = tmp_path / "compare.png"
    proc = spawn(0, "ptuning.compare", seeds[0], other, f"{other}:manual", "--plot", plot, module=True, timeout=120)
    lines = proc.stdout.splitlines()
    header = lines[0]
    assert header.startswith(f"| relation | {seeds[0].name} | lr | lr:manual | lr - {seeds[0].name} |")
    assert sum(line.startswith("| P") for line in lines) == 3 and any("**macro**" in line for line in lines)
    assert "seeds paired" in proc.stdout and plot.stat().st_size > 1000
    # different test facts cannot be paired
    capped = tmp_path / "capped"
    run(tiny_gpt2, lama, capped, "--set", "data.max_test=20", "--set", "logging.wandb=false")
    proc = spawn(0, "ptuning.compare", other, capped, module=True, timeout=120, check=False)
    assert proc.returncode == 2 and "tested on different facts" in proc.stderr


def test_collect_pools_a_sweep_over_array_groups(tiny_gpt2, lama, tmp_path):
    """What launcher/slurm.py --array writes (a group folder per share of the relations), collected into one."""
    from launcher.slurm import collect

    for index, relations in enumerate(("P1376,P36", "P37")):
        assert main(["--set", f"model.name={tiny_gpt2}", "--data-dir", str(lama), "--out",
                     str(tmp_path / f"group-{index}"), *SMALL, "--relations", relations, "--sweep",
                     "train.seed=34,35", "--set", "logging.wandb=false"]) == 0
    merged = collect(tmp_path)
    assert sorted(merged["relations"]) == sorted(RELATIONS.split(","))
    setting = merged["statistics"]["settings"][""]
    assert setting["seeds"] == [34, 35] and sorted(setting["relations"]) == sorted(RELATIONS.split(","))
    assert RunStore(tmp_path).ranks("P37/seed=35", "test") == RunStore(tmp_path / "group-1").ranks("P37/seed=35",
                                                                                                   "test")
    assert "| (the run settings) | 34, 35 |" in (tmp_path / "results.md").read_text()
