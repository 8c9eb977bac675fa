"""MegatronLM-11B without fairseq: the release reader, the streaming merge, the module against a naive reference,
tensor parallelism (megatron-core on gloo) against the merged model, and P-tuning at TP 1, 2 and 4."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model_parallel.merge import merge
from model_parallel.release import N_PARTS, PART, ReleaseError, read_spec, split_dim
from ptuning.model.backbone import Layout
from ptuning.config import ModelConfig
from ptuning.model.loading import ModelError, load_backbone
from ptuning.files import load_tensors
from ptuning.output.store import RunStore
from tests.conftest import REPO
from tests.megatron_fixture import SPEC, write_release
from tests.ranks import spawn


@pytest.fixture(scope="module")
def release(lama, tmp_path_factory):
    return write_release(lama, tmp_path_factory.mktemp("megatron"))


@pytest.fixture(scope="module")
def merged(release, tmp_path_factory):
    folder = tmp_path_factory.mktemp("merged") / "megatron-merged"
    merge(release[0], folder, shard_gb=0.0002, log=lambda line: None)  # ~210 KB shards: several files
    return folder


def test_reader_takes_the_architecture_from_args(release):
    spec, shapes = read_spec(release[0])
    assert spec == SPEC
    assert shapes["embed_tokens.weight"][0] == (512, 64) and shapes["layers.0.fc2.weight"][0] == (64, 256)
    assert "embed_positions._float_tensor" not in shapes and "version" not in shapes


def test_merge_equals_a_direct_in_memory_merge(release, merged):
    folder, _, dense = release
    files = sorted(merged.glob("model-*.safetensors"))
    assert len(files) > 1 and (merged / "config.json").is_file() and (merged / "dict.txt").is_file()
    on_disk = {}
    for f in files:
        on_disk.update(load_file(f))
    parts = [torch.load(folder / PART.format(i), weights_only=False)["model"] for i in range(N_PARTS)]
    for name in dense:
        dim = split_dim(name)
        key = "decoder." + name
        direct = parts[0][key] if dim is None else torch.cat([p[key] for p in parts], dim=dim)
        assert torch.equal(on_disk[name], direct), name
        assert torch.equal(on_disk[name], dense[name]), name
    assert set(on_disk) == set(dense)


def test_bad_releases_are_clear_errors(release, tmp_path):
    folder = release[0]
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in folder.iterdir():
        (broken / f.name).symlink_to(f)
    (broken / PART.format(5)).unlink()
    with pytest.raises(ReleaseError, match=r"model-model_part-5\.pt: missing"):
        merge(broken, tmp_path / "out1")
    data = (folder / PART.format(5)).read_bytes()
    (broken / PART.format(5)).write_bytes(data[: len(data) // 2])
    with pytest.raises(ReleaseError, match=r"model-model_part-5\.pt: cannot read it .*truncated download"):
        merge(broken, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    part = torch.load(folder / PART.format(3), weights_only=False)
    part["model"]["decoder.layers.1.fc1.weight"] = part["model"]["decoder.layers.1.fc1.weight"][:-1]
    (broken / PART.format(5)).unlink()
    (broken / PART.format(5)).symlink_to(folder / PART.format(5))
    (broken / PART.format(3)).unlink()
    torch.save(part, broken / PART.format(3))
    with pytest.raises(ReleaseError, match=r"part-3\.pt: layers\.1\.fc1\.weight has shape \(31, 64\), part 0 has"):
        merge(broken, tmp_path / "out3")


def _linked_copy(folder: Path, to: Path) -> Path:
    to.mkdir()
    for f in folder.iterdir():
        (to / f.name).symlink_to(f)
    return to


def test_a_tied_output_projection_is_checked_then_dropped(lama, merged, tmp_path):
    """fairseq >= 0.10 re-saves the tied projection under its own name: it merges and loads like the release."""
    from ptuning.model.megatron_backbone import load_megatron_model

    release = write_release(lama, tmp_path / "tied", tied_projection=True)[0]
    assert "decoder.output_projection.weight" in torch.load(release / PART.format(0), weights_only=False)["model"]
    again = tmp_path / "merged-tied"
    merge(release, again, shard_gb=0.0002, log=lambda line: None)
    model = load_megatron_model(again, 1, 0, torch.float32, "cpu")
    ids = torch.randint(4, 400, (2, 6), generator=torch.Generator().manual_seed(1))
    assert torch.equal(_logits(model, ids), _logits(load_megatron_model(merged, 1, 0, torch.float32, "cpu"), ids))
    # an untied projection (not the embedding) is refused, not dropped
    part = torch.load(release / PART.format(2), weights_only=False)
    part["model"]["decoder.output_projection.weight"] = part["model"]["decoder.output_projection.weight"] + 1
    untied = _linked_copy(release, tmp_path / "untied")
    (untied / PART.format(2)).unlink()
    torch.save(part, untied / PART.format(2))
    with pytest.raises(ReleaseError, match=r"part-2\.pt: decoder\.output_projection\.weight differs from "
                                           r"decoder\.embed_tokens\.weight"):
        merge(untied, tmp_path / "out")


def test_a_part_saved_with_fairseq_cfg_instead_of_args_reads_the_same(release, tmp_path):
    part = torch.load(release[0] / PART.format(0), weights_only=False)
    part["cfg"] = {"model": vars(part.pop("args")), "common": {"model_parallel_size": 8}}
    part["args"] = None
    folder = _linked_copy(release[0], tmp_path / "cfg")
    (folder / PART.format(0)).unlink()
    torch.save(part, folder / PART.format(0))
    assert read_spec(folder) == read_spec(release[0])


@pytest.mark.parametrize("key, value, meaning", [
    ("no_token_positional_embeddings", True, "no positional embeddings"),
    ("decoder_learned_pos", True, "learned positional embeddings"),
    ("layernorm_embedding", True, "a LayerNorm after the embeddings"),
    ("no_decoder_final_norm", True, "no final LayerNorm"),
    ("adaptive_softmax_cutoff", "10000,20000", "an adaptive softmax"),
    ("decoder_input_dim", 32, "a projection around the decoder"),
])
def test_args_the_module_cannot_honour_are_refused_before_any_weight(key, value, meaning, release, tmp_path):
    import argparse

    part = torch.load(release[0] / PART.format(0), weights_only=False)
    part["args"] = argparse.Namespace(**{**vars(part["args"]), key: value})
    part["model"] = {}  # no weights at all: the args are refused first
    folder = _linked_copy(release[0], tmp_path / "odd")
    (folder / PART.format(0)).unlink()
    torch.save(part, folder / PART.format(0))
    with pytest.raises(ReleaseError, match=rf"args\.{key}={value!r}: {meaning}\b.*which this module does not"):
        read_spec(folder)


def test_a_pickled_class_and_a_truncated_part_say_which_they_are(release, tmp_path):
    import datetime

    folder = _linked_copy(release[0], tmp_path / "odd")
    part = torch.load(release[0] / PART.format(0), weights_only=False)
    part["saved"] = datetime.datetime(2021, 3, 18)  # e.g. a timestamp, as THUDM's prompt checkpoints hold
    (folder / PART.format(0)).unlink()
    torch.save(part, folder / PART.format(0))
    with pytest.raises(ReleaseError, match=r"part-0\.pt: holds a datetime\.datetime object, which a weights-only "
                                           r"load refuses"):
        read_spec(folder)
    data = (release[0] / PART.format(0)).read_bytes()
    (folder / PART.format(0)).write_bytes(data[: len(data) // 3])
    with pytest.raises(ReleaseError, match=r"part-0\.pt: cannot read it .*truncated download"):
        read_spec(folder)


@pytest.mark.parametrize("content, message", [
    (b"hello 12\nworld\n", r"dict\.txt, line 2: expected '<symbol> <count>', got 'world'"),
    (b"hello 12\n\xff\xfe 3\n", r"dict\.txt, line 2: not UTF-8 text \(byte 0xff at column 1\)"),
])
def test_a_malformed_dictionary_names_its_line(content, message, release, tmp_path):
    folder = _linked_copy(release[0], tmp_path / "odd")
    (folder / "dict.txt").unlink()
    (folder / "dict.txt").write_bytes(content)
    with pytest.raises(ReleaseError, match=message):
        read_spec(folder)


def naive_forward(state: dict, ids: torch.Tensor) -> torch.Tensor:
    """fairseq's pre-LN transformer LM, written out plainly for one unpadded sequence: next-token logits."""
    h, heads = SPEC.hidden, SPEC.heads
    d = h // heads
    t = ids.shape[0]
    half = h // 2
    freqs = torch.exp(torch.arange(half) * -(math.log(10000) / (half - 1)))
    pos = torch.arange(t) + SPEC.padding_idx + 1  # fairseq positions start after the padding index
    positions = torch.cat([torch.sin(pos[:, None] * freqs), torch.cos(pos[:, None] * freqs)], dim=1)
    x = math.sqrt(h) * state["embed_tokens.weight"][ids] + positions
    ln = lambda v, p: torch.nn.functional.layer_norm(v, (h,), state[p + ".weight"], state[p + ".bias"])  # noqa
    lin = lambda v, p: v @ state[p + ".weight"].T + state[p + ".bias"]  # noqa
    for i in range(SPEC.layers):
        p = f"layers.{i}."
        y = ln(x, p + "self_attn_layer_norm")
        q = lin(y, p + "self_attn.q_proj") * d ** -0.5
        k, v = lin(y, p + "self_attn.k_proj"), lin(y, p + "self_attn.v_proj")
        out = torch.zeros(t, h)
        for head in range(heads):
            cols = slice(head * d, (head + 1) * d)
            scores = q[:, cols] @ k[:, cols].T + torch.triu(torch.full((t, t), float("-inf")), 1)
            out[:, cols] = scores.softmax(-1) @ v[:, cols]
        x = x + lin(out, p + "self_attn.out_proj")
        y = ln(x, p + "final_layer_norm")
        x = x + lin(torch.nn.functional.gelu(lin(y, p + "fc1")), p + "fc2")
    return ln(x, "layer_norm")[-1] @ state["embed_tokens.weight"].T


