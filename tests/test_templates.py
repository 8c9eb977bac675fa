"""Where the pseudo tokens, the subject and the predicted position sit, for both model kinds."""
import pytest
from transformers import AutoTokenizer

from ptuning.data.templates import ManualTemplate, PTuningTemplate, TemplateError, split_manual

BORN = "[X] was born in [Y] ."


def test_split_manual():
    assert split_manual(BORN) == ("", "was born in", ".")
    assert split_manual("The capital of [X] is [Y] .") == ("The capital of", "is", ".")
    with pytest.raises(TemplateError):
        split_manual("[Y] is the home of [X] .")


def test_masked_subject_comes_before_the_mask(tiny_bert):
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    template = PTuningTemplate(tok, "masked", (3, 3, 3), BORN)
    paris = tok.convert_tokens_to_ids("Paris")
    row = template.rows(["Paris"], [7])[0]
    assert row.pseudo == (-1, 0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1)
    assert row.ids[0] == tok.cls_token_id and row.ids[4] == paris and row.ids[-1] == tok.sep_token_id
    assert row.target == 8 and row.ids[8] == tok.mask_token_id and row.label == 7
    assert template.n_pseudo == 9


def test_masked_without_trailing_pseudo_ends_with_a_dot(tiny_bert):
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    row = PTuningTemplate(tok, "masked", (2, 2, 0), BORN).rows(["Paris"], [7])[0]
    assert tok.convert_ids_to_tokens(list(row.ids[-3:])) == ["[MASK]", ".", "[SEP]"]


def test_causal_object_is_predicted_at_the_last_position(tiny_gpt2):
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    row = PTuningTemplate(tok, "causal", (3, 3, 0), BORN).rows(["Paris"], [7])[0]
    assert row.pseudo == (0, 1, 2, -1, 3, 4, 5)
    assert tok.convert_ids_to_tokens([row.ids[3]]) == ["ĠParis"]
    assert row.target == len(row.ids) - 1 == 6
    with pytest.raises(TemplateError, match="causal LMs predict the object as the next token"):
        PTuningTemplate(tok, "causal", (3, 3, 3), BORN)


def test_anchors_follow_each_segments_pseudo_tokens(tiny_gpt2):
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    template = PTuningTemplate(tok, "causal", (1, 2, 0), "The capital of [X] is [Y] .", anchors=True)
    row = template.rows(["France"], [7])[0]
    tokens = tok.convert_ids_to_tokens(list(row.ids))
    assert tokens[1:] == ["ĠThe", "Ġcapital", "Ġof", "ĠFrance", tokens[5], tokens[6], "Ġis"]
    assert row.pseudo == (0, -1, -1, -1, -1, 1, 2, -1) and row.target == 7
    init = template.manual_init_ids()
    assert tok.convert_ids_to_tokens(init[:2]) == ["ĠThe", "Ġis"] and init[2] is None


def test_manual_rows(tiny_bert, tiny_gpt2):
    bert = AutoTokenizer.from_pretrained(tiny_bert)
    row = ManualTemplate(bert, "masked", BORN).rows(["Paris"], [7])[0]
    assert bert.convert_ids_to_tokens(list(row.ids)) == ["[CLS]", "Paris", "was", "born", "in", "[MASK]", ".",
                                                         "[SEP]"]
    assert row.target == 5 and set(row.pseudo) == {-1}
    gpt = AutoTokenizer.from_pretrained(tiny_gpt2)
    row = ManualTemplate(gpt, "causal", BORN).rows(["Paris"], [7])[0]
    assert gpt.convert_ids_to_tokens(list(row.ids))[-3:] == ["Ġwas", "Ġborn", "Ġin"]
    assert row.target == len(row.ids) - 1
