"""How many relations pack: the arithmetic, and train.pack_units "auto" on a CPU."""
from ptuning.model import capacity
from ptuning.config import load_config
from ptuning.experiment import run_experiment


def test_sharding_divides_the_encoder_state_over_the_group():
    # k relations need ceil(k / tp) encoders of 3 units and k activations of 1 unit within 10 units
    assert capacity.units_that_fit(10, 3, 1, tp=1) == 2  # 2 x 3 + 2 = 8; a third would need 12
    assert capacity.units_that_fit(10, 3, 1, tp=2) == 4  # 2 encoders here (6) + 4 = 10
    assert capacity.units_that_fit(2, 3, 1, tp=1) == 0
    assert capacity.encoder_parameters(6, 3072, "lstm") == 132_194_304  # the paper's encoder at 11B: ~132M


def test_auto_packs_every_relation_on_a_cpu(tiny_gpt2, lama, tmp_path, capsys):
    cfg = load_config(None, [f"model.name={tiny_gpt2}", "data.relations=P1376,P36,P37", "data.max_train=8",
                             "data.max_dev=4", "data.max_test=4", "train.max_epochs=1", "train.pack_units=auto",
                             "logging.wandb=false", "logging.progress=lines", f"output.dir={tmp_path}"])
    run_experiment(cfg, lama)
    assert "pack_units auto: 3 of 3 units per pack (on cpu, every unit packs)" in capsys.readouterr().err


def test_memory_report_of_a_hugging_face_model_from_its_config_alone(tmp_path, capsys):
    """Llama-3.1-8B's shapes (from its published config), sized on the meta device: no weights anywhere."""
    from transformers import LlamaConfig

    from ptuning.model.memory import main

    LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
                architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    assert main(["--model", str(tmp_path), "--relations", "123", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 8,030,261,248 (8.03B)" in out
    rows = {int(line.split("|")[1]): [c.strip() for c in line.split("|")[2:-1]] for line in out.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip().isdigit()}
    assert sorted(rows) == [1, 2, 4, 8]
    # the plan shards attention and MLP projections and the head; the 1.05 GB embedding stays whole on every rank
    assert rows[1][0] == "15.0 GiB" and rows[8][0] == "2.7 GiB"
    assert rows[8][1] == "16" and int(rows[8][-1]) > int(rows[1][-1]) > 0
    assert main(["--model", str(tmp_path / "nowhere")]) == 2