def test_merged_model_matches_the_plain_reference_with_and_without_padding(release, merged):
    _, tokenizer, dense = release
    backbone = load_backbone(ModelConfig(name=str(merged), tokenizer=str(tokenizer)))
    assert backbone.kind == "causal" and backbone.vocab_size == 512 and backbone.vocab_shard is None
    ids = torch.randint(4, 400, (5,))
    expected = naive_forward(dense, ids)
    on = lambda values: torch.tensor(values, device=backbone.device)  # noqa: E731  (cuda on a GPU host)
    ids = ids.to(backbone.device)
    padded = torch.cat([torch.full((3,), backbone.pad_id, device=backbone.device), ids])[None]
    with torch.no_grad():
        alone = backbone.scores(backbone.embed(ids[None]), Layout.padded(on([[1] * 5]), on([4])))
        left = backbone.scores(backbone.embed(padded), Layout.padded(on([[0, 0, 0, 1, 1, 1, 1, 1]]), on([7])))
        # the same sequence behind another one in a shared row: attention and positions restart at it
        other = torch.randint(4, 400, (4,)).to(backbone.device)
        shared = Layout(segment=on([[0] * 4 + [1] * 5]), position=on([[0, 1, 2, 3, 0, 1, 2, 3, 4]]),
                        target_row=on([0]), target_col=on([8]), packed=True)
        behind = backbone.scores(backbone.embed(torch.cat([other, ids])[None]), shared)
    assert backbone.packs_rows
    assert torch.allclose(alone[0].cpu(), expected, atol=1e-4)
    assert torch.allclose(left[0].cpu(), expected, atol=1e-4)
    assert torch.allclose(behind[0].cpu(), expected, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 8])  # 4 is covered by test_ptuning_is_the_same_at_tp_1_2_and_4
