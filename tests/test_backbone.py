"""The backbone seam: logits at the target positions, padding that changes nothing, a frozen model."""
import pytest
import torch

from ptuning.model.backbone import Layout
from ptuning.config import ModelConfig
from ptuning.model.loading import load_backbone


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_roberta", "tiny_gpt2"])
def test_scores_equal_the_full_forward_at_the_targets(fixture, request):
    backbone = load_backbone(ModelConfig(name=str(request.getfixturevalue(fixture))))
    assert backbone.head_splits and backbone.vocab_size == backbone.model.config.vocab_size
    ids = torch.randint(5, 200, (3, 9)).to(backbone.device)  # where load_backbone put the model (a GPU host: cuda)
    mask = torch.ones_like(ids)
    targets = torch.tensor([8, 4, 0], device=backbone.device)
    with torch.no_grad():
        full = backbone.model(input_ids=ids, attention_mask=mask).logits[torch.arange(3), targets]
        ours = backbone.scores(backbone.embed(ids), Layout.padded(mask, targets))
    assert torch.allclose(ours, full, atol=1e-5)


def test_causal_left_padding_reads_as_unpadded(tiny_gpt2):
    """Left padding plus positions counted over real tokens: the last position's logits do not move."""
    backbone = load_backbone(ModelConfig(name=str(tiny_gpt2)))
    ids = torch.randint(5, 200, (1, 6)).to(backbone.device)
    with torch.no_grad():
        alone = backbone.model(input_ids=ids).logits[0, -1]  # the next-token logits; no label shifting involved
        padded = torch.cat([torch.full((1, 4), backbone.pad_id, device=backbone.device), ids], 1)
        mask = torch.tensor([[0] * 4 + [1] * 6], device=backbone.device)
        ours = backbone.scores(backbone.embed(padded),
                               Layout.padded(mask, torch.tensor([9], device=backbone.device)))[0]
    assert torch.allclose(ours, alone, atol=1e-5)


def test_masked_right_padding_changes_nothing(tiny_bert):
    backbone = load_backbone(ModelConfig(name=str(tiny_bert)))
    ids = torch.randint(5, 200, (1, 6)).to(backbone.device)
    target = torch.tensor([3], device=backbone.device)
    with torch.no_grad():
        alone = backbone.scores(backbone.embed(ids), Layout.padded(torch.ones_like(ids), target))
        padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long, device=backbone.device)], 1)
        mask = torch.tensor([[1] * 6 + [0] * 5], device=backbone.device)
        ours = backbone.scores(backbone.embed(padded), Layout.padded(mask, target))
    assert torch.allclose(ours, alone, atol=1e-5)


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_gpt2"])
def test_frozen_model_passes_gradients_to_the_inputs_only(fixture, request):
    backbone = load_backbone(ModelConfig(name=str(request.getfixturevalue(fixture))))
    assert not backbone.model.training
    ids = torch.randint(5, 200, (2, 7)).to(backbone.device)
    mask = (torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7], device=backbone.device) if backbone.kind == "causal"
            else torch.ones_like(ids))
    embeds = backbone.embed(ids).detach().requires_grad_(True)
    targets = torch.tensor([6, 6], device=backbone.device)
    backbone.scores(embeds, Layout.padded(mask, targets)).logsumexp(-1).sum().backward()
    assert torch.isfinite(embeds.grad).all() and embeds.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.model.parameters())


def test_bf16_autocast_runs(tiny_gpt2):
    backbone = load_backbone(ModelConfig(name=str(tiny_gpt2), bf16=True))
    ids = torch.randint(5, 200, (2, 5)).to(backbone.device)
    logits = backbone.scores(backbone.embed(ids), Layout.padded(torch.ones_like(ids),
                                                                torch.tensor([4, 4], device=backbone.device)))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_kind_detection(tiny_bert, tiny_gpt2):
    assert load_backbone(ModelConfig(name=str(tiny_bert))).kind == "masked"
    assert load_backbone(ModelConfig(name=str(tiny_gpt2))).kind == "causal"


def test_unloadable_model_is_a_clear_error(tmp_path):
    from ptuning.model.loading import ModelError

    with pytest.raises(ModelError, match="has no config.json"):
        load_backbone(ModelConfig(name=str(tmp_path)))
    with pytest.raises(ModelError, match="GGUF file .* not found"):
        load_backbone(ModelConfig(name=str(tmp_path / "x.gguf")))


