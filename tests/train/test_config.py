"""The knobs: one set of dataclasses read from YAML or keyword arguments, typed, with one-line errors."""

import pytest

from qlora_engine.train import config


def test_values_are_typed_and_keys_take_either_spelling():
    cfg = config.from_dict({"lora_r": "32", "lr": "1e-4", "packing": "false", "target_modules": "q_proj, v_proj",
                            "batch_size": "auto", "seq-len": 1024})  # fmt: skip
    assert (cfg.lora_r, cfg.lr, cfg.packing, cfg.seq_len, cfg.batch_size) == (32, 1e-4, False, 1024, "auto")
    assert cfg.target_modules == ["q_proj", "v_proj"]
    assert config.RunConfig.make(lora_r=8).lora_r == 8 and cfg.replace(lora_r=4).lora_r == 4
    assert cfg.flat()["seq_len"] == 1024


def test_every_field_has_help():
    for name, (_, f) in config.all_fields().items():
        assert f.metadata["help"], name


@pytest.mark.parametrize("values,message", [
    ({"lora_rr": 3}, "did you mean lora_r"),
    ({"lora_r": 0}, "lora_r must be a positive"),
    ({"optim": "sgd"}, "optim must be one of"),
    ({"batch_size": "x"}, "batch_size must be a whole number or auto"),
    ({"packing": "maybe"}, "packing must be true or false"),
    ({"lr": "abc"}, "lr must be float"),
    ({"lora_dropout": 1.5}, "lora_dropout must be in"),
])  # fmt: skip
def test_bad_values_name_the_key(values, message):
    with pytest.raises(config.ConfigError, match=message) as e:
        config.from_dict(values)
    assert "\n" not in str(e.value)


def test_bad_yaml_is_one_line(tmp_path):
    f = tmp_path / "bad.yaml"
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.load_yaml(f)
    f.write_text("lora_r: [1,\n")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load_yaml(f)
    f.write_text("- a\n- b\n")
    with pytest.raises(config.ConfigError, match="key: value"):
        config.load_yaml(f)
