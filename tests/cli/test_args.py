"""Flags: generated from the run keys, both spellings accepted, one spelling shown, one-line errors."""

import pytest

from qlora_engine.cli import args
from qlora_engine.cli.finetune import build_parser as finetune_parser
from qlora_engine.cli.plan import build_parser as plan_parser
from qlora_engine.train import config


def parse(argv, parser=finetune_parser):
    return args.run_config(parser().parse_args(args.normalize(argv)))


def test_flags_override_yaml_and_both_spellings_work(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("lora_r: 32\nlr: 1.0e-4\npacking: false\ntarget_modules: [q_proj, v_proj]\nbatch_size: auto\n")
    for argv in (["--config", str(f), "--lora_r", "8", "--seq_len", "1024"],
                 ["--config", str(f), "--lora-r", "8", "--seq-len=1024"]):  # fmt: skip
        cfg = parse(argv)
        assert (cfg.lora_r, cfg.lr, cfg.packing, cfg.seq_len, cfg.batch_size) == (8, 1e-4, False, 1024, "auto")
        assert cfg.target_modules == ["q_proj", "v_proj"]
    assert parse(["--resume"]).resume is True
    assert parse(["--target-modules", "q_proj,o_proj"]).target_modules == ["q_proj", "o_proj"]
    assert parse(["--seq_len", "256"], plan_parser).seq_len == 256  # plan takes the same keys


def test_every_run_key_is_a_flag_shown_with_dashes():
    for build in (finetune_parser, plan_parser):
        shown = {o for a in build()._actions for o in a.option_strings}
        for name in config.all_fields():
            assert args.flag(name) in shown
            assert "_" not in args.flag(name)
        assert not any("_" in o for o in shown)


def test_unknown_flag_is_one_line_with_the_nearest(capsys):
    with pytest.raises(SystemExit) as e:
        finetune_parser().parse_args(args.normalize(["--lora_rr", "3"]))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "did you mean --lora-r" in err


def test_values_keep_their_underscores():
    assert args.normalize(["--data", "my_file.jsonl", "--output_dir=runs/a_b"]) == ["--data", "my_file.jsonl",
                                                                                    "--output-dir=runs/a_b"]