def test_tensor_parallel_logits_and_input_gradients_equal_the_merged_model(tp, release, merged, tmp_path):
    release_dir, tokenizer, _ = release
    source = release_dir if tp == 8 else merged  # TP=8 loads part i into rank i, no merge
    worker = str(REPO / "tests" / "megatron_tp_worker.py")
    spawn(1, worker, str(merged), str(tokenizer), str(tmp_path / "tp1.pt"))
    spawn(tp, worker, str(source), str(tokenizer), str(tmp_path / f"tp{tp}.pt"))
    one, many = torch.load(tmp_path / "tp1.pt"), torch.load(tmp_path / f"tp{tp}.pt")
    assert many["logits"].shape == one["logits"].shape == (4, 512)
    assert torch.allclose(many["logits"], one["logits"], atol=1e-5)
    # gradients reach |g| ~ 70 here (a sum over 512 logits): equal up to float32 rounding at that scale
    scale = one["grad"].abs().max()
    assert (many["grad"] - one["grad"]).abs().max() <= 1e-5 * scale


def test_the_release_needs_a_merge_for_other_sizes(release):
    with pytest.raises(ModelError, match="loads as is only at tensor_parallel 8.*model_parallel.merge"):
        load_backbone(ModelConfig(name=str(release[0]), tokenizer=str(release[1])))


