"""Vocabulary strategies and each tokenizer family's leading-space convention."""
import pytest
from transformers import AutoTokenizer

from ptuning.config import DataConfig
from ptuning.data.lama import find_layout, read_relation_infos, select_relations
from ptuning.data.tasks import prepare_task, read_relation
from ptuning.data.vocab import build_answer_vocab, default_vocab_key, encode_in_context


def test_wordpiece_has_no_space_marker(tiny_bert):
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    ids = encode_in_context(tok, ["Paris", "was born in"])
    assert tok.convert_ids_to_tokens(ids[0]) == ["Paris"]
    assert tok.convert_ids_to_tokens(ids[1]) == ["was", "born", "in"]


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_roberta"])
def test_byte_level_bpe_words_carry_the_space(fixture, request):
    tok = AutoTokenizer.from_pretrained(request.getfixturevalue(fixture))
    assert tok.convert_ids_to_tokens(encode_in_context(tok, ["Paris"])[0]) == ["ĠParis"]


def test_full_lama_counts_with_a_tokenizer_holding_the_bert_words(lama, tiny_bert):
    """With every word of the bert-base-cased list as one token, the filters give LAMA-29k and LAMA-34k."""
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    layout = find_layout(lama)
    infos = read_relation_infos(layout)
    for strategy, expected in (("shared", 29521), ("lama", 34039)):
        vocab = build_answer_vocab(tok, len(tok), strategy, layout, "bert-base-cased")
        tasks = [prepare_task(infos[r], read_relation(layout, r), vocab, DataConfig())
                 for r in select_relations(layout, None)]
        assert sum(len(t.splits["test"]) for t in tasks) == expected
        assert sum(t.dropped["test"] for t in tasks) == 34039 - expected


def test_mapping_into_another_tokenizer_drops_and_counts(lama, tiny_gpt2):
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    layout = find_layout(lama)
    vocab = build_answer_vocab(tok, len(tok), "shared", layout, "bert-base-cased")
    assert 0 < vocab.size <= 18154
    task = prepare_task(read_relation_infos(layout)["P36"], read_relation(layout, "P36"), vocab, DataConfig(max_train=10))
    assert len(task.splits["train"]) == 10 and task.capped["train"] > 0
    assert len(task.splits["test"]) + task.dropped["test"] == 703
    for example in task.splits["test"]:
        assert tok.convert_ids_to_tokens([example.label]) == ["Ġ" + example.obj]


def test_original_strategy_takes_any_single_token(tiny_gpt2):
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    vocab = build_answer_vocab(tok, len(tok) + 3, "original", None, "unused")
    assert not vocab.allowed[tok.eos_token_id] and not vocab.allowed[len(tok)]
    paris, missing = vocab.object_ids(["Paris", "Qwxzv Kjhgf"])
    assert tok.convert_ids_to_tokens([paris]) == ["ĠParis"] and missing is None


def test_smollm2_tokenizer_convention():
    """SmolLM2 (Llama family, GPT-2 style byte-level BPE): objects are 'Ġ'-prefixed single tokens."""
    import importlib.util
    from pathlib import Path

    from ptuning.model.loading import PACKAGED_GGUF

    package, filename, _ = PACKAGED_GGUF["smollm2-135m"]
    folder = Path(importlib.util.find_spec(package).origin).parent
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    ids = encode_in_context(tok, ["Paris", "Allan Peiper"])
    assert tok.convert_ids_to_tokens(ids[0]) == ["ĠParis"]
    assert tok.convert_ids_to_tokens(ids[1])[0] == "ĠAllan"


def test_default_vocab_keys():
    assert default_vocab_key("bert-large-cased") == "bert-large-cased"
    assert default_vocab_key("gpt2-medium") == "gpt2-xl"
    assert default_vocab_key("roberta-base") == "roberta-large"
    assert default_vocab_key("smollm2-135m") == "bert-base-cased"
