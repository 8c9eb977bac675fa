import pytest

from ptuning.data.lama import (DataError, find_layout, read_facts, read_relation_infos, read_vocab_words,
                          select_relations)


def test_real_layout(lama):
    layout = find_layout(lama)
    relations = layout.relation_ids()
    assert len(relations) == 41
    assert len(read_facts(layout, "P19", "test")) == 944
    assert read_facts(layout, "P19", "test")[0].subject == "Allan Peiper"
    infos = read_relation_infos(layout)
    assert infos["P19"].template == "[X] was born in [Y] ." and all(r in infos for r in relations)
    assert len(read_vocab_words(layout, "shared", "gpt2-xl")) == 18154
    assert not any(w.startswith("Ġ") for w in read_vocab_words(layout, "shared", "roberta-large"))


def test_vocab_files_at_the_root_are_accepted(lama_copy):
    (lama_copy / "vocab" / "29k-vocab.json").rename(lama_copy / "29k-vocab.json")
    assert len(read_vocab_words(find_layout(lama_copy), "shared", "bert-base-cased")) == 18154


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="LAMA data folder not found. Fetch the full LAMA with `python -m ptuning.data fetch`"):
        find_layout(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no fact-retrieval/original/"):
        find_layout(tmp_path)


def test_missing_file(lama_copy):
    (lama_copy / "fact-retrieval/original/P36/dev.jsonl").unlink()
    with pytest.raises(DataError, match=r"P36/dev\.jsonl: file not found"):
        read_facts(find_layout(lama_copy), "P36", "dev")


def test_broken_json_line_names_file_and_line(lama_copy):
    path = lama_copy / "fact-retrieval/original/P36/train.jsonl"
    lines = path.read_text().splitlines()
    lines[6] = lines[6][:-3]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"P36/train\.jsonl, line 7: not valid JSON"):
        read_facts(find_layout(lama_copy), "P36", "train")


def test_record_without_a_label_names_the_field(lama_copy):
    path = lama_copy / "fact-retrieval/original/P37/test.jsonl"
    path.write_text(path.read_text().replace('"obj_label"', '"object"', 1))
    with pytest.raises(DataError, match=r"P37/test\.jsonl, line 1: field 'obj_label' is missing"):
        read_facts(find_layout(lama_copy), "P37", "test")


def test_unknown_relation_and_vocab_key(lama_copy):
    layout = find_layout(lama_copy)
    with pytest.raises(DataError, match="unknown relation id.*P999"):
        select_relations(layout, ["P36", "P999"])
    with pytest.raises(DataError, match="no word list for 'gpt3'"):
        read_vocab_words(layout, "shared", "gpt3")