@pytest.mark.slow
def test_ptuning_is_the_same_at_tp_1_2_and_4(release, merged, lama, tmp_path):
    args = [str(REPO / "launcher" / "run.py"), "--set", f"model.name={merged}", "--set",
            f"model.tokenizer={release[1]}", "--relations", "P36,P37", "--data-dir", str(lama), "--set",
            "data.vocab=original", "--set", "data.max_train=24", "--set", "data.max_dev=40", "--set",
            "data.max_test=40", "--set", "train.max_epochs=2", "--set", "train.lr=0.01", "--set",
            "logging.wandb=false"]
    results = {}
    for tp in (1, 2, 4):
        out = tmp_path / f"tp{tp}"
        spawn(tp, *args, "--out", str(out), "--set", f"parallel.tensor_parallel={tp}")
        results[tp] = json.loads((out / "results.json").read_text())["relations"]
        assert {r["status"] for r in results[tp].values()} == {"done"}
    for tp in (2, 4):
        for rid in ("P36", "P37"):
            a, b = results[1][rid], results[tp][rid]
            assert (a["test_p@1"], a["dev_p@1"], a["best_epoch"]) == (b["test_p@1"], b["dev_p@1"], b["best_epoch"])
            assert a["test_mrr"] == pytest.approx(b["test_mrr"], abs=1e-6)
            store_a, store_b = RunStore(tmp_path / "tp1"), RunStore(tmp_path / f"tp{tp}")
            vectors = [load_tensors(s.unit_dir(rid) / "prompt_vectors.safetensors")["prompt_vectors"]
                       for s in (store_a, store_b)]
            assert torch.allclose(*vectors, atol=1e-5), (tp, rid)  # the prompts the model sees
            wa, wb = load_tensors(store_a.encoder_path(rid)), load_tensors(store_b.encoder_path(rid))
            # Tensor parallelism sums in another order, so gradients differ by float rounding. Adam divides each
            # update by the gradient's running size, which lifts that rounding to up to +-lr per step on the
            # rare components whose gradient is ~0: those few may move further, the rest stay within 1e-5.
            diffs = torch.cat([(wa[n] - wb[n]).abs().flatten() for n in wa])
            assert (diffs > 1e-5).float().mean() < 1e-3, (tp, rid, int((diffs > 1e-5).sum()))
            assert diffs.max() <= 0.01 * 6, (tp, rid)  # lr x (2 epochs x 3 steps)