@pytest.mark.parametrize("arch", ["albert", "distilbert"])
def test_other_masked_lm_heads_split(arch, tiny_bert, tmp_path):
    """ALBERT (head 'predictions') and DistilBERT (four head modules and a loss module) score like their forward."""
    from transformers import (AlbertConfig, AlbertForMaskedLM, AutoTokenizer, DistilBertConfig,
                              DistilBertForMaskedLM)

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    torch.manual_seed(0)
    if arch == "albert":
        model = AlbertForMaskedLM(AlbertConfig(vocab_size=len(tokenizer), embedding_size=16, hidden_size=32,
                                               num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
    else:
        model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=len(tokenizer), dim=32, n_layers=2, n_heads=2,
                                                       hidden_dim=64))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    backbone = load_backbone(ModelConfig(name=str(tmp_path)))
    assert backbone.kind == "masked" and backbone.head_splits
    ids = torch.randint(5, 200, (2, 7)).to(backbone.device)
    with torch.no_grad():
        full = backbone.model(input_ids=ids).logits[:, 3]
        ours = backbone.scores(backbone.embed(ids), Layout.padded(torch.ones_like(ids),
                                                                  torch.tensor([3, 3], device=backbone.device)))
    assert torch.allclose(ours, full, atol=1e-5)


def test_a_head_that_does_not_split_falls_back_to_the_full_forward(tiny_gpt2, tmp_path):
    """Gemma2 soft-caps its logits inside forward: the split check fails and scores use the model's own logits."""
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                           head_dim=16, final_logit_softcapping=2.0))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    backbone = load_backbone(ModelConfig(name=str(tmp_path)))
    assert backbone.kind == "causal" and not backbone.head_splits
    ids = torch.randint(5, 200, (2, 6)).to(backbone.device)
    with torch.no_grad():
        full = backbone.model(input_ids=ids).logits[:, -1]
        ours = backbone.scores(backbone.embed(ids), Layout.padded(torch.ones_like(ids),
                                                                  torch.tensor([5, 5], device=backbone.device)))
    assert torch.allclose(ours, full, atol=1e-5) and ours.abs().max() <= 2.0


def _facts(n: int, lengths: list[int], backbone) -> list:
    from ptuning.data.templates import Row

    torch.manual_seed(n)
    last = {"causal": lambda k: k - 1, "masked": lambda k: k // 2}[backbone.kind]
    return [Row(tuple(torch.randint(5, 200, (k,)).tolist()), (-1,) * k, last(k), 0) for k in lengths]


def _scores_and_grads(backbone, rows, row_tokens: int):
    from ptuning.train.batching import collate

    batch = collate(rows, [0] * len(rows), [0], backbone.pad_id, backbone.padding_side, row_tokens,
                    backbone.device)
    embeds = backbone.embed(batch.ids).detach().requires_grad_(True)
    logits = backbone.scores(embeds, batch.layout)
    (logits * torch.linspace(-1, 1, logits.shape[1], device=logits.device)).sum().backward()
    # each fact's input gradient, token by token, wherever it sat
    grads = [embeds.grad[batch.layout.target_row[i]][batch.layout.segment[batch.layout.target_row[i]] ==
                                                      batch.layout.segment[batch.layout.target_row[i],
                                                                           batch.layout.target_col[i]]]
             for i in range(len(rows))]
    return logits.detach(), grads, batch.ids.shape


@pytest.mark.parametrize("fixture,attention", [("tiny_bert", "sdpa"), ("tiny_roberta", "sdpa"),
                                               ("tiny_gpt2", "sdpa"), ("tiny_gpt2", "eager")])
def test_facts_sharing_a_row_score_as_if_alone(fixture, attention, request):
    """Facts back to back in one row (attention kept inside each, positions restarting): the same logits and the
    same input gradients as one fact per padded row."""
    backbone = load_backbone(ModelConfig(name=str(request.getfixturevalue(fixture))))
    if attention == "eager":
        backbone.model.config._attn_implementation = "eager"
        backbone.packs_rows = backbone.check_row_packing()
    assert backbone.packs_rows
    rows = _facts(0, [5, 9, 4, 7, 3], backbone)
    alone, alone_grads, alone_shape = _scores_and_grads(backbone, rows, 0)
    shared, shared_grads, shared_shape = _scores_and_grads(backbone, rows, 16)
    assert alone_shape == (5, 9) and shared_shape[0] == 2  # 28 tokens in rows of 16
    assert torch.allclose(shared, alone, atol=1e-5)
    for a, b in zip(alone_grads, shared_grads):  # float32 rounding at the gradients' scale
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-6 * a.abs().max()


def test_attention_that_takes_no_4d_mask_keeps_one_fact_per_row(tiny_gpt2, tmp_path):
    """flex attention takes a block mask, not our 4D mask: the backbone says it cannot share rows. Its forward runs
    eagerly here: compiling flex attention is inductor's work, not ours, and took 33 s on a fresh machine."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ptuning.model.backbone import HFBackbone

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    for attention, shares in (("sdpa", True), ("flex_attention", False)):
        config._attn_implementation = attention
        with torch.compiler.set_stance("force_eager"):
            backbone = HFBackbone(LlamaForCausalLM(config), tokenizer, "causal")
        assert backbone.head_splits and backbone.packs_rows == shares
