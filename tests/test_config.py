"""The knobs: YAML + flags from one set of dataclasses, and one-line errors."""

import pytest

from qlora_engine import config


def test_flags_override_yaml_and_are_typed(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("lora_r: 32\nlr: 1.0e-4\npacking: false\ntarget_modules: [q_proj, v_proj]\nbatch_size: auto\n")
    cfg = config.parse_args(["--config", str(f), "--lora_r", "8", "--seq_len", "1024"], "p", "d")
    assert (cfg.lora_r, cfg.lr, cfg.packing, cfg.seq_len, cfg.batch_size) == (8, 1e-4, False, 1024, "auto")
    assert cfg.target_modules == ["q_proj", "v_proj"]
    assert config.parse_args(["--resume"], "p", "d").resume is True
    assert config.parse_args(["--target_modules", "q_proj,o_proj"], "p", "d").target_modules == ["q_proj", "o_proj"]


def test_every_field_is_a_flag_with_help():
    parser = config.build_parser("p", "d")
    flags = {a.dest for a in parser._actions}
    for name, (_, f) in config.all_fields().items():
        assert name in flags and f.metadata["help"]


@pytest.mark.parametrize("argv,message", [
    (["--lora_rr", "3"], "did you mean lora_r"),
    (["--lora_r", "0"], "lora_r must be a positive"),
    (["--optim", "sgd"], "optim must be one of"),
    (["--batch_size", "x"], "batch_size must be a whole number or auto"),
    (["--packing", "maybe"], "packing must be true or false"),
    (["--lr", "abc"], "lr must be float"),
    (["--config", "/nonexistent.yaml"], "does not exist"),
    (["--lora_dropout", "1.5"], "lora_dropout must be in"),
])  # fmt: skip
def test_bad_values_name_the_key(argv, message):
    with pytest.raises(config.ConfigError, match=message) as e:
        config.parse_args(argv, "p", "d")
    assert "\n" not in str(e.value)


def test_bad_yaml_is_one_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("lora_r: [1,\n")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.parse_args(["--config", str(f)], "p", "d")
    f.write_text("- a\n- b\n")
    with pytest.raises(config.ConfigError, match="key: value"):
        config.parse_args(["--config", str(f)], "p", "d")