def test_memory_report_of_the_real_shapes(capsys):
    from ptuning.model.memory import main

    assert main(["--config", str(REPO / "configs" / "megatron11b.json"), "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 11,032,246,272 (11.03B)" in out
    assert "prompt encoder (lstm, 6 pseudo tokens): 132,194,304 parameters" in out  # the paper's ~132M
    rows = {int(line.split("|")[1]): [c.strip() for c in line.split("|")[2:-1]] for line in out.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip().isdigit()}
    assert rows[1][0] == "20.5 GiB" and rows[8][0] == "2.6 GiB"  # weights per rank
    assert rows[8][1] == "6" and rows[1][1] == "41"  # encoders sharded over the group: ceil(41 / tp) per rank
    assert int(rows[8][-1]) >= 41  # TP 8 packs every LAMA relation
    assert 15 <= int(rows[1][-1]) < 41  # one 80 GiB GPU packs some (the H100 check measured 17 in 54.6 GiB)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """This rank's next-token logits at the last position of each row of ids."""
    layout = Layout.padded(torch.ones_like(ids), torch.full((ids.shape[0],), ids.shape[1] - 1))
    with torch.no_grad():
        hidden = model(model.embed_tokens(ids), layout.position, layout.allowed(causal=True))
        return model.logits(hidden[layout.target_row, layout.target_col])


def _old_path(folder: Path, tp: int, rank: int, dtype: torch.dtype) -> torch.nn.Module:
    """How load_megatron built the model before it was built on the meta device: a CPU model initialised, then the
    whole checkpoint cast and copied in."""
    from ptuning.model.megatron_backbone import is_release, read_merged_shard
    from model_parallel.merge import read_merged_spec
    from model_parallel.megatron import MegatronLM
    from model_parallel.release import load_part

    if is_release(folder):
        spec, state = read_spec(folder)[0], load_part(folder / PART.format(rank))[1]
    else:
        spec, state = read_merged_spec(folder), dict(read_merged_shard(folder, tp, rank))
    model = MegatronLM(spec, tp=tp, dtype=dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    return model


def _assert_loaded_like_the_old_path(folder: Path, tp: int, rank: int, dtype: torch.dtype) -> None:
    from ptuning.model.megatron_backbone import load_megatron_model

    new, old = load_megatron_model(folder, tp, rank, dtype, "cpu"), _old_path(folder, tp, rank, dtype)
    tensors = {**dict(new.named_parameters()), **dict(new.named_buffers())}
    assert {t.device.type for t in tensors.values()} == {"cpu"}, "a parameter or buffer left on meta"
    assert {t.dtype for t in new.parameters()} == {dtype}
    old_tensors = {**dict(old.named_parameters()), **dict(old.named_buffers())}
    assert tensors.keys() == old_tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(tensor, old_tensors[name]), name
        assert vars(tensor) == vars(old_tensors[name]), name  # megatron-core's tensor-parallel marks
    ids = torch.randint(4, 400, (3, 6), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(new, ids), _logits(old, ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_meta_built_model_equals_the_old_path(merged, dtype):
    _assert_loaded_like_the_old_path(merged, 1, 0, dtype)


@pytest.mark.slow
def test_the_meta_built_model_equals_the_old_path_tensor_parallel(merged, monkeypatch):
    """Two ranks, each against the old path, bit for bit. (The release's own parts at TP 8 are
    checked against the merged model by the logits and gradients test above, to 1e-5.)"""
    spawn(2, str(Path(__file__)), str(merged))  # this file is the ranks' script


def test_weights_that_do_not_fit_are_a_clear_error(merged, tmp_path):
    from ptuning.model.megatron_backbone import load_megatron_model

    folder = tmp_path / "deeper"
    folder.mkdir()
    for f in merged.iterdir():
        (folder / f.name).symlink_to(f)
    config = json.loads((merged / "config.json").read_text())
    config["spec"]["layers"] = 3
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ReleaseError, match=r"(?s)deeper: weights do not fit the model .*Missing key.*layers\.2\."):
        load_megatron_model(folder, 1, 0, torch.float32, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_megatron_is_made_on_the_device(dtype):
    from model_parallel.megatron import random_megatron

    model = random_megatron(SPEC, dtype=dtype, device="cpu", seed=3)
    tensors = [*model.parameters(), *model.buffers()]
    assert {t.device.type for t in tensors} == {"cpu"}
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert torch.equal(model.layers[1].final_layer_norm.weight, torch.ones(SPEC.hidden, dtype=dtype))
    assert 0.015 < float(model.layers[0].fc1.weight.detach().float().std()) < 0.025
    logits = _logits(model, torch.randint(4, 400, (2, 5)))
    assert logits.shape == (2, SPEC.vocab_size) and bool(logits.isfinite().all())
    again = random_megatron(SPEC, dtype=dtype, device="cpu", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


if __name__ == "__main__":  # a worker of test_the_meta_built_model_equals_the_old_path_tensor_parallel
    from launcher.distributed import init_parallel

    context = init_parallel(int(os.environ["WORLD_SIZE"]))
    _assert_loaded_like_the_old_path(Path(sys.argv[1]), context.tp_size, context.tp_rank, torch.float32)
